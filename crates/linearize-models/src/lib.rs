//! linearize-models
