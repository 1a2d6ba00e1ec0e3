//! linearize-eval
