//! Profiling: libtorch's Kineto profiler ([`Profiler`], [`range`], bound in
//! `linearize-torch-ext`) records every aten operator and, on CUDA, every kernel, copy and
//! memset with its GPU time, and named spans (`record_function` ranges). The trace is Chrome's
//! trace-event JSON (chrome://tracing, Perfetto); [`summary::Summary`] reads it back and totals
//! GPU time per range, per operator and per kernel.
pub mod summary;

pub use linearize_torch_ext::profiler::{range, Profiler, Range};
