//! The per-head linear part `xW + b` of learned feature maps: W (h, d, f), b (h, f).
use super::{FeatureMapInit, MapInput};
use crate::error::Result;
use tch::{nn, Tensor};

#[derive(Debug)]
pub struct HeadProjection {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    input: MapInput,
}

impl HeadProjection {
    /// Variables `W` (h, d, f) and, with `bias`, `b` (h, f, zeros) under `path`.
    pub fn new(
        path: &nn::Path,
        heads: i64,
        head_dim: i64,
        feature_dim: i64,
        bias: bool,
        init: FeatureMapInit,
    ) -> Self {
        let dims = [heads, head_dim, feature_dim];
        let weight = match init {
            FeatureMapInit::Kaiming => path.var("W", &dims, nn::init::DEFAULT_KAIMING_UNIFORM),
            FeatureMapInit::Identity => {
                let eye = Tensor::eye_m(head_dim, feature_dim, (path.kind(), path.device()));
                path.var_copy("W", &eye.unsqueeze(0).repeat([heads, 1, 1]))
            }
        };
        let bias = bias.then(|| path.zeros("b", &[heads, feature_dim]));
        Self {
            weight,
            bias,
            input: MapInput { heads, head_dim },
        }
    }

    pub fn feature_dim(&self) -> i64 {
        self.weight.size()[2]
    }

    /// A projection over the same weight and bias tensors.
    pub fn shallow_clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            input: self.input,
        }
    }

    /// (b, h', L, d) -> xW + b (b, h, L, f) in the matmul operand dtype (f16 / bf16 inputs keep
    /// theirs; what follows, a softmax or a ReLU, reads them in f32 where it needs to).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.input.prepare_operand(x)?;
        let projected = x.matmul(&self.weight.to_kind(x.kind()));
        Ok(match &self.bias {
            Some(b) => projected + b.to_kind(x.kind()).unsqueeze(1),
            None => projected,
        })
    }
}
