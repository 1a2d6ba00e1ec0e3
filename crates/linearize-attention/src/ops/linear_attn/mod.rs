//! Normalised causal linear attention (φ applied after RoPE, as in LoLCATs):
//! `y_t = sum_{s<=t} (φq_t·φk_s) v_s / (sum_{s<=t} φq_t·φk_s + eps)`, no 1/sqrt(d).
//!
//! Inputs: `phi_q` (b, h, L, f), `phi_k` (b, h_k, L, f), `v` (b, h_v, L, d) with `h_k` and `h_v`
//! dividing `h` (GQA; heads are repeated as Hugging Face's `repeat_kv` does). The output is
//! (b, h, L, d) in `v`'s dtype; sums run in f32 (f64 for f64 inputs), the chunked form's matmuls
//! on f16 / bf16 operands for f16 / bf16 inputs.
//!
//! Whole sequences from the empty state ([`chunked_output`]: training, scoring) take the fused
//! CUDA kernels (`linearize_torch_ext::linear_attn`, written in Triton) where they apply: CUDA,
//! bf16 or f16 values, head size 64 or 128, feature width 64, 128 or 256.
mod chunked;
mod naive;
mod recurrent;

pub use chunked::{chunked, chunked_output};
pub use naive::naive;
pub use recurrent::{recurrent, step};

use crate::error::{at_least_one, config, Result};
use crate::tensors::{Dims, Precision};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Settings of the linear-attention kernels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinearAttnConfig {
    /// Tokens per chunk in the chunked form.
    pub chunk_size: i64,
    /// Added to the normaliser (LoLCATs uses 1e-12).
    pub eps: f64,
    /// Whether whole sequences from the empty state take the fused CUDA kernels where they
    /// apply ([`chunked_output`]); their chunks are their own (64 tokens), so `chunk_size` sets
    /// only the libtorch form's.
    pub fused: bool,
}

impl Default for LinearAttnConfig {
    fn default() -> Self {
        Self {
            chunk_size: 64,
            eps: 1e-12,
            fused: true,
        }
    }
}

impl LinearAttnConfig {
    pub fn validate(&self) -> Result<()> {
        at_least_one("chunk_size", self.chunk_size)?;
        if self.eps.is_nan() || self.eps < 0.0 {
            return Err(config("eps", format!("must be >= 0, got {}", self.eps)));
        }
        Ok(())
    }
}

/// Everything a linear-attention layer remembers of the tokens it has seen: `kv = sum φk_s^T v_s`
/// (b, h, f, d) and `k_sum = sum φk_s` (b, h, f), in the compute dtype. Produced by
/// [`chunked`] (prefill) and carried on by [`step`] / [`recurrent`] (decoding).
#[derive(Debug)]
pub struct LinearState {
    pub kv: Tensor,
    pub k_sum: Tensor,
}

impl LinearState {
    /// The state of no tokens.
    pub fn zeros(
        batch: i64,
        heads: i64,
        feature_dim: i64,
        head_dim: i64,
        opts: (Kind, Device),
    ) -> Self {
        Self {
            kv: Tensor::zeros([batch, heads, feature_dim, head_dim], opts),
            k_sum: Tensor::zeros([batch, heads, feature_dim], opts),
        }
    }

    pub fn shallow_clone(&self) -> Self {
        self.map_tensors(&Tensor::shallow_clone)
    }

    /// The same state with `f` applied to each of its tensors (copies, repeats along the batch,
    /// moves).
    pub fn map_tensors(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        Self {
            kv: f(&self.kv),
            k_sum: f(&self.k_sum),
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        vec![&self.kv, &self.k_sum]
    }

    /// The state with `phi_k` (b, h, n, f) and `v` (b, h, n, d) added, the product's operands in
    /// `p.operand`.
    pub(crate) fn absorb(&self, phi_k: &Tensor, v: &Tensor, p: Precision) -> Self {
        Self {
            kv: &self.kv + p.mm(&phi_k.transpose(-1, -2), v),
            k_sum: &self.k_sum + phi_k.sum_dim_intlist(-2, false, p.acc),
        }
    }

    /// Adds one token's `phi_k` (b, h, 1, f) and `v` (b, h, 1, d) in place, the outer product
    /// written straight into `kv` (no temporary of its size): a decoding step allocates nothing
    /// of the state's size, and a CUDA graph replaying it updates the tensors it captured.
    pub(crate) fn absorb_token(&mut self, phi_k: &Tensor, v: &Tensor) {
        let _ = self.kv.addcmul_(&phi_k.transpose(-1, -2), v);
        let _ = self.k_sum.g_add_(&phi_k.squeeze_dim(2));
    }

    /// Checks this state against a call's sizes and moves it to the call's compute dtype where
    /// it is not there yet (a copy on the first step after a prefill in another dtype, none after).
    pub(crate) fn ready(&mut self, dims: &Shapes, kind: Kind) -> Result<()> {
        self.check(dims)?;
        for t in [&mut self.kv, &mut self.k_sum] {
            if t.kind() != kind {
                *t = t.to_kind(kind);
            }
        }
        Ok(())
    }

    /// This state checked against a call's sizes, in the call's compute dtype.
    pub(crate) fn for_call(&self, dims: &Shapes, kind: Kind) -> Result<Self> {
        self.check(dims)?;
        Ok(Self {
            kv: self.kv.to_kind(kind),
            k_sum: self.k_sum.to_kind(kind),
        })
    }

    /// `state` prepared for a call, or the empty state.
    pub(crate) fn initial(
        state: Option<&Self>,
        dims: &Shapes,
        opts: (Kind, Device),
    ) -> Result<Self> {
        match state {
            Some(state) => state.for_call(dims, opts.0),
            None => Ok(Self::zeros(
                dims.batch,
                dims.heads,
                dims.feature_dim,
                dims.head_dim,
                opts,
            )),
        }
    }

    pub(crate) fn check(&self, dims: &Shapes) -> Result<()> {
        let want = [dims.batch, dims.heads, dims.feature_dim, dims.head_dim];
        if self.kv.size() != want {
            return Err(crate::tensors::shape(
                "state.kv",
                &format!("{want:?}"),
                &self.kv,
            ));
        }
        if self.k_sum.size() != want[..3] {
            return Err(crate::tensors::shape(
                "state.k_sum",
                &format!("{:?}", &want[..3]),
                &self.k_sum,
            ));
        }
        Ok(())
    }
}

/// Checked sizes of one call.
pub(crate) struct Shapes {
    pub batch: i64,
    pub heads: i64,
    pub len: i64,
    pub feature_dim: i64,
    pub head_dim: i64,
}

pub(crate) fn check_inputs(phi_q: &Tensor, phi_k: &Tensor, v: &Tensor) -> Result<Shapes> {
    let q = Dims::of("phi_q", phi_q)?;
    q.check_companion("phi_k", phi_k)?
        .check_dim("phi_k", phi_k, q.dim)?;
    let vd = q.check_companion("v", v)?;
    Ok(Shapes {
        batch: q.batch,
        heads: q.heads,
        len: q.len,
        feature_dim: q.dim,
        head_dim: vd.dim,
    })
}
