//! Training: data pipeline, optimizer and schedules, metrics, resumable state, and the stages.
pub mod data;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod state;
