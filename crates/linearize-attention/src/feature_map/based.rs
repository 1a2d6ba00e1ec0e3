//! Based (Arora et al. 2024): the 2nd-order Taylor map
//! `φ(x) = [1, x / d^¼, vec(x ⊗ x) / (√2 · √d)]`, so that
//! `φ(q)·φ(k) = 1 + s + s²/2` with `s = q·k/√d`, the Taylor expansion of `exp(s)`.
use super::MapInput;
use crate::error::Result;
use tch::Tensor;

#[derive(Clone, Debug)]
pub struct Based {
    input: MapInput,
}

impl Based {
    pub fn new(heads: i64, head_dim: i64) -> Self {
        Self {
            input: MapInput { heads, head_dim },
        }
    }

    pub fn output_dim(&self) -> i64 {
        let d = self.input.head_dim;
        1 + d + d * d
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.input.prepare(x)?; // (b, h, L, d)
        let d = self.input.head_dim as f64;
        let outer = (z.unsqueeze(-1) * z.unsqueeze(-2)).flatten(-2, -1); // (b, h, L, d²)
        let phi = Tensor::cat(
            &[
                z.narrow(-1, 0, 1).ones_like(),
                &z / d.powf(0.25),
                outer / (2f64.sqrt() * d.sqrt()),
            ],
            -1,
        );
        Ok(phi.to_kind(x.kind()))
    }
}
