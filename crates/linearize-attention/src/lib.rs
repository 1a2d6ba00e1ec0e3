//! linearize-attention
