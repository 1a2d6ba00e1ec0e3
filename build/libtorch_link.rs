//! Shared build script of every crate that links libtorch (settings in `libtorch.rs`).
#[path = "libtorch.rs"]
mod libtorch;

fn main() {
    libtorch::link();
}
