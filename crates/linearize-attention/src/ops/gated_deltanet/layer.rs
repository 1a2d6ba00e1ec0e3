//! What a converted layer feeds the Gated DeltaNet kernel: its q and k maps (an optional SiLU,
//! then the L2 norm that keeps the delta rule a contraction) and its learned per-head gates
//!
//! ```text
//! g = −exp(A_log) · softplus(u W_aᵀ + dt_bias),   β = sigmoid(u W_bᵀ)
//! ```
//!
//! (fla's / Mamba-2's parametrisation). The paper computes them from the layer's input x; the
//! attention core is handed only the teacher's projections, so `u` is the concatenation of all
//! heads of q, k and v before RoPE: a linear image of x whose rank is x's for the usual shapes
//! (q alone has as many columns as x), so `u W` reaches what `x W` does. `u` is scaled to unit
//! norm: a stage-1 AdamW step of lr (1e-2, set for feature maps) then moves a gate's
//! pre-activation by about lr, not lr times the width (~1000), which would swing the untrained
//! slow decays to a full reset in one step.
use crate::error::{Error, Result};
use crate::tensors::compute_kind;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// Log-spaced per-head time steps of the untrained gates: with `W_a = 0` head i decays by
/// `exp(−dt_i)` per token, from half-lives of about 700 tokens down to 7, the span Mamba-2 and
/// fla draw their initial time steps from. Long memory from the start is what retrieval needs;
/// the shortest heads keep the teacher's local focus.
const DT_MIN: f64 = 1e-3;
const DT_MAX: f64 = 1e-1;

/// The map applied to q and k before their L2 norm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkActivation {
    /// None: the teacher's q and k directions as they are.
    #[default]
    Identity,
    /// SiLU, as the Gated DeltaNet paper (after its short convolution).
    Silu,
}

impl QkActivation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Identity => "identity",
            Self::Silu => "silu",
        }
    }

    /// `x` (b, h, L, d) mapped and L2-normalised over d, in f32 (f64 for f64 inputs).
    pub fn unit(self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_kind(compute_kind("q / k", x)?);
        let x = match self {
            Self::Identity => x,
            Self::Silu => x.silu(),
        };
        super::l2_normalize(&x)
    }
}

/// The trainable gate parameters of one layer, under its path: `a_proj` and `b_proj` (h, in),
/// `A_log` and `dt_bias` (h), with `in` the summed width of all q, k and v heads.
#[derive(Debug)]
pub struct DeltaGates {
    pub a_proj: Tensor,
    pub b_proj: Tensor,
    pub a_log: Tensor,
    pub dt_bias: Tensor,
}

impl DeltaGates {
    /// The untrained gates: `W_a = W_b = 0`, so every token gets β = 1/2 and head i the decay
    /// `exp(−dt_i)` (see [`DT_MIN`]); their gradients are not zero (they carry u), so stage 1
    /// moves them from the first step.
    pub fn new(path: &nn::Path, heads: i64, input_dim: i64) -> Self {
        let dt_bias: Vec<f64> = (0..heads)
            .map(|i| {
                let frac = if heads > 1 {
                    i as f64 / (heads - 1) as f64
                } else {
                    0.0
                };
                let dt = (DT_MIN.ln() + frac * (DT_MAX.ln() - DT_MIN.ln())).exp();
                dt.exp_m1().ln() // softplus⁻¹(dt)
            })
            .collect();
        let dt_bias = Tensor::from_slice(&dt_bias).to_kind(path.kind());
        Self {
            a_proj: path.zeros("a_proj", &[heads, input_dim]),
            b_proj: path.zeros("b_proj", &[heads, input_dim]),
            a_log: path.zeros("A_log", &[heads]),
            dt_bias: path.var_copy("dt_bias", &dt_bias),
        }
    }

    pub fn shallow_clone(&self) -> Self {
        Self {
            a_proj: self.a_proj.shallow_clone(),
            b_proj: self.b_proj.shallow_clone(),
            a_log: self.a_log.shallow_clone(),
            dt_bias: self.dt_bias.shallow_clone(),
        }
    }

    /// The log-decays `g` and `β`, each (b, h, L) in f32, from the projections before RoPE:
    /// `q_raw` (b, h, L, d), `k_raw` and `v` (b, h_kv, L, d).
    pub fn forward(&self, q_raw: &Tensor, k_raw: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let flat = |t: &Tensor| {
            let size = t.size(); // (b, n, L, d)
            t.to_kind(Kind::Float)
                .transpose(1, 2)
                .reshape([size[0], size[2], size[1] * size[3]])
        };
        let u = Tensor::cat(&[flat(q_raw), flat(k_raw), flat(v)], -1); // (b, L, in)
        let want = self.a_proj.size()[1];
        if u.size()[2] != want {
            return Err(Error::Shape {
                tensor: "q, k, v heads",
                expected: format!("{want} values per token in all"),
                got: u.size(),
            });
        }
        let u = super::l2_normalize(&u)?;
        let project = |w: &Tensor| u.matmul(&w.to_kind(Kind::Float).transpose(0, 1)); // (b, L, h)
        let rate = (project(&self.a_proj) + self.dt_bias.to_kind(Kind::Float)).softplus();
        let g = -(self.a_log.to_kind(Kind::Float).exp() * rate);
        let beta = project(&self.b_proj).sigmoid();
        Ok((g.transpose(1, 2), beta.transpose(1, 2)))
    }
}
