//! Training: data pipeline, optimizer and schedules, metrics and experiment tracking,
//! resumable state, and the stages.
pub mod convert;
pub mod data;
pub mod export;
pub mod lora;
pub mod metrics;
pub mod optim;
pub mod progress;
pub mod schedule;
pub mod selection;
pub mod stage;
pub mod stage1;
pub mod stage2;
pub mod state;
pub mod tracking;
mod train_loop;
