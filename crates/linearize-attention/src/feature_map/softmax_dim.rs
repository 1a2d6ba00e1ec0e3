//! Liger's parameter-free map: `φ(x) = softmax_d(x)` over the head dimension.
use super::MapInput;
use crate::error::Result;
use tch::Tensor;

#[derive(Clone, Debug)]
pub struct SoftmaxDim {
    input: MapInput,
}

impl SoftmaxDim {
    pub fn new(heads: i64, head_dim: i64) -> Self {
        Self {
            input: MapInput { heads, head_dim },
        }
    }

    pub fn output_dim(&self) -> i64 {
        self.input.head_dim
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.input.prepare(x)?;
        let kind = z.kind();
        Ok(z.softmax(-1, kind).to_kind(x.kind()))
    }
}
