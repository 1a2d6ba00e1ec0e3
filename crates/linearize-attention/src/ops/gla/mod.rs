//! Gated linear attention with a per-key-dim decay, the recurrence of Liger's GLA:
//!
//! ```text
//! S_t = diag(α_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t,   α_t = exp(g_t)
//! ```
//!
//! no normaliser and no 1/√d. Inputs: `q` (b, h, L, d_k), `k` (b, h_k, L, d_k), `v`
//! (b, h_v, L, d_v) and the log-gates `g` (b, h_g, L, d_k), all `g <= 0`; `h_k`, `h_v`, `h_g`
//! divide `h`. Output (b, h, L, d_v) in `v`'s dtype, computed in f32 (f64 for f64 inputs).
//!
//! Whole sequences from the empty state ([`chunked_output`]: training, scoring) take the fused
//! CUDA kernels (`linearize_torch_ext::gla`, written in Triton) where they apply: CUDA, bf16 or
//! f16 values, d_k = d_v of 64 or 128.
mod chunked;
mod naive;
mod recurrent;

pub use chunked::{chunked, chunked_output};
pub use naive::naive;
pub(crate) use recurrent::check_step;
pub use recurrent::{recurrent, step};

use crate::error::{config, Result};
use crate::tensors::{compute_kind, shape, Dims};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Settings of the chunked GLA kernel.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GlaConfig {
    /// Tokens per chunk: the unit of the state carried across chunks.
    pub chunk_size: i64,
    /// Tokens per sub-chunk inside a chunk (must divide `chunk_size`). With very strong decay
    /// both are scaled down for that call so that factored decays stay within f32 range.
    pub sub_chunk: i64,
    /// Whether whole sequences from the empty state take the fused CUDA kernels where they
    /// apply ([`chunked_output`]); their chunks are their own (64 tokens in sub-chunks of 16,
    /// exact for any decay), so `chunk_size` and `sub_chunk` set only the libtorch form's.
    pub fused: bool,
}

impl Default for GlaConfig {
    fn default() -> Self {
        Self {
            chunk_size: 64,
            sub_chunk: 16,
            fused: true,
        }
    }
}

impl GlaConfig {
    pub fn validate(&self) -> Result<()> {
        if self.sub_chunk < 1 || self.chunk_size < 1 || self.chunk_size % self.sub_chunk != 0 {
            return Err(config(
                "chunk_size / sub_chunk",
                format!(
                    "need sub_chunk >= 1 dividing chunk_size, got {} / {}",
                    self.chunk_size, self.sub_chunk
                ),
            ));
        }
        Ok(())
    }
}

/// The recurrent state `S` (b, h, d_k, d_v) in the compute dtype.
#[derive(Debug)]
pub struct GlaState {
    pub s: Tensor,
}

impl GlaState {
    pub fn shallow_clone(&self) -> Self {
        self.map_tensors(&Tensor::shallow_clone)
    }

    /// The same state with `f` applied to each of its tensors (copies, repeats along the batch,
    /// moves).
    pub fn map_tensors(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        Self { s: f(&self.s) }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        vec![&self.s]
    }

    pub(crate) fn initial(state: Option<&Self>, s: &Shapes, opts: (Kind, Device)) -> Result<Self> {
        match state {
            None => Ok(Self {
                s: Tensor::zeros(Self::shape(s), opts),
            }),
            Some(state) => {
                state.check(s)?;
                Ok(Self {
                    s: state.s.to_kind(opts.0),
                })
            }
        }
    }

    fn shape(s: &Shapes) -> [i64; 4] {
        [s.batch, s.heads, s.key_dim, s.value_dim]
    }

    /// Checks the state against a call's sizes.
    pub(crate) fn check(&self, s: &Shapes) -> Result<()> {
        let want = Self::shape(s);
        if self.s.size() != want {
            return Err(shape("state.s", &format!("{want:?}"), &self.s));
        }
        Ok(())
    }
}

/// Checked sizes of one call.
pub(crate) struct Shapes {
    pub batch: i64,
    pub heads: i64,
    pub len: i64,
    pub key_dim: i64,
    pub value_dim: i64,
}

pub(crate) fn check_inputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_gates: &Tensor,
) -> Result<Shapes> {
    let qd = Dims::of("q", q)?;
    qd.check_companion("k", k)?.check_dim("k", k, qd.dim)?;
    let vd = qd.check_companion("v", v)?;
    qd.check_companion("log_gates", log_gates)?
        .check_dim("log_gates", log_gates, qd.dim)?;
    compute_kind("q", q)?;
    compute_kind("log_gates", log_gates)?;
    Ok(Shapes {
        batch: qd.batch,
        heads: qd.heads,
        len: qd.len,
        key_dim: qd.dim,
        value_dim: vd.dim,
    })
}
