pub mod bench;
pub mod compare;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod launch;
