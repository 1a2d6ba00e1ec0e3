//! LoRA adapters (Hu et al. 2021) for a frozen linear layer `y = x W^T`:
//! `delta(x) = dropout(x) A^T B^T · (alpha / r)`, A (r, in) Kaiming-uniform as PEFT initialises it
//! (bound 1/√in), B (out, r) zeros, so a fresh adapter changes nothing. The variables are
//! `<path>.lora_A.weight` and `<path>.lora_B.weight`, PEFT's names.
use crate::error::{config, Result};
use crate::tensors::shape;
use serde::{Deserialize, Serialize};
use tch::nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use tch::{nn, Kind, Tensor};

/// Rank, scale and dropout of the adapters (defaults: r = 8, alpha = 16).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: i64,
    pub alpha: f64,
    pub dropout: f64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
        }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank < 1 {
            return Err(config(
                "lora.rank",
                format!("must be >= 1, got {}", self.rank),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(config(
                "lora.dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        Ok(())
    }

    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// The adapter of one linear layer.
#[derive(Debug)]
pub struct LoraLinear {
    /// A (r, in).
    pub a: Tensor,
    /// B (out, r).
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
}

impl LoraLinear {
    pub fn new(
        path: &nn::Path,
        in_features: i64,
        out_features: i64,
        cfg: &LoraConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        // PEFT: kaiming_uniform_(A, a=√5), i.e. gain √(2 / (1 + 5)).
        let init = nn::Init::Kaiming {
            dist: NormalOrUniform::Uniform,
            fan: FanInOut::FanIn,
            non_linearity: NonLinearity::ExplicitGain((1.0f64 / 3.0).sqrt()),
        };
        let a = (path / "lora_A").var("weight", &[cfg.rank, in_features], init);
        let b = (path / "lora_B").zeros("weight", &[out_features, cfg.rank]);
        Ok(Self {
            a,
            b,
            scaling: cfg.scaling(),
            dropout: cfg.dropout,
        })
    }

    /// The change to the layer's output for input `x` (..., in): (..., out) in `x`'s dtype.
    /// Dropout applies only when `train`.
    pub fn delta(&self, x: &Tensor, train: bool) -> Tensor {
        self.down(x, train).matmul(&self.scaled_up(x.kind()).tr())
    }

    /// `y + delta(x)` for `y` (..., out) in `x`'s dtype, the sum formed by the last product
    /// itself (`addmm`): no separate pass over the layer's output, forward or backward.
    pub fn add_delta(&self, x: &Tensor, y: &Tensor, train: bool) -> Tensor {
        let h = self.down(x, train); // (..., r)
        let out = y.size();
        let rank = self.a.size()[0];
        y.reshape([-1, out[out.len() - 1]])
            .addmm(&h.reshape([-1, rank]), &self.scaled_up(x.kind()).tr())
            .reshape(&out)
    }

    /// dropout(x) A^T (..., r).
    fn down(&self, x: &Tensor, train: bool) -> Tensor {
        let x = if train && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        x.matmul(&self.a.to_kind(x.kind()).tr())
    }

    /// `scaling · B` (out, r) in `kind`: the scale rides on the small matrix, not the output.
    fn scaled_up(&self, kind: Kind) -> Tensor {
        (&self.b * self.scaling).to_kind(kind)
    }

    /// `scaling · B A` (out, in) in f32 (f64 if the adapter is f64).
    pub fn delta_weight(&self) -> Tensor {
        let kind = if self.b.kind() == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        self.b.to_kind(kind).matmul(&self.a.to_kind(kind)) * self.scaling
    }

    /// Adds the adapter into a base weight (out, in) in place, so the plain layer computes
    /// base + delta.
    pub fn merge_into(&self, weight: &mut Tensor) -> Result<()> {
        self.apply_to(weight, 1.0)
    }

    /// Takes a merged adapter back out of a weight (out, in).
    pub fn unmerge_from(&self, weight: &mut Tensor) -> Result<()> {
        self.apply_to(weight, -1.0)
    }

    fn apply_to(&self, weight: &mut Tensor, sign: f64) -> Result<()> {
        let want = [self.b.size()[0], self.a.size()[1]];
        if weight.size() != want {
            return Err(shape(
                "weight",
                &format!("{want:?} (out, in) to match the adapter"),
                weight,
            ));
        }
        tch::no_grad(|| {
            let delta = self.delta_weight().to_device(weight.device());
            let merged = weight.to_kind(delta.kind()) + delta * sign;
            weight.copy_(&merged);
        });
        Ok(())
    }
}
