//! The attention-transfer wrapper of one converted layer: it runs the teacher and the student on
//! the same q, k, v, passes the teacher's output on, and in training mode backpropagates this
//! layer's loss at once, so that only one layer's student graph is alive at a time. For the KL
//! term's pass it runs the student alone and passes its output on.
use anyhow::{anyhow, ensure, Result};
use linearize_attention::linearized::{LinearizedMixer, Method};
use linearize_models::mixer::{Mixer, MixerInput, MixerState, SoftmaxMixer};
use std::sync::{Arc, Mutex};
use tch::{Kind, Tensor};

/// What the wrapped layers do with their loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum TapMode {
    /// Backpropagate `loss * backward_scale` inside the forward pass.
    Train { backward_scale: f64 },
    /// Only record the loss (the caller runs under `no_grad`).
    Eval,
    /// Run the student only and pass its output on, recording nothing: the whole converted
    /// model's forward pass, whose logits the KL term scores.
    Student,
}

/// One layer's loss terms for one forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LayerLoss {
    pub layer: usize,
    /// Mean squared error between student and teacher outputs (before o_proj).
    pub mse: f64,
    /// Cross-entropy between teacher and student attention rows, when that term is on.
    pub xent: Option<f64>,
}

/// A layer's loss terms as 0-dim tensors, read only once the whole pass is queued: reading
/// each layer's value at once would make the host wait for the device at every layer.
#[derive(Debug)]
struct PendingLoss {
    layer: usize,
    mse: Tensor,
    xent: Option<Tensor>,
}

/// Shared between the trainer and the wrapped mixers (which live inside the model).
#[derive(Debug)]
pub(crate) struct Tap {
    mode: TapMode,
    losses: Vec<PendingLoss>,
}

pub(crate) type SharedTap = Arc<Mutex<Tap>>;

pub(crate) fn new_tap() -> SharedTap {
    Arc::new(Mutex::new(Tap {
        mode: TapMode::Eval,
        losses: Vec::new(),
    }))
}

fn lock(tap: &SharedTap) -> Result<std::sync::MutexGuard<'_, Tap>> {
    tap.lock()
        .map_err(|_| anyhow!("attention-transfer tap poisoned by a panic"))
}

/// Sets the mode for the next forward passes.
pub(crate) fn set_mode(tap: &SharedTap, mode: TapMode) -> Result<()> {
    lock(tap)?.mode = mode;
    Ok(())
}

/// Runs `f` with the tap in `mode`, then puts the previous mode back, also on error.
pub(crate) fn with_mode<T>(
    tap: &SharedTap,
    mode: TapMode,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let previous = std::mem::replace(&mut lock(tap)?.mode, mode);
    let result = f();
    lock(tap)?.mode = previous;
    result
}

/// The losses recorded since the last call, in layer order of the forward pass.
pub(crate) fn take_losses(tap: &SharedTap) -> Result<Vec<LayerLoss>> {
    let pending = std::mem::take(&mut lock(tap)?.losses);
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    // One transfer for all layers' values.
    let values = |terms: Vec<&Tensor>| -> Result<Vec<f64>> {
        let stacked = Tensor::stack(&terms, 0)
            .to_kind(Kind::Double)
            .to_device(tch::Device::Cpu);
        Ok(Vec::<f64>::try_from(&stacked)?)
    };
    let mse = values(pending.iter().map(|p| &p.mse).collect())?;
    let xent: Option<Vec<&Tensor>> = pending.iter().map(|p| p.xent.as_ref()).collect();
    let xent = xent.map(values).transpose()?;
    Ok(pending
        .iter()
        .enumerate()
        .map(|(i, p)| LayerLoss {
            layer: p.layer,
            mse: mse[i],
            xent: xent.as_ref().map(|x| x[i]),
        })
        .collect())
}

/// How a layer's loss is made: `mse_factor * MSE + xent_factor * CE`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Objective {
    pub mse_factor: f64,
    /// 0 turns the attention-row cross-entropy off.
    pub xent_factor: f64,
}

/// A converted layer during stage 1.
pub(crate) struct TransferMixer {
    pub layer: usize,
    pub teacher: SoftmaxMixer,
    /// Shares its parameters with the converted layer's mixer.
    pub student: LinearizedMixer,
    pub objective: Objective,
    pub tap: SharedTap,
}

impl Mixer for TransferMixer {
    fn forward(&self, input: &MixerInput, state: Option<&mut MixerState>) -> Result<Tensor> {
        ensure!(
            state.is_none(),
            "attention transfer runs whole sequences, without a decoding state"
        );
        let mode = lock(&self.tap)?.mode;
        if mode == TapMode::Student {
            return self.student.forward(input, None);
        }
        let teacher = {
            let _range = linearize_profile::range("transfer.teacher");
            self.teacher.forward(input, None)? // (b, h, L, d)
        };
        let student_range = linearize_profile::range("transfer.student");
        // A head-level hybrid's softmax heads are the teacher's own computation: their rows of
        // the difference are zero and give the linear part no gradient, so the loss trains the
        // linear heads only (the mean still counts every head).
        let student = self.student.forward(input, None)?; // (b, h, L, d)
                                                          // The difference is rounded to the outputs' dtype (bf16: 2^-9 of itself), its mean of
                                                          // squares is summed in f32.
        let mse = (&student - &teacher).square().mean(Kind::Float);
        let xent = (self.objective.xent_factor > 0.0)
            .then(|| attention_xent(&self.student, input))
            .transpose()?;
        let loss = match &xent {
            Some(xent) => &mse * self.objective.mse_factor + xent * self.objective.xent_factor,
            None => &mse * self.objective.mse_factor,
        };
        drop(student_range);
        // With both weights 0 (a KL-only stage) the layer's loss has no gradient to give.
        let weighted = self.objective.mse_factor > 0.0 || self.objective.xent_factor > 0.0;
        if let (TapMode::Train { backward_scale }, true) = (mode, weighted) {
            let _range = linearize_profile::range("transfer.backward");
            (loss * backward_scale).f_backward()?;
        }
        lock(&self.tap)?.losses.push(PendingLoss {
            layer: self.layer,
            mse: mse.detach(),
            xent: xent.map(|x| x.detach()),
        });
        Ok(teacher)
    }

    fn new_state(&self, _batch: i64) -> Result<MixerState> {
        Err(anyhow!(
            "layer {} is being trained (attention transfer) and cannot decode",
            self.layer
        ))
    }

    fn name(&self) -> String {
        format!(
            "transfer({} <- {})",
            self.student.name(),
            self.teacher.name()
        )
    }
}

/// Hedgehog's attention-row cross-entropy `mean_t -sum_s p_ts log a_ts` between the teacher's
/// causal softmax weights `p` and the student's normalised linear-attention weights `a`, both
/// (b, h, L, L) in f32. Only for the `linear` method (the trainer checks method and length).
pub(crate) fn attention_xent(student: &LinearizedMixer, input: &MixerInput) -> Result<Tensor> {
    let mut teacher = softmax_weights(input.q, input.k);
    let mut weights = linear_weights(student, input)?;
    if !student.softmax_heads().is_empty() {
        // The softmax heads of a head-level hybrid do not use their linear weights.
        let linear: Vec<i64> = student.linear_heads().iter().map(|&h| h as i64).collect();
        let linear = Tensor::from_slice(&linear).to_device(teacher.device());
        teacher = teacher.index_select(1, &linear);
        weights = weights.index_select(1, &linear);
    }
    let student = weights;
    let tiny = 1e-12;
    Ok(-(teacher * (student + tiny).log())
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float))
}

/// Causal `softmax(q k^T / sqrt(d))`, (b, h, L, L) in f32, key heads repeated for GQA.
pub(crate) fn softmax_weights(q: &Tensor, k: &Tensor) -> Tensor {
    let (heads, len, d) = (q.size()[1], q.size()[2], q.size()[3]);
    let k = repeat_kv(&k.to_kind(Kind::Float), heads);
    let scores = q.to_kind(Kind::Float).matmul(&k.transpose(-1, -2)) / (d as f64).sqrt();
    let future = Tensor::ones([len, len], (Kind::Bool, q.device())).triu(1);
    scores
        .masked_fill(&future, f64::NEG_INFINITY)
        .softmax(-1, Kind::Float)
}

/// The `linear` method's weights `φq_t·φk_s / (sum_{s'<=t} φq_t·φk_s' + eps)`, (b, h, L, L) in
/// f32 (the rows of the L x L matrix of `linear_attn::naive`).
pub(crate) fn linear_weights(student: &LinearizedMixer, input: &MixerInput) -> Result<Tensor> {
    let (Method::Linear, Some((map_q, map_k))) = (student.method(), student.feature_maps()) else {
        return Err(anyhow!(
            "attention-row cross-entropy is implemented for the `linear` method only, not {}",
            student.name()
        ));
    };
    let eps = student.config().linear_attn_config().eps;
    let phi_q = map_q.forward(input.q)?.to_kind(Kind::Float); // (b, h, L, f)
    let phi_k = map_k.forward(input.k)?.to_kind(Kind::Float); // (b, h, L, f)
    let len = phi_q.size()[2];
    let future = Tensor::ones([len, len], (Kind::Bool, phi_q.device())).triu(1);
    let a = phi_q
        .matmul(&phi_k.transpose(-1, -2))
        .masked_fill(&future, 0.0); // (b, h, L, L)
    let den = a.sum_dim_intlist(-1, true, Kind::Float) + eps;
    Ok(a / den)
}

/// Hugging Face's `repeat_kv`: head `i` of the result is head `i / (heads / h_kv)` of `x`.
fn repeat_kv(x: &Tensor, heads: i64) -> Tensor {
    let have = x.size()[1];
    if have == heads {
        return x.shallow_clone();
    }
    x.repeat_interleave_self_int(heads / have, 1, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use linearize_attention::feature_map::{FeatureMapConfig, FeatureMapInit};
    use linearize_attention::linearized::{AttentionConfig, LayerShape};
    use linearize_attention::ops::linear_attn;
    use tch::{nn, Device};

    fn shape() -> LayerShape {
        LayerShape {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            sliding_window: None,
        }
    }

    fn linear_config() -> AttentionConfig {
        AttentionConfig {
            feature_map: Some(FeatureMapConfig::Hedgehog {
                feature_dim: 4,
                half_space: false,
                bias: false,
                init: FeatureMapInit::Kaiming,
            }),
            eps: Some(1e-6),
            ..AttentionConfig::new(Method::Linear)
        }
    }

    fn qkv() -> (Tensor, Tensor, Tensor) {
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        (
            Tensor::randn([2, 4, 7, 8], opts),
            Tensor::randn([2, 2, 7, 8], opts),
            Tensor::randn([2, 2, 7, 8], opts),
        )
    }

    fn input<'a>(q: &'a Tensor, k: &'a Tensor, v: &'a Tensor) -> MixerInput<'a> {
        MixerInput {
            q,
            k,
            v,
            q_raw: q,
            k_raw: k,
            offset: 0,
            position: None,
        }
    }

    #[test]
    fn weights_reproduce_the_kernels() {
        let vs = nn::VarStore::new(Device::Cpu);
        let student = LinearizedMixer::new(&vs.root(), &shape(), &linear_config()).unwrap();
        let (q, k, v) = qkv();
        let x = input(&q, &k, &v);
        let v_rep = repeat_kv(&v, 4);

        let a = linear_weights(&student, &x).unwrap();
        let (map_q, map_k) = student.feature_maps().unwrap();
        let want = linear_attn::naive(
            &map_q.forward(&q).unwrap(),
            &map_k.forward(&k).unwrap(),
            &v,
            &student.config().linear_attn_config(),
        )
        .unwrap();
        assert!(a.matmul(&v_rep).allclose(&want, 1e-5, 1e-5, false));

        let p = softmax_weights(&q, &k);
        let teacher = SoftmaxMixer::new(None).forward(&x, None).unwrap();
        assert!(p.matmul(&v_rep).allclose(&teacher, 1e-5, 1e-5, false));
        let rows = p.sum_dim_intlist(-1, false, Kind::Float);
        assert!(rows.allclose(&rows.ones_like(), 1e-5, 1e-5, false));
    }

    #[test]
    fn xent_of_a_head_hybrid_counts_its_linear_heads_only() {
        let vs = nn::VarStore::new(Device::Cpu);
        let plain = LinearizedMixer::new(&vs.root(), &shape(), &linear_config()).unwrap();
        let hybrid = plain.with_softmax_heads(Some(vec![1])).unwrap();
        let (q, k, v) = qkv();
        let x = input(&q, &k, &v);
        let linear = Tensor::from_slice(&[0i64, 2, 3]);
        let p = softmax_weights(&q, &k).index_select(1, &linear);
        let a = linear_weights(&plain, &x).unwrap().index_select(1, &linear);
        let want = -(p * (a + 1e-12).log())
            .sum_dim_intlist(-1, false, Kind::Float)
            .mean(Kind::Float);
        let got = attention_xent(&hybrid, &x).unwrap();
        assert!(got.allclose(&want, 1e-6, 1e-6, false));
        let all = attention_xent(&plain, &x).unwrap();
        assert!(!got.allclose(&all, 1e-6, 1e-6, false));
    }

    #[test]
    fn xent_is_smallest_for_matching_rows_and_refuses_other_methods() {
        let vs = nn::VarStore::new(Device::Cpu);
        let student = LinearizedMixer::new(&vs.root(), &shape(), &linear_config()).unwrap();
        let (q, k, v) = qkv();
        let x = input(&q, &k, &v);
        let p = softmax_weights(&q, &k);
        let entropy = -(&p * (&p + 1e-12).log())
            .sum_dim_intlist(-1, false, Kind::Float)
            .mean(Kind::Float);
        let xent = attention_xent(&student, &x).unwrap();
        // Gibbs: the cross-entropy is at least the teacher rows' entropy.
        assert!(xent.double_value(&[]) > entropy.double_value(&[]) + 1e-3);

        let lolcats = LinearizedMixer::new(
            &vs.root().sub("other"),
            &shape(),
            &AttentionConfig::new(Method::Lolcats),
        )
        .unwrap();
        let e = attention_xent(&lolcats, &x).unwrap_err().to_string();
        assert!(e.contains("`linear` method only"), "{e}");
    }
}
