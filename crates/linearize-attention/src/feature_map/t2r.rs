//! T2R (Kasai et al. 2021): `φ(x) = relu(xW + b)`.
use super::{FeatureMapInit, HeadProjection};
use crate::error::Result;
use tch::{nn, Tensor};

#[derive(Debug)]
pub struct T2r {
    pub projection: HeadProjection,
}

impl T2r {
    pub fn new(
        path: &nn::Path,
        heads: i64,
        head_dim: i64,
        feature_dim: i64,
        bias: bool,
        init: FeatureMapInit,
    ) -> Self {
        Self {
            projection: HeadProjection::new(path, heads, head_dim, feature_dim, bias, init),
        }
    }

    pub fn output_dim(&self) -> i64 {
        self.projection.feature_dim()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.projection.forward(x)?.relu().to_kind(x.kind()))
    }
}
