//! Evaluation of converted models against their teacher: perplexity by the protocol of
//! DESIGN.md, next-token KL and agreement.
pub mod perplexity;
