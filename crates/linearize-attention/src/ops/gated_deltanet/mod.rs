//! Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024; flash-linear-attention's `gated_delta_rule`):
//! the delta rule, which overwrites what the state holds for a key instead of adding to it, with
//! a scalar decay per head and token. With the state `S` (d_k, d_v) and rows `q_t`, `k_t`, `v_t`:
//!
//! ```text
//! S_t = α_t (I − β_t k_tᵀ k_t) S_{t−1} + β_t k_tᵀ v_t,   o_t = q_t S_t,   α_t = exp(g_t)
//! ```
//!
//! (the paper's `S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ`, transposed to the (d_k, d_v)
//! layout of the other kernels here). No normaliser and no 1/√d: the caller scales q. The
//! recurrence is a contraction only for unit keys and `β_t ∈ [0, 1]`: the caller L2-normalises
//! k ([`l2_normalize`], as the paper and fla do) and takes β from a sigmoid.
//!
//! Inputs: `q` (b, h, L, d_k), `k` (b, h_k, L, d_k), `v` (b, h_v, L, d_v), the log-decays `g`
//! (b, h_g, L), all `g <= 0`, and `beta` (b, h_β, L) in [0, 1]; `h_k`, `h_v`, `h_g`, `h_β`
//! divide `h` (GQA: repeated to `h`, one state per query head). Output (b, h, L, d_v) in `v`'s
//! dtype, computed in f32 (f64 for f64 inputs).
mod chunked;
mod layer;
mod naive;
mod recurrent;

pub use chunked::chunked;
pub use layer::{DeltaGates, QkActivation};
pub use naive::naive;
pub(crate) use recurrent::write;
pub use recurrent::{recurrent, step};

use super::gla::Shapes;
use crate::error::{at_least_one, Error, Result};
use crate::tensors::{compute_kind, shape, Dims};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

/// Settings of the chunked Gated DeltaNet kernel.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatedDeltaNetConfig {
    /// Tokens per chunk: the size of the triangular system solved per chunk and the unit of the
    /// state carried across chunks.
    pub chunk_size: i64,
}

impl Default for GatedDeltaNetConfig {
    fn default() -> Self {
        Self { chunk_size: 64 }
    }
}

impl GatedDeltaNetConfig {
    pub fn validate(&self) -> Result<()> {
        at_least_one("chunk_size", self.chunk_size)?;
        Ok(())
    }
}

/// `x / ‖x‖` over the last dim, with fla's `l2norm` epsilon (1e-6 under the square root) so that
/// a zero vector stays zero and its gradient finite; computed in f32 (f64 for f64 inputs).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let kind = compute_kind("x", x)?;
    let x32 = x.to_kind(kind);
    let norm = (x32.square().sum_dim_intlist(-1, true, kind) + 1e-6).sqrt();
    Ok((x32 / norm).to_kind(x.kind()))
}

/// The recurrent state `S` (b, h, d_k, d_v) in the compute dtype: the same matrix state as GLA's
/// (only its update differs), with the same checks.
pub type GatedDeltaNetState = super::gla::GlaState;

pub(crate) fn check_inputs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
) -> Result<Shapes> {
    let qd = Dims::of("q", q)?;
    qd.check_companion("k", k)?.check_dim("k", k, qd.dim)?;
    let vd = qd.check_companion("v", v)?;
    for (name, t) in [("g", g), ("beta", beta)] {
        match t.size()[..] {
            [b, h, l] if b == qd.batch && l == qd.len && h >= 1 && qd.heads % h == 0 => {}
            _ => {
                let expected = format!(
                    "(batch {}, heads dividing {}, len {})",
                    qd.batch, qd.heads, qd.len
                );
                return Err(shape(name, &expected, t));
            }
        }
        compute_kind(name, t)?;
    }
    compute_kind("q", q)?;
    Ok(Shapes {
        batch: qd.batch,
        heads: qd.heads,
        len: qd.len,
        key_dim: qd.dim,
        value_dim: vd.dim,
    })
}

/// Refuses log-decays that are positive or not finite and β outside [0, 1] (one host read for both):
/// either would make the recurrence grow without bound. The one-token step skips this check so
/// that decoding never waits for the device.
pub(crate) fn check_values(g: &Tensor, beta: &Tensor) -> Result<()> {
    let bad_g = g.gt(0.0).logical_or(&g.isfinite().logical_not()).any();
    let bad_beta = (beta
        .lt(0.0)
        .logical_or(&beta.gt(1.0))
        .logical_or(&beta.isnan()))
    .any();
    let flags = Vec::<bool>::try_from(Tensor::stack(&[bad_g, bad_beta], 0).to_device(Device::Cpu))
        .map_err(|e| Error::Kernel(e.into()))?;
    if flags[0] {
        return Err(Error::Value {
            tensor: "g",
            message: "log-decays must be finite and <= 0 (log of a decay in (0, 1])".into(),
        });
    }
    if flags[1] {
        return Err(Error::Value {
            tensor: "beta",
            message: "must lie in [0, 1] (a sigmoid), found values outside".into(),
        });
    }
    Ok(())
}
