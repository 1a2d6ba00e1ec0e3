//! Stage 1, attention transfer (docs/recipes.md): the teacher's weights stay frozen, one
//! teacher forward pass per batch, and in every converted layer the student attention sees the
//! teacher's q, k, v and is trained to reproduce the teacher's attention output (before o_proj)
//! with `mse_factor * MSE` (optionally plus Hedgehog's attention-row cross-entropy). The teacher
//! output, not the student's, flows on to the next layer, so the layers' losses are independent:
//! each layer backpropagates its loss inside the forward pass and memory stays at about one
//! forward pass plus one layer's student graph.
//!
//! With `kl_factor > 0` a second pass per micro-batch runs the converted model whole (student
//! outputs flow on) and adds `kl_factor * KL(teacher || student)` of the next-token
//! distributions. The teacher's logits come from the first pass, whose final hidden states are
//! the teacher's own. That pass keeps every layer's student graph until its backward: the memory
//! of a training forward of the whole model, logits included.
//!
//! ```yaml
//! attention_transfer:
//!   optimizer: {lr: 0.01}
//!   schedule: {kind: cosine, warmup_steps: 20}
//!   max_tokens: 20000000
//!   grad_accum: 8
//!   eval_every: 100
//!   kl_factor: 0.1              # optional, 0 by default
//! ```
mod trainer;

pub use crate::stage::{StageData as Stage1Data, StageJob as Stage1Job};
mod transfer;

use crate::convert::ConvertedLayers;
use crate::data::DataConfig;
use crate::optim::AdamWConfig;
use crate::schedule::ScheduleConfig;
use crate::stage::StageShape;
use anyhow::{ensure, Result};
use linearize_models::llama::Model;
use linearize_models::mixer::SoftmaxMixer;
use serde::{Deserialize, Serialize};
use transfer::{new_tap, Objective, TransferMixer};

/// The recipe's attention-transfer stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage1Config {
    /// The stage's name in `metrics.jsonl` and saved states.
    #[serde(default = "default_name")]
    pub name: String,
    /// AdamW settings (LoLCATs: lr 1e-2, no weight decay).
    #[serde(default = "default_optimizer")]
    pub optimizer: AdamWConfig,
    /// Learning-rate schedule; its peak is `optimizer.lr`.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Optimizer updates to run. With `max_tokens` too, whichever comes first.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Training tokens to consume (all micro-batches and ranks together).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// This stage's training sequence length, when it differs from `data.seq_len` (a
    /// long-context stage): the same packed token stream cut at this length. Validation stays at
    /// `data.seq_len`, so the stages' validation curves stay comparable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
    /// This stage's sequences per micro-batch (all ranks together), when it differs from
    /// `data.batch_size` (fewer for longer sequences).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Micro-batches whose gradients are summed into one update.
    #[serde(default = "default_one")]
    pub grad_accum: u64,
    /// Clip the global gradient norm to this value; none: no clipping.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: Option<f64>,
    /// Weight of the attention-output MSE in the loss (LoLCATs: 1000).
    #[serde(default = "default_mse_factor")]
    pub mse_factor: f64,
    /// Weight of Hedgehog's cross-entropy between teacher and student attention rows; 0 turns it
    /// off. Needs the L x L weights of every layer: `linear` method and `seq_len <=
    /// xent_max_seq_len` only.
    #[serde(default)]
    pub xent_factor: f64,
    /// Weight of KL(teacher || student) per token of the whole converted model's next-token
    /// distributions; 0 (the default) turns it off and leaves the stage layer-wise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub kl_factor: f64,
    /// For the KL term's pass: keep only each layer's input and recompute the layers one at a
    /// time in the backward (as the LoRA stage's `activation_checkpointing`): one layer's
    /// activations instead of all, for one more forward pass.
    #[serde(default, skip_serializing_if = "is_false")]
    pub kl_activation_checkpointing: bool,
    /// Longest sequence the cross-entropy term accepts.
    #[serde(default = "default_xent_max_seq_len")]
    pub xent_max_seq_len: usize,
    /// Validate every this many updates (0: only at the start and the end).
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// Validate before the first update, giving the MSE (and KL) of the untrained student.
    #[serde(default = "default_true")]
    pub eval_at_start: bool,
    /// Sequences per validation batch.
    #[serde(default = "default_one_usize")]
    pub eval_batch_size: usize,
    /// Cap on validation batches per evaluation (the first ones).
    #[serde(default)]
    pub max_eval_batches: Option<usize>,
    /// End the stage with the parameters of the best validation (MSE, or with `kl_factor` the
    /// weighted MSE and KL) instead of the last ones.
    #[serde(default = "default_true")]
    pub keep_best: bool,
    /// Save a resumable state every this many updates (0: only at the end and on a signal).
    #[serde(default = "default_save_every")]
    pub save_every: u64,
    /// Resumable states kept on disk.
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Write a training record to `metrics.jsonl` every this many updates.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
    /// Check after training that every teacher weight is bit-identical and gradient-free.
    #[serde(default = "default_true")]
    pub verify_frozen: bool,
}

fn default_name() -> String {
    "attention_transfer".into()
}
fn default_optimizer() -> AdamWConfig {
    AdamWConfig::with_lr(1e-2)
}
fn default_one() -> u64 {
    1
}
fn default_one_usize() -> usize {
    1
}
fn default_max_grad_norm() -> Option<f64> {
    Some(1.0)
}
fn default_mse_factor() -> f64 {
    1000.0
}
/// An unset `kl_factor` stays out of the resolved recipe, so recipes written before the key
/// keep their hash (and their saved states resume).
fn is_zero(value: &f64) -> bool {
    *value == 0.0
}
fn is_false(value: &bool) -> bool {
    !*value
}
fn default_xent_max_seq_len() -> usize {
    1024
}
fn default_eval_every() -> u64 {
    100
}
fn default_true() -> bool {
    true
}
fn default_save_every() -> u64 {
    500
}
fn default_keep_last() -> usize {
    2
}
fn default_log_every() -> u64 {
    10
}

impl Default for Stage1Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl Stage1Config {
    /// This stage's (sequence length, sequences per micro-batch): its own or the data's.
    pub fn shape(&self, data: &DataConfig) -> StageShape {
        StageShape {
            seq_len: self.seq_len.unwrap_or(data.seq_len),
            batch_size: self.batch_size.unwrap_or(data.batch_size),
        }
    }

    /// Checks every field's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.name.is_empty(), "stage name must not be empty");
        self.optimizer.validate()?;
        ensure!(self.grad_accum >= 1, "grad_accum must be >= 1");
        if let Some(max) = self.max_grad_norm {
            ensure!(
                max.is_finite() && max > 0.0,
                "max_grad_norm must be > 0, got {max}"
            );
        }
        for (key, value) in [
            ("mse_factor", self.mse_factor),
            ("xent_factor", self.xent_factor),
            ("kl_factor", self.kl_factor),
        ] {
            ensure!(
                value.is_finite() && value >= 0.0,
                "{key} must be >= 0, got {value}"
            );
        }
        ensure!(
            self.mse_factor > 0.0 || self.xent_factor > 0.0 || self.kl_factor > 0.0,
            "mse_factor, xent_factor and kl_factor are all 0: nothing to train"
        );
        ensure!(
            !self.kl_activation_checkpointing || self.kl_factor > 0.0,
            "kl_activation_checkpointing is set but kl_factor is 0: there is no KL pass to \
             checkpoint"
        );
        ensure!(self.eval_batch_size >= 1, "eval_batch_size must be >= 1");
        ensure!(self.keep_last >= 1, "keep_last must be >= 1");
        ensure!(
            self.max_steps.is_some() || self.max_tokens.is_some(),
            "attention transfer needs max_steps or max_tokens"
        );
        // A zero budget would train nothing and save an untrained stage as finished.
        ensure!(self.max_steps != Some(0), "max_steps must be >= 1");
        ensure!(self.max_tokens != Some(0), "max_tokens must be >= 1");
        ensure!(self.seq_len != Some(0), "seq_len must be >= 1");
        ensure!(self.batch_size != Some(0), "batch_size must be >= 1");
        Ok(())
    }
}

/// Validation attention MSE (and KL) at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValMse {
    pub step: u64,
    /// Mean over converted layers.
    pub attn_mse: f64,
    /// `(layer, MSE)` for every converted layer, ascending by layer.
    pub per_layer: Vec<(usize, f64)>,
    /// Mean KL(teacher || student) per token of the whole converted model, with `kl_factor`.
    pub kl: Option<f64>,
    /// What the best state is chosen by: `attn_mse`, or with `kl_factor`
    /// `mse_factor * attn_mse + kl_factor * kl`.
    pub loss: f64,
}

/// What the stage did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage1Summary {
    /// Optimizer updates completed.
    pub steps: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Validation before any update (none when resumed past it or without validation data).
    pub initial_val: Option<ValMse>,
    /// Validation of the parameters the stage ends with (the best ones with `keep_best`).
    pub final_val: Option<ValMse>,
    /// Lowest validation [`ValMse::loss`] seen.
    pub best_val_loss: Option<f64>,
}

/// Runs attention transfer on the converted layers of `model` (see the module docs) and leaves
/// the model with its plain converted mixers, trained.
pub fn run_stage1(
    model: &mut Model,
    converted: &ConvertedLayers,
    data: Stage1Data,
    cfg: &Stage1Config,
    job: Stage1Job<'_>,
) -> Result<Stage1Summary> {
    cfg.validate()?;
    ensure!(
        !converted.is_empty(),
        "attention transfer: the model has no converted layer"
    );
    let tap = new_tap();
    let objective = Objective {
        mse_factor: cfg.mse_factor,
        xent_factor: cfg.xent_factor,
    };
    for (layer, student) in converted.mixers() {
        let wrapped = TransferMixer {
            layer,
            teacher: SoftmaxMixer::new(model.config().layer_window(layer)),
            student: student.shallow_clone(),
            objective,
            tap: tap.clone(),
        };
        model.set_mixer(layer, Box::new(wrapped))?;
    }
    let result = trainer::Trainer::new(model, converted, data, cfg, job, tap)
        .and_then(|trainer| trainer.run(model));
    let restored = converted.install(model);
    let summary = result?;
    restored?;
    Ok(summary)
}
