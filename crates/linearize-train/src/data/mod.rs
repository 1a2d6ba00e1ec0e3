//! Training data: sources (plain text, JSONL, alpaca and chat instructions) tokenised through a
//! [`TextEncoder`] and cached, packed into fixed-length sequences, split for validation, and
//! served in deterministic, resumable, data-parallel batches; plus the on-disk store of
//! sequences sampled from the teacher for data-free training.
//!
//! ```text
//! DataConfig ──build_datasets──> Datasets { train, val } ──Batcher::new──> next_batch() ...
//!                                                          cursor() / seek() for resume
//! ```
mod batcher;
mod cache;
mod config;
mod dataset;
mod documents;
mod encoder;
mod model_encoder;
mod packing;
mod shuffle;
mod sources;
mod teacher_samples;
mod tokenized;

pub use batcher::{Batch, Batcher, Budget, DataCursor};
pub use cache::TokenCache;
pub use config::{BosPolicy, DataConfig, SourceConfig, SourceKind, TeacherSamplesConfig};
pub use dataset::{build_datasets, Datasets};
pub use documents::read_documents;
pub use encoder::{ChatTurn, TextEncoder};
pub use model_encoder::ModelEncoder;
pub use packing::{pack, PackOptions, PackStats, PackedSequences};
pub use sources::{list_files, list_hub_files, SourceFile, MANIFEST};
pub use teacher_samples::{chat_template_of, SampleSettings, TeacherSampleStore};
pub use tokenized::{tokenize_source, TokenizedDocs};
