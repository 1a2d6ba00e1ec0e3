//! linearize-train
