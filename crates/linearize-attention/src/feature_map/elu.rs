//! Katharopoulos et al. (2020): `φ(x) = elu(x) + 1`, positive and parameter-free.
use super::MapInput;
use crate::error::Result;
use tch::Tensor;

#[derive(Clone, Debug)]
pub struct OnePlusElu {
    input: MapInput,
}

impl OnePlusElu {
    pub fn new(heads: i64, head_dim: i64) -> Self {
        Self {
            input: MapInput { heads, head_dim },
        }
    }

    pub fn output_dim(&self) -> i64 {
        self.input.head_dim
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok((self.input.prepare(x)?.elu() + 1.0).to_kind(x.kind()))
    }
}
