//! Feature maps φ for linear attention: input (b, h', L, d) -> (b, h, L, f), computed in f32 for
//! f16/bf16 inputs (f64 stays f64) and returned in the input's dtype. Maps with parameters keep
//! them per head under the `nn::Path` they are built at (`<path>.W`, `<path>.b`), so a layer
//! builds `feature_map_q` and `feature_map_k` as two maps. An input with fewer heads than the
//! map (GQA keys) has its heads repeated first, as LoLCATs maps keys after `repeat_kv`.
mod based;
mod elu;
mod hedgehog;
mod projection;
mod softmax_dim;
mod t2r;

pub use based::Based;
pub use elu::OnePlusElu;
pub use hedgehog::Hedgehog;
pub use projection::HeadProjection;
pub use softmax_dim::SoftmaxDim;
pub use t2r::T2r;

use crate::error::{config, Result};
use crate::tensors::{compute_kind, repeat_heads, shape, Dims, Precision};
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// How a learned map's weight starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureMapInit {
    /// PyTorch's `kaiming_uniform_` on the (h, d, f) weight, as LoLCATs does (fan-in d·f).
    #[default]
    Kaiming,
    /// Identity per head (ones on the diagonal of each d x f block), LoLCATs' `zero_init`.
    Identity,
}

/// A feature map as recipes name it, e.g. `{kind: hedgehog, feature_dim: 64}`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FeatureMapConfig {
    /// `[softmax_f(xW + b), softmax_f(−xW − b)]` (2f features), or only the first half with
    /// `half_space` (f features).
    Hedgehog {
        #[serde(default = "default_feature_dim")]
        feature_dim: i64,
        #[serde(default)]
        half_space: bool,
        #[serde(default)]
        bias: bool,
        #[serde(default)]
        init: FeatureMapInit,
    },
    /// `relu(xW + b)` (f features).
    T2r {
        #[serde(default = "default_feature_dim")]
        feature_dim: i64,
        #[serde(default = "default_true")]
        bias: bool,
        #[serde(default)]
        init: FeatureMapInit,
    },
    /// `elu(x) + 1` (d features).
    Elu,
    /// Based's 2nd-order Taylor map `[1, x/d^¼, vec(x⊗x)/(√2·√d)]` (1 + d + d² features).
    Based,
    /// Liger's parameter-free `softmax_d(x)` (d features).
    SoftmaxDim,
}

fn default_feature_dim() -> i64 {
    64
}

fn default_true() -> bool {
    true
}

impl FeatureMapConfig {
    /// Features per head for inputs of head dim `head_dim`.
    pub fn output_dim(&self, head_dim: i64) -> i64 {
        match *self {
            Self::Hedgehog {
                feature_dim,
                half_space,
                ..
            } => {
                if half_space {
                    feature_dim
                } else {
                    2 * feature_dim
                }
            }
            Self::T2r { feature_dim, .. } => feature_dim,
            Self::Elu | Self::SoftmaxDim => head_dim,
            Self::Based => 1 + head_dim + head_dim * head_dim,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Hedgehog { feature_dim, .. } | Self::T2r { feature_dim, .. }
                if feature_dim < 1 =>
            {
                Err(config(
                    "feature_dim",
                    format!("must be >= 1, got {feature_dim}"),
                ))
            }
            _ => Ok(()),
        }
    }
}

/// A built feature map.
#[derive(Debug)]
pub enum FeatureMap {
    Hedgehog(Hedgehog),
    T2r(T2r),
    Elu(OnePlusElu),
    Based(Based),
    SoftmaxDim(SoftmaxDim),
}

impl FeatureMap {
    /// Builds the map for `num_heads` heads of dim `head_dim`, with its parameters under `path`.
    pub fn new(
        path: &nn::Path,
        num_heads: i64,
        head_dim: i64,
        cfg: &FeatureMapConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        if num_heads < 1 || head_dim < 1 {
            return Err(config(
                "feature map",
                format!("needs heads and head dim >= 1, got {num_heads} x {head_dim}"),
            ));
        }
        Ok(match *cfg {
            FeatureMapConfig::Hedgehog {
                feature_dim,
                half_space,
                bias,
                init,
            } => Self::Hedgehog(Hedgehog::new(
                path,
                num_heads,
                head_dim,
                feature_dim,
                half_space,
                bias,
                init,
            )),
            FeatureMapConfig::T2r {
                feature_dim,
                bias,
                init,
            } => Self::T2r(T2r::new(path, num_heads, head_dim, feature_dim, bias, init)),
            FeatureMapConfig::Elu => Self::Elu(OnePlusElu::new(num_heads, head_dim)),
            FeatureMapConfig::Based => Self::Based(Based::new(num_heads, head_dim)),
            FeatureMapConfig::SoftmaxDim => Self::SoftmaxDim(SoftmaxDim::new(num_heads, head_dim)),
        })
    }

    /// φ(x): (b, h', L, d) -> (b, h, L, f).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Hedgehog(m) => m.forward(x),
            Self::T2r(m) => m.forward(x),
            Self::Elu(m) => m.forward(x),
            Self::Based(m) => m.forward(x),
            Self::SoftmaxDim(m) => m.forward(x),
        }
    }

    /// A map over the same parameter tensors (for a second mixer sharing them).
    pub fn shallow_clone(&self) -> Self {
        match self {
            Self::Hedgehog(m) => Self::Hedgehog(Hedgehog {
                projection: m.projection.shallow_clone(),
                half_space: m.half_space,
            }),
            Self::T2r(m) => Self::T2r(T2r {
                projection: m.projection.shallow_clone(),
            }),
            Self::Elu(m) => Self::Elu(m.clone()),
            Self::Based(m) => Self::Based(m.clone()),
            Self::SoftmaxDim(m) => Self::SoftmaxDim(m.clone()),
        }
    }

    /// f, the features per head.
    pub fn output_dim(&self) -> i64 {
        match self {
            Self::Hedgehog(m) => m.output_dim(),
            Self::T2r(m) => m.output_dim(),
            Self::Elu(m) => m.output_dim(),
            Self::Based(m) => m.output_dim(),
            Self::SoftmaxDim(m) => m.output_dim(),
        }
    }
}

/// Heads and head dim a map expects; checks an input and prepares it in the compute dtype.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MapInput {
    pub heads: i64,
    pub head_dim: i64,
}

impl MapInput {
    /// `x` (b, h', L, d) with its heads repeated to `heads`, in the compute dtype.
    pub fn prepare(&self, x: &Tensor) -> Result<Tensor> {
        let kind = compute_kind("feature map input", x)?;
        self.prepare_as(x, kind)
    }

    /// [`Self::prepare`] in the matmul operand dtype: f16 / bf16 inputs stay as they are, so a
    /// projection runs on tensor cores (products accumulated in f32, the result rounded).
    pub fn prepare_operand(&self, x: &Tensor) -> Result<Tensor> {
        let kind = Precision::of("feature map input", x)?.operand;
        self.prepare_as(x, kind)
    }

    fn prepare_as(&self, x: &Tensor, kind: Kind) -> Result<Tensor> {
        let dims = Dims::of("feature map input", x)?;
        if dims.dim != self.head_dim || self.heads % dims.heads != 0 {
            let expected = format!(
                "(batch, heads dividing {}, len, {})",
                self.heads, self.head_dim
            );
            return Err(shape("feature map input", &expected, x));
        }
        Ok(repeat_heads(&x.to_kind(kind), self.heads))
    }
}
