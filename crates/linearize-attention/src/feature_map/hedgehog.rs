//! Hedgehog (Zhang et al. 2024): `φ(x) = [softmax_f(xW + b), softmax_f(−(xW + b))]`, or only the
//! first half in half-space mode. Each half sums to one over its features.
use super::{FeatureMapInit, HeadProjection};
use crate::error::Result;
use tch::{nn, Tensor};

#[derive(Debug)]
pub struct Hedgehog {
    pub projection: HeadProjection,
    pub half_space: bool,
}

impl Hedgehog {
    pub fn new(
        path: &nn::Path,
        heads: i64,
        head_dim: i64,
        feature_dim: i64,
        half_space: bool,
        bias: bool,
        init: FeatureMapInit,
    ) -> Self {
        Self {
            projection: HeadProjection::new(path, heads, head_dim, feature_dim, bias, init),
            half_space,
        }
    }

    pub fn output_dim(&self) -> i64 {
        let f = self.projection.feature_dim();
        if self.half_space {
            f
        } else {
            2 * f
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.projection.forward(x)?; // (b, h, L, f)
        let kind = z.kind();
        let phi = if self.half_space {
            z.softmax(-1, kind)
        } else {
            Tensor::cat(&[z.softmax(-1, kind), (-&z).softmax(-1, kind)], -1)
        };
        Ok(phi.to_kind(x.kind()))
    }
}
