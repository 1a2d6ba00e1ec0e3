//! Evaluation of converted models against their teacher, on identical inputs: perplexity by the
//! protocol of docs/eval.md with next-token KL and agreement, per-layer attention error, recall
//! probes, the teacher's retrieval heads, multiple-choice tasks, speed and memory, generations,
//! and a report with plots ([`report::run_report`]).
pub mod attention_error;
pub mod generations;
pub mod kl;
pub mod multiple_choice;
pub mod perplexity;
pub mod plots;
pub mod recall;
pub mod report;
pub mod retrieval_heads;
pub mod speed;
pub mod training;

pub use report::{run_report, EvalConfig, EvalReport, WindowOnlyConfig};
