//! Attention kernels, feature maps and LoRA adapters for converting softmax attention into
//! linear, windowed and gated attention. Pure tensor functions over tch; each method's module
//! documentation states its math.
//!
//! | method ([`ops`])         | naive (L x L) | chunked (train / prefill, state in and out) | recurrent (decode) | state           |
//! |--------------------------|---------------|---------------------------------------------|--------------------|-----------------|
//! | [`ops::linear_attn`]     | `naive`       | `chunked`                                   | `step`, `recurrent`| [`ops::linear_attn::LinearState`] |
//! | [`ops::lolcats`] (sw, tk)| `naive`       | `chunked`                                   | `step`, `recurrent`| [`ops::lolcats::LolcatsState`]    |
//! | [`ops::lizard`] (sw, tk) | `naive`       | `chunked` (decays in log space)             | `step`, `recurrent`| [`ops::lizard::LizardState`]      |
//! | [`ops::swa`]             | `naive`       | `chunked` (SDPA on local blocks)            | `step`, `recurrent`| [`ops::swa::SwaState`]            |
//! | [`ops::gla`]             | `naive`       | `chunked` (log space, sub-chunks)           | `step`, `recurrent`| [`ops::gla::GlaState`]            |
//! | [`ops::liger`]           | `naive`       | `chunked`                                   | `step`, `recurrent`| [`ops::liger::LigerState`]        |
//! | [`ops::gated_deltanet`]  | `naive` (per token) | `chunked` (WY / UT, triangular solve per chunk) | `step`, `recurrent`| [`ops::gated_deltanet::GatedDeltaNetState`] |
//! | [`ops::gdn_window`] (sw) | `naive` (per token) | `chunked` (window SDPA + Gated DeltaNet on shifted queries) | `step`, `recurrent`| [`ops::gdn_window::GdnWindowState`] |
//!
//! All kernels take (batch, heads, len, dim) tensors; keys, values (and key features, gates) may
//! have fewer heads than queries when their count divides it (GQA). They accumulate in f32 for
//! f16 / bf16 inputs (f64 for f64) and return `v`'s dtype; the chunked forms are differentiable.
//! For f16 / bf16 inputs the chunked forms' matmuls take operands in that dtype (tensor cores;
//! products accumulate in f32, results come back rounded), while running sums, gates, softmax
//! statistics and normalisers stay in f32, as in flash-linear-attention.
//! `chunked(.., state)` continues from a state and returns the final one, so a prompt is
//! prefilled with `chunked` and decoded with `step`; `recurrent` is `step` over a sequence (from
//! a copy of its state). `step` updates the state in place (full window caches are rings written
//! at the leaving token's slot), so that no step copies the state and a CUDA graph replays it on
//! the same tensors; under autograd it builds the next state out of place instead.
//!
//! | feature map ([`feature_map::FeatureMapConfig`]) | φ(x)                                         | params (under the map's path) |
//! |-------------------------------------------------|----------------------------------------------|-------------------------------|
//! | `hedgehog`                                      | `[softmax(xW + b), softmax(−xW − b)]` or half | `W` (h, d, f), `b` (h, f)     |
//! | `t2r`                                           | `relu(xW + b)`                               | `W`, `b`                      |
//! | `elu`                                           | `elu(x) + 1`                                 | –                             |
//! | `based`                                         | `[1, x/d^¼, x⊗x/(√2·√d)]`                    | –                             |
//! | `softmax_dim`                                   | `softmax_d(x)` (Liger)                       | –                             |
//!
//! [`lora::LoraLinear`]: `delta(x)`, `merge_into`, `unmerge_from`; LoLCATs' trainable window
//! factors: [`ops::lolcats::WindowFactors`]; Lizard's gate projection: [`ops::lizard::LizardGates`].
pub mod error;
pub mod feature_map;
pub mod linearized;
pub mod lora;
pub mod ops;
mod tensors;

pub use error::{Error, Result};
