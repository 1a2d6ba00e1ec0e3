//! AdamW over named trainable tensors, with its state exposed for checkpoints and fp32 master
//! values for parameters stored in bf16/f16.
//!
//! tch's built-in optimizer hides its moments, so a checkpoint could not carry them; this one keeps
//! them in plain tensors. By default the update is libtorch's fused multi-tensor AdamW kernel
//! (`_fused_adamw_`, bound through `linearize-torch-ext` since tch does not bind it): a few kernels
//! per step instead of about ten per tensor, which matters for LoRA's hundreds of small tensors.
//! `fused: false` runs the same update tensor by tensor with in-place ops.
//!
//! Gradient accumulation: the trainer scales the loss by `1 / accumulation_steps` before each
//! backward pass; [`AdamW::step`] applies the accumulated gradient as it finds it. Clipping
//! ([`Trainable::clip_grad_norm`]) therefore sees the gradient of the mean loss.
mod frozen;
mod trainable;

pub use frozen::FrozenSnapshot;
pub use trainable::Trainable;

use anyhow::{bail, ensure, Context, Result};
use linearize_torch_ext::AdamWStep;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// AdamW hyper-parameters (a stage's `optimizer` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    /// Peak learning rate; the schedule scales it step by step (LoLCATs: 1e-2 for attention
    /// transfer, 1e-4 for LoRA).
    pub lr: f64,
    /// Decay rates of the running first and second moments of the gradient.
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// Added to the bias-corrected root of the second moment, keeps the update finite.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Decoupled weight decay: every step multiplies each parameter by `1 - lr * weight_decay`
    /// before the Adam update. Default 0 (LoLCATs trains without it).
    #[serde(default)]
    pub weight_decay: f64,
    /// One fused multi-tensor kernel per device and dtype (default), or tensor by tensor.
    #[serde(default = "default_fused")]
    pub fused: bool,
}

fn default_fused() -> bool {
    true
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}

fn default_eps() -> f64 {
    1e-8
}

impl AdamWConfig {
    /// A config with `lr` and the defaults of the other fields.
    pub fn with_lr(lr: f64) -> Self {
        Self {
            lr,
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
            fused: default_fused(),
        }
    }

    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "optimizer.lr must be > 0, got {}",
            self.lr
        );
        for (i, beta) in self.betas.iter().enumerate() {
            ensure!(
                (0.0..1.0).contains(beta),
                "optimizer.betas[{i}] must be in [0, 1), got {beta}"
            );
        }
        ensure!(
            self.eps.is_finite() && self.eps > 0.0,
            "optimizer.eps must be > 0, got {}",
            self.eps
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "optimizer.weight_decay must be >= 0, got {}",
            self.weight_decay
        );
        Ok(())
    }
}

/// Per-parameter optimizer state.
struct Slot {
    /// fp32 copy of a bf16/f16 parameter: updates accumulate here, the parameter is a rounding of it.
    master: Option<Tensor>,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Updates applied to this parameter (a parameter without a gradient is skipped, as in torch).
    step: i64,
    /// `step` as the f32 scalar on the parameter's device that the fused kernel reads and advances.
    step_count: Tensor,
}

/// AdamW (Loshchilov & Hutter), the same update as `torch.optim.AdamW` (no amsgrad).
pub struct AdamW {
    config: AdamWConfig,
    lr: f64,
    params: Trainable,
    slots: Vec<Slot>,
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const MASTER: &str = "master";
const STEP: &str = "step";

impl AdamW {
    /// An optimizer over `params` with zero moments; the learning rate starts at `config.lr`.
    pub fn new(params: &Trainable, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let slots = tch::no_grad(|| {
            params
                .named()
                .iter()
                .map(|(name, param)| {
                    let kind = compute_kind(name, param)?;
                    let master = (param.kind() != kind)
                        .then(|| param.f_to_kind(kind)?.f_detach()?.f_contiguous())
                        .transpose()?;
                    Ok(Slot {
                        master,
                        exp_avg: param.f_zeros_like()?.f_to_kind(kind)?,
                        exp_avg_sq: param.f_zeros_like()?.f_to_kind(kind)?,
                        step: 0,
                        step_count: Tensor::f_zeros([], (Kind::Float, param.device()))?,
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(Self {
            lr: config.lr,
            config,
            params: params.clone(),
            slots,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The parameters this optimizer updates.
    pub fn params(&self) -> &Trainable {
        &self.params
    }

    /// The learning rate the next [`AdamW::step`] uses.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate for the next steps (the schedule calls this every step).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// Clears the accumulated gradients (see [`Trainable::zero_grad`]).
    pub fn zero_grad(&self) {
        self.params.zero_grad();
    }

    /// Applies one AdamW update from the accumulated gradients. Parameters with no gradient are
    /// left alone and their step count is not advanced.
    pub fn step(&mut self) -> Result<()> {
        let hyper = AdamWStep {
            lr: self.lr,
            betas: self.config.betas,
            eps: self.config.eps,
            weight_decay: self.config.weight_decay,
        };
        tch::no_grad(|| {
            if self.config.fused {
                return fused_update(self.params.named(), &mut self.slots, &hyper);
            }
            for ((name, param), slot) in self.params.named().iter().zip(&mut self.slots) {
                update(param, slot, &hyper).with_context(|| format!("AdamW step of '{name}'"))?;
            }
            Ok(())
        })
    }

    /// The optimizer state as named tensors, for a checkpoint: `<param>.exp_avg`,
    /// `<param>.exp_avg_sq`, `<param>.step` (int64 scalar) and, for bf16/f16 parameters,
    /// `<param>.master`. The tensors share storage with the live state: write them out before the
    /// next step.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(self.slots.len() * 4);
        for ((name, _), slot) in self.params.named().iter().zip(&self.slots) {
            out.push((format!("{name}.{EXP_AVG}"), slot.exp_avg.shallow_clone()));
            out.push((
                format!("{name}.{EXP_AVG_SQ}"),
                slot.exp_avg_sq.shallow_clone(),
            ));
            out.push((format!("{name}.{STEP}"), Tensor::from(slot.step)));
            if let Some(master) = &slot.master {
                out.push((format!("{name}.{MASTER}"), master.shallow_clone()));
            }
        }
        out
    }

    /// Restores a state written by [`AdamW::state_tensors`] (tensors may live on any device).
    /// Everything is checked before anything changes: a missing, mis-shaped, non-float or
    /// unexpected tensor is an error naming it. A restored master value is copied into its
    /// parameter too.
    pub fn load_state(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        let mut given: HashMap<&str, &Tensor> = HashMap::with_capacity(named.len());
        for (key, tensor) in named {
            ensure!(
                given.insert(key.as_str(), tensor).is_none(),
                "optimizer state: tensor '{key}' appears twice"
            );
        }
        let mut take = |key: String, expected: &[i64]| -> Result<Tensor> {
            let tensor = given
                .remove(key.as_str())
                .with_context(|| format!("optimizer state: missing tensor '{key}'"))?;
            ensure!(
                tensor.size() == expected,
                "optimizer state: '{key}' has shape {:?}, expected {expected:?}",
                tensor.size()
            );
            Ok(tensor.shallow_clone())
        };
        let mut loaded = Vec::with_capacity(self.slots.len());
        for ((name, param), slot) in self.params.named().iter().zip(&self.slots) {
            let shape = param.size();
            let exp_avg = take(format!("{name}.{EXP_AVG}"), &shape)?;
            let exp_avg_sq = take(format!("{name}.{EXP_AVG_SQ}"), &shape)?;
            let step = take(format!("{name}.{STEP}"), &[])?;
            let master = slot
                .master
                .as_ref()
                .map(|_| take(format!("{name}.{MASTER}"), &shape))
                .transpose()?;
            for (what, tensor) in [
                ("exp_avg", Some(&exp_avg)),
                ("exp_avg_sq", Some(&exp_avg_sq)),
                ("master", master.as_ref()),
            ] {
                if let Some(tensor) = tensor {
                    ensure!(
                        tensor.is_floating_point(),
                        "optimizer state: '{name}.{what}' has dtype {:?}, expected a float type",
                        tensor.kind()
                    );
                }
            }
            ensure!(
                step.kind() == Kind::Int64,
                "optimizer state: '{name}.{STEP}' has dtype {:?}, expected Int64",
                step.kind()
            );
            let step = step.int64_value(&[]);
            ensure!(
                step >= 0,
                "optimizer state: '{name}.{STEP}' is {step}, expected >= 0"
            );
            loaded.push((exp_avg, exp_avg_sq, step, master));
        }
        if let Some(key) = given.keys().min() {
            bail!(
                "optimizer state: unexpected tensor '{key}' (no such trainable parameter or field)"
            );
        }
        tch::no_grad(|| {
            for (((_, param), slot), (exp_avg, exp_avg_sq, step, master)) in
                self.params.named().iter().zip(&mut self.slots).zip(loaded)
            {
                slot.exp_avg.f_copy_(&exp_avg)?;
                slot.exp_avg_sq.f_copy_(&exp_avg_sq)?;
                slot.step = step;
                let _ = slot.step_count.f_fill_(step as f64)?;
                if let (Some(dst), Some(src)) = (slot.master.as_mut(), master) {
                    dst.f_copy_(&src)?;
                    param.shallow_clone().f_copy_(dst)?;
                }
            }
            Ok(())
        })
    }
}

/// Every parameter with a gradient updated by `_fused_adamw_`, one call per device and dtype;
/// bf16 / f16 parameters are then rounded from their master values in one multi-tensor copy.
fn fused_update(params: &[(String, Tensor)], slots: &mut [Slot], hyper: &AdamWStep) -> Result<()> {
    #[derive(Default)]
    struct Group<'a> {
        targets: Vec<&'a Tensor>,
        grads: Vec<Tensor>,
        exp_avgs: Vec<&'a Tensor>,
        exp_avg_sqs: Vec<&'a Tensor>,
        steps: Vec<&'a Tensor>,
    }
    let mut groups: Vec<((tch::Device, Kind), Group)> = Vec::new();
    let mut rounded: Vec<(&Tensor, &Tensor)> = Vec::new();
    for ((name, param), slot) in params.iter().zip(slots.iter_mut()) {
        let grad = param.grad();
        if !grad.defined() {
            continue;
        }
        slot.step += 1;
        let slot = &*slot;
        let target = slot.master.as_ref().unwrap_or(param);
        let grad = grad
            .f_to_kind(target.kind())
            .with_context(|| format!("AdamW step of '{name}': converting its gradient"))?;
        if let Some(master) = &slot.master {
            rounded.push((param, master));
        }
        let key = (target.device(), target.kind());
        let at = match groups.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                groups.push((key, Group::default()));
                groups.len() - 1
            }
        };
        let group = &mut groups[at].1;
        group.targets.push(target);
        group.grads.push(grad);
        group.exp_avgs.push(&slot.exp_avg);
        group.exp_avg_sqs.push(&slot.exp_avg_sq);
        group.steps.push(&slot.step_count);
    }
    for ((device, kind), group) in &groups {
        let grads: Vec<&Tensor> = group.grads.iter().collect();
        linearize_torch_ext::fused_adamw(
            &group.targets,
            &grads,
            &group.exp_avgs,
            &group.exp_avg_sqs,
            &group.steps,
            hyper,
        )
        .with_context(|| format!("AdamW step of the {kind:?} parameters on {device:?}"))?;
    }
    let (params, masters): (Vec<&Tensor>, Vec<&Tensor>) = rounded.into_iter().unzip();
    linearize_torch_ext::foreach_copy(&params, &masters)
        .context("AdamW step: rounding the master values into their parameters")
}

/// One parameter's AdamW update, in the order torch's single-tensor implementation runs it.
fn update(param: &Tensor, slot: &mut Slot, hyper: &AdamWStep) -> Result<()> {
    let grad = param.grad();
    if !grad.defined() {
        return Ok(());
    }
    let grad = grad.f_to_kind(slot.exp_avg.kind())?;
    let [beta1, beta2] = hyper.betas;
    slot.step += 1;
    let _ = slot.step_count.f_add_scalar_(1.0)?;
    let mut param = param.shallow_clone();
    let target = slot.master.as_mut().unwrap_or(&mut param);
    if hyper.weight_decay != 0.0 {
        let _ = target.f_mul_scalar_(1.0 - hyper.lr * hyper.weight_decay)?;
    }
    let _ = slot.exp_avg.f_lerp_(&grad, 1.0 - beta1)?;
    let _ = slot.exp_avg_sq.f_mul_scalar_(beta2)?;
    let _ = slot
        .exp_avg_sq
        .f_add_(&grad.f_square()?.f_mul_scalar(1.0 - beta2)?)?;
    let bias_correction1 = 1.0 - beta1.powf(slot.step as f64);
    let bias_correction2 = 1.0 - beta2.powf(slot.step as f64);
    let denom = slot
        .exp_avg_sq
        .f_sqrt()?
        .f_div_scalar(bias_correction2.sqrt())?
        .f_add_scalar(hyper.eps)?;
    let step = slot
        .exp_avg
        .f_mul_scalar(hyper.lr / bias_correction1)?
        .f_div(&denom)?;
    let _ = target.f_sub_(&step)?;
    if let Some(master) = &slot.master {
        param.f_copy_(master)?;
    }
    Ok(())
}

/// The dtype the optimizer works in for `param`: fp32, or fp64 for an fp64 parameter.
fn compute_kind(name: &str, param: &Tensor) -> Result<Kind> {
    match param.kind() {
        Kind::Double => Ok(Kind::Double),
        Kind::Float | Kind::BFloat16 | Kind::Half => Ok(Kind::Float),
        kind => {
            bail!("parameter '{name}' has dtype {kind:?}; only floating-point tensors are trained")
        }
    }
}
