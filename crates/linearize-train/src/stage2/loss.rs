//! The LoRA stage's objective: next-token cross-entropy, KL divergence to the teacher's
//! next-token distribution, or a weighted sum.
use anyhow::{ensure, Result};
use linearize_models::llama::Model;
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
}

/// Mean next-token cross-entropy of `logits` (.., V) f32 against `targets` (..).
pub(crate) fn lm_loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = *logits
        .size()
        .last()
        .expect("logits have a vocabulary dimension");
    logits.reshape([-1, vocab]).cross_entropy_loss::<Tensor>(
        &targets.reshape([-1]).to_device(logits.device()),
        None,
        Reduction::Mean,
        -100,
        0.0,
    )
}

/// Mean over positions of KL(teacher || student) = sum_v p_t (log p_t - log p_s), both (.., V)
/// f32 logits.
pub(crate) fn kl_to_teacher(student: &Tensor, teacher: &Tensor) -> Tensor {
    let log_p_s = student.log_softmax(-1, Kind::Float);
    let log_p_t = teacher.log_softmax(-1, Kind::Float);
    (log_p_t.exp() * (&log_p_t - log_p_s))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float)
}

/// Mean losses of one micro-batch (or validation batch).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Losses {
    pub lm: f64,
    /// With a teacher.
    pub kl: Option<f64>,
    /// The weighted objective.
    pub loss: f64,
}

/// The objective over the scored positions, computed from final hidden states `chunk` tokens
/// at a time: at most one chunk's (tokens, V) f32 logits (and their softmaxes and gradient)
/// exist at once instead of the whole batch's, which for a large vocabulary is most of the
/// training memory. Each chunk's mean is weighted by its share of the tokens, so the chunks sum
/// to the batch's mean.
pub(crate) struct ChunkedLoss<'a> {
    pub model: &'a Model,
    pub spec: &'a LossSpec,
    /// Tokens per chunk (>= 1).
    pub chunk: usize,
}

impl ChunkedLoss<'_> {
    /// The mean losses of `hidden` (b, L, hidden), the student's final hidden states, against
    /// `targets` (b, n) on its first n positions, and KL to the logits of `teacher` (b, L,
    /// hidden), the teacher's final hidden states, where given (the teacher's LM head is the
    /// student's: LoRA only adapts projections of the decoder layers, `lora.targets`). With `grad_scale`, also the
    /// gradient of `grad_scale * objective` with respect to `hidden`'s first n positions (b, n,
    /// hidden), each chunk backpropagated through the LM head on its own (into the head's
    /// weights too, where they require gradients); without, nothing is recorded for autograd.
    pub fn evaluate(
        &self,
        hidden: &Tensor,
        teacher: Option<&Tensor>,
        targets: &Tensor,
        grad_scale: Option<f64>,
    ) -> Result<(Losses, Option<Tensor>)> {
        ensure!(self.chunk >= 1, "loss_chunk must be >= 1");
        let (b, n) = targets.size2()?;
        let width = *hidden
            .size()
            .last()
            .expect("hidden states are (b, L, hidden)");
        let total = b * n;
        // (b * n, hidden): the scored positions, flattened so that a chunk may span sequences.
        let flat = |h: &Tensor| h.narrow(1, 0, n).reshape([total, width]);
        let student = flat(&hidden.detach());
        let teacher = teacher.map(flat);
        let targets = targets.reshape([total]).to_device(hidden.device());
        // Read once at the end: a read per chunk would wait for the device at every chunk.
        let zero = || Tensor::zeros([], (Kind::Float, hidden.device()));
        let (mut lm_sum, mut kl_sum) = (zero(), zero());
        let mut grads = Vec::new();
        let mut start = 0;
        while start < total {
            let len = (self.chunk as i64).min(total - start);
            let share = len as f64 / total as f64;
            // The teacher's logits are constants of the objective.
            let teacher_logits = teacher
                .as_ref()
                .map(|t| tch::no_grad(|| self.model.logits(&t.narrow(0, start, len))));
            let leaf = student
                .narrow(0, start, len)
                .detach()
                .set_requires_grad(grad_scale.is_some()); // (len, hidden)
            let logits = self.model.logits(&leaf); // (len, V) f32
            let lm = lm_loss(&logits, &targets.narrow(0, start, len));
            let kl = teacher_logits.map(|t| kl_to_teacher(&logits, &t));
            lm_sum += lm.detach() * share;
            if let Some(kl) = &kl {
                kl_sum += kl.detach() * share;
            }
            if let Some(scale) = grad_scale {
                (self.spec.combine(&lm, kl.as_ref()) * (scale * share)).f_backward()?;
                grads.push(leaf.grad());
            }
            start += len;
        }
        let lm = lm_sum.double_value(&[]);
        let kl = teacher.map(|_| kl_sum.double_value(&[]));
        let losses = Losses {
            lm,
            kl,
            loss: self.spec.combine_values(lm, kl),
        };
        let grad = grad_scale.map(|_| Tensor::cat(&grads, 0).view([b, n, width]));
        Ok((losses, grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LoraAdapters, LoraSettings, LORA_TARGETS};
    use linearize_models::config::ModelConfig;
    use serde_json::json;
    use std::collections::BTreeMap;
    use tch::Device;

    const VOCAB: i64 = 97;

    /// A tiny model of `model_type` with LoRA on every projection, B drawn at random so that
    /// both A and B get gradients.
    fn model_with_lora(model_type: &str, extra: serde_json::Value) -> (Model, LoraAdapters) {
        let mut cfg = json!({
            "model_type": model_type, "vocab_size": VOCAB, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 32, "initializer_range": 0.2,
        });
        cfg.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        tch::manual_seed(5);
        let cfg = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
        let mut model = Model::new(&cfg, Device::Cpu, Kind::Float).unwrap();
        let settings = LoraSettings {
            targets: LORA_TARGETS.map(String::from).to_vec(),
            ..LoraSettings::default()
        };
        let lora = LoraAdapters::install(&mut model, &settings, 6).unwrap();
        tch::no_grad(|| {
            for (name, mut t) in lora.named_parameters() {
                if name.ends_with("lora_B.weight") {
                    t.copy_(&(Tensor::randn_like(&t) * 0.1));
                }
            }
        });
        lora.attach(&mut model, true).unwrap();
        (model, lora)
    }

    /// Every adapter tensor's gradient after `run`, from cleared gradients.
    fn lora_gradients(lora: &LoraAdapters, run: impl FnOnce()) -> BTreeMap<String, Tensor> {
        for (_, t) in lora.named_parameters() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        run();
        lora.named_parameters()
            .into_iter()
            .map(|(name, t)| (name, t.grad().copy()))
            .collect()
    }

    fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
        let scale = a.abs().max().double_value(&[]).max(1e-12);
        (a - b).abs().max().double_value(&[]) / scale
    }

    /// The chunked loss equals the whole batch's, in value and in every adapter's gradient, for
    /// each objective and chunk sizes that do and do not divide the scored tokens; with and
    /// without next-token targets (all L positions scored, or the first L - 1); and with Gemma's
    /// final soft cap, which the chunks' logits must apply as the model does.
    #[test]
    fn chunked_loss_matches_the_whole_batch() {
        let models = [
            model_with_lora("llama", json!({})),
            model_with_lora(
                "gemma3_text",
                json!({"head_dim": 8, "sliding_window": 3, "sliding_window_pattern": 2,
                       "rope_local_base_freq": 100.0, "query_pre_attn_scalar": 12,
                       "final_logit_softcapping": 5.0}),
            ),
        ];
        let specs = [
            LossSpec::Name(LossName::Xent),
            LossSpec::Name(LossName::Kl),
            LossSpec::Mix(LossMix { xent: 0.3, kl: 1.5 }),
        ];
        let (b, len) = (2, 7);
        for (model, lora) in &models {
            let family = format!("{:?}", model.config().family);
            for (case, spec) in specs.iter().enumerate() {
                tch::manual_seed(10 + case as i64);
                // Width len + 1 (next-token targets) or len (the last position is not scored).
                let width = len + (case as i64 % 2 == 0) as i64;
                let tokens = Tensor::randint(VOCAB, [b, width], (Kind::Int64, Device::Cpu));
                let scored = Scored::new(&tokens, len as usize).unwrap();
                let n = scored.targets.size()[1];
                let teacher = spec.uses_teacher().then(|| {
                    Tensor::randn(
                        [b, len, model.config().hidden_size],
                        (Kind::Float, Device::Cpu),
                    )
                });
                let scale = 0.5;
                let mut whole = 0.0;
                let reference = lora_gradients(lora, || {
                    let logits = model.forward(&scored.inputs, None).unwrap().narrow(1, 0, n);
                    let lm = lm_loss(&logits, &scored.targets);
                    let kl = teacher.as_ref().map(|t| {
                        let t = tch::no_grad(|| model.logits(t)).narrow(1, 0, n);
                        kl_to_teacher(&logits, &t)
                    });
                    let loss = spec.combine(&lm, kl.as_ref());
                    whole = loss.double_value(&[]);
                    (loss * scale).backward();
                });
                for chunk in [1, 5, (b * n) as usize, 1000] {
                    let chunked = ChunkedLoss { model, spec, chunk };
                    let mut losses = None;
                    let gradients = lora_gradients(lora, || {
                        let hidden = model.hidden_states(&scored.inputs, None).unwrap();
                        let (value, grad) = chunked
                            .evaluate(&hidden, teacher.as_ref(), &scored.targets, Some(scale))
                            .unwrap();
                        losses = Some(value);
                        (hidden.narrow(1, 0, n) * grad.unwrap())
                            .sum(Kind::Float)
                            .backward();
                    });
                    let losses = losses.unwrap();
                    let what = format!("{family} {spec:?} chunk {chunk}");
                    assert!(
                        (losses.loss - whole).abs() <= 1e-5 * whole.abs(),
                        "{what}: loss {} vs {whole}",
                        losses.loss
                    );
                    assert_eq!(losses.kl.is_some(), spec.uses_teacher(), "{what}");
                    let (no_grad, _) = tch::no_grad(|| {
                        let hidden = model.hidden_states(&scored.inputs, None).unwrap();
                        chunked.evaluate(&hidden, teacher.as_ref(), &scored.targets, None)
                    })
                    .unwrap();
                    assert!(
                        (no_grad.loss - losses.loss).abs() <= 1e-6 * whole.abs(),
                        "{what}: validation {} vs {}",
                        no_grad.loss,
                        losses.loss
                    );
                    for (name, g) in &reference {
                        let diff = relative_diff(g, &gradients[name]);
                        assert!(
                            g.abs().max().double_value(&[]) > 0.0 && diff <= 1e-5,
                            "{what}: {name} differs by {diff:e} (relative)"
                        );
                    }
                }
            }
        }
    }

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
