//! The LoRA stage's objective: next-token cross-entropy, KL divergence to the teacher's
//! next-token distribution, or a weighted sum.
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

/// A single loss by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossName {
    Xent,
    Kl,
}

/// `xent`, `kl`, or `{xent: w1, kl: w2}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LossSpec {
    Name(LossName),
    Mix(LossMix),
}

/// Weights of the two losses; an absent one is 0.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossMix {
    #[serde(default)]
    pub xent: f64,
    #[serde(default)]
    pub kl: f64,
}

/// KL to the teacher: the student is trained to predict what the teacher predicts, not the
/// training text. Cross-entropy on the text also adapts the model to the corpus's domain, which
/// lowers perplexity there while the student drifts from its teacher elsewhere (docs/RESULTS.md).
impl Default for LossSpec {
    fn default() -> Self {
        Self::Name(LossName::Kl)
    }
}

impl LossSpec {
    /// `(cross-entropy weight, KL weight)`.
    pub fn weights(&self) -> (f64, f64) {
        match *self {
            Self::Name(LossName::Xent) => (1.0, 0.0),
            Self::Name(LossName::Kl) => (0.0, 1.0),
            Self::Mix(LossMix { xent, kl }) => (xent, kl),
        }
    }

    /// Whether the teacher's logits are needed.
    pub fn uses_teacher(&self) -> bool {
        self.weights().1 > 0.0
    }

    pub fn validate(&self) -> Result<()> {
        let (xent, kl) = self.weights();
        for (key, value) in [("loss.xent", xent), ("loss.kl", kl)] {
            ensure!(
                value.is_finite() && value >= 0.0,
                "{key} must be >= 0, got {value}"
            );
        }
        ensure!(
            xent > 0.0 || kl > 0.0,
            "loss.xent and loss.kl are both 0: nothing to train"
        );
        Ok(())
    }

    /// `xent * lm_loss + kl * kl_value` of measured values.
    pub fn combine_values(&self, lm_loss: f64, kl: Option<f64>) -> f64 {
        let (w_xent, w_kl) = self.weights();
        w_xent * lm_loss + w_kl * kl.unwrap_or(0.0)
    }

    /// `xent * lm_loss + kl * kl_value`, for backpropagation.
    pub(crate) fn combine(&self, lm_loss: &Tensor, kl: Option<&Tensor>) -> Tensor {
        let (w_xent, w_kl) = self.weights();
        match kl {
            Some(kl) if w_kl > 0.0 => lm_loss * w_xent + kl * w_kl,
            _ => lm_loss * w_xent,
        }
    }
}

/// Model inputs and the positions scored: with next-token targets, `tokens` (b, L+1) gives
/// inputs `[.., :L]` and targets `[.., 1:]` on all L positions; without, `tokens` (b, L) is
/// the input and positions `0..L-1` predict tokens `1..L`.
pub(crate) struct Scored {
    /// (b, L) model input.
    pub inputs: Tensor,
    /// (b, n) targets of the first n positions of the logits.
    pub targets: Tensor,
}

impl Scored {
    pub fn new(tokens: &Tensor, seq_len: usize) -> Result<Self> {
        let width = tokens.size()[1];
        let len = seq_len as i64;
        ensure!(
            width == len || width == len + 1,
            "sequences of {width} tokens, expected {len} or {} (seq_len {len})",
            len + 1
        );
        ensure!(
            width >= 2,
            "next-token loss needs sequences of at least 2 tokens"
        );
        Ok(Self {
            inputs: tokens.narrow(1, 0, len),
            targets: tokens.narrow(1, 1, width - 1),
        })
    }

    /// The first `targets.size()[1]` positions of `logits` (b, L, V).
    pub fn positions(&self, logits: &Tensor) -> Tensor {
        logits.narrow(1, 0, self.targets.size()[1])
    }
}

/// Mean next-token cross-entropy of `logits` (b, n, V) f32 against `targets` (b, n).
pub(crate) fn lm_loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = logits.size()[2];
    logits.view([-1, vocab]).cross_entropy_loss::<Tensor>(
        &targets.reshape([-1]).to_device(logits.device()),
        None,
        Reduction::Mean,
        -100,
        0.0,
    )
}

/// Mean over positions of KL(teacher || student) = sum_v p_t (log p_t - log p_s), both (b, n, V)
/// f32 logits.
pub(crate) fn kl_to_teacher(student: &Tensor, teacher: &Tensor) -> Tensor {
    let log_p_s = student.log_softmax(-1, Kind::Float);
    let log_p_t = teacher.log_softmax(-1, Kind::Float);
    (log_p_t.exp() * (&log_p_t - log_p_s))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn specs_parse_and_weigh() {
        let spec: LossSpec = serde_json::from_str("\"kl\"").unwrap();
        assert_eq!(spec.weights(), (0.0, 1.0));
        assert!(spec.uses_teacher());
        let spec: LossSpec = serde_json::from_str(r#"{"xent": 0.5, "kl": 2}"#).unwrap();
        assert_eq!(spec.weights(), (0.5, 2.0));
        assert_eq!(LossSpec::default().weights(), (0.0, 1.0));
        let e = LossSpec::Mix(LossMix { xent: 0.0, kl: 0.0 })
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("nothing to train"), "{e}");
        assert!(serde_json::from_str::<LossSpec>("\"mse\"").is_err());
        assert!(serde_json::from_str::<LossSpec>(r#"{"mse": 1}"#).is_err());
    }

    #[test]
    fn kl_is_zero_for_equal_logits_and_positive_otherwise() {
        tch::manual_seed(0);
        let a = Tensor::randn([2, 3, 7], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([2, 3, 7], (Kind::Float, Device::Cpu));
        assert!(kl_to_teacher(&a, &a).double_value(&[]).abs() < 1e-6);
        assert!(kl_to_teacher(&a, &b).double_value(&[]) > 1e-3);
    }

    #[test]
    fn scored_positions_with_and_without_targets() {
        let tokens = Tensor::arange(10, (Kind::Int64, Device::Cpu)).view([2, 5]);
        let with = Scored::new(&tokens, 4).unwrap();
        assert_eq!(
            (with.inputs.size(), with.targets.size()),
            (vec![2, 4], vec![2, 4])
        );
        let without = Scored::new(&tokens, 5).unwrap();
        assert_eq!(without.inputs.size(), [2, 5]);
        assert_eq!(without.targets.size(), [2, 4]);
        assert!(Scored::new(&tokens, 2).is_err());
    }
}
