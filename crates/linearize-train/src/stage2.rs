//! Stage 2, LoRA (docs/recipes.md): the converted model runs with its student attention and
//! LoRA adapters on its projections are trained with KL divergence to the teacher's logits (the
//! default), next-token cross-entropy, or a weighted mix of both; optionally the feature maps and window
//! factors keep training too. Everything else stays frozen.
//!
//! ```yaml
//! finetune:
//!   lora: {rank: 8, alpha: 16, targets: [q_proj, k_proj, v_proj, o_proj]}
//!   loss: kl                    # default; or xent, or {xent: 0.5, kl: 0.5}
//!   optimizer: {lr: 0.0001}
//!   max_tokens: 20000000
//!   grad_accum: 8
//! ```
mod loss;
mod teacher;
mod trainer;

pub use crate::stage::{StageData as Stage2Data, StageJob as Stage2Job};

use crate::convert::ConvertedLayers;
use crate::data::DataConfig;
use crate::lora::{LoraAdapters, LoraSettings};
use crate::optim::AdamWConfig;
use crate::schedule::ScheduleConfig;
use crate::stage::StageShape;
use anyhow::{ensure, Result};
use linearize_models::llama::Model;
pub(crate) use loss::kl_to_teacher;
pub use loss::{LossMix, LossName, LossSpec};
use serde::{Deserialize, Serialize};

/// The recipe's LoRA stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage2Config {
    /// The stage's name in `metrics.jsonl` and saved states.
    #[serde(default = "default_name")]
    pub name: String,
    /// Rank, alpha, dropout and target projections of the adapters.
    #[serde(default)]
    pub lora: LoraSettings,
    /// `kl` (KL(teacher || student) of the next-token distributions, the default), `xent`
    /// (next-token cross-entropy) or `{xent: w1, kl: w2}`.
    #[serde(default)]
    pub loss: LossSpec,
    /// Tokens per chunk of the loss: the logits (tokens, vocab) f32 are made from the final
    /// hidden states and backpropagated one chunk at a time, so a batch's full logits never
    /// exist at once (same values and gradients, less memory for a large vocabulary).
    #[serde(default = "default_loss_chunk")]
    pub loss_chunk: usize,
    /// Keep training the feature maps and window factors together with the adapters.
    #[serde(default)]
    pub train_attention: bool,
    /// Keep only each layer's input during the forward pass and recompute the layers one at a
    /// time in the backward: activation memory of one layer instead of all, for one more
    /// forward pass of compute (longer contexts or larger batches on the same GPU).
    #[serde(default)]
    pub activation_checkpointing: bool,
    /// AdamW settings (LoLCATs: lr 1e-4, no weight decay).
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
    /// Validate every this many updates (0: only at the start and the end).
    #[serde(default = "default_eval_every")]
    pub eval_every: u64,
    /// Validate before the first update, giving the loss of the model stage 1 left.
    #[serde(default = "default_true")]
    pub eval_at_start: bool,
    /// Sequences per validation batch.
    #[serde(default = "default_one_usize")]
    pub eval_batch_size: usize,
    /// Cap on validation batches per evaluation (the first ones).
    #[serde(default)]
    pub max_eval_batches: Option<usize>,
    /// End the stage with the parameters of the best validation loss instead of the last ones.
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
    /// Check after training that every frozen weight is bit-identical and gradient-free.
    #[serde(default = "default_true")]
    pub verify_frozen: bool,
}

fn default_name() -> String {
    "lora".into()
}
fn default_loss_chunk() -> usize {
    1024
}
fn default_optimizer() -> AdamWConfig {
    AdamWConfig::with_lr(1e-4)
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

impl Default for Stage2Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("every field has a default")
    }
}

impl Stage2Config {
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
        self.lora.validate()?;
        self.loss.validate()?;
        self.optimizer.validate()?;
        ensure!(
            self.loss_chunk >= 1,
            "loss_chunk must be >= 1 tokens (a value >= batch_size * seq_len computes the loss \
             in one piece)"
        );
        ensure!(self.grad_accum >= 1, "grad_accum must be >= 1");
        if let Some(max) = self.max_grad_norm {
            ensure!(
                max.is_finite() && max > 0.0,
                "max_grad_norm must be > 0, got {max}"
            );
        }
        ensure!(self.eval_batch_size >= 1, "eval_batch_size must be >= 1");
        ensure!(self.keep_last >= 1, "keep_last must be >= 1");
        ensure!(
            self.max_steps.is_some() || self.max_tokens.is_some(),
            "the LoRA stage needs max_steps or max_tokens"
        );
        // A zero budget would train nothing and save an untrained stage as finished.
        ensure!(self.max_steps != Some(0), "max_steps must be >= 1");
        ensure!(self.max_tokens != Some(0), "max_tokens must be >= 1");
        ensure!(self.seq_len != Some(0), "seq_len must be >= 1");
        ensure!(self.batch_size != Some(0), "batch_size must be >= 1");
        Ok(())
    }
}

/// Validation losses at one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValLoss {
    pub step: u64,
    /// Mean next-token cross-entropy (nats per token).
    pub lm_loss: f64,
    /// `exp(lm_loss)`.
    pub ppl: f64,
    /// Mean KL(teacher || student) per token, when the loss uses it.
    pub kl: Option<f64>,
    /// The weighted objective the best state is chosen by.
    pub loss: f64,
}

/// What the stage did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stage2Summary {
    /// Optimizer updates completed.
    pub steps: u64,
    /// Training tokens consumed.
    pub tokens: u64,
    /// Validation before any update (none when resumed past it or without validation data).
    pub initial_val: Option<ValLoss>,
    /// Validation of the parameters the stage ends with (the best ones with `keep_best`).
    pub final_val: Option<ValLoss>,
    /// Lowest validation objective seen.
    pub best_val_loss: Option<f64>,
}

/// Trains `lora` (installed in `model` by [`LoraAdapters::install`] with `cfg.lora`) on the
/// converted model (see the module docs). The model ends with its converted mixers and the
/// trained adapters installed, unmerged, in inference mode.
pub fn run_stage2(
    model: &mut Model,
    converted: &ConvertedLayers,
    lora: &LoraAdapters,
    data: Stage2Data,
    cfg: &Stage2Config,
    job: Stage2Job<'_>,
) -> Result<Stage2Summary> {
    cfg.validate()?;
    ensure!(
        lora.settings() == &cfg.lora,
        "the installed LoRA adapters ({:?}) are not the ones the stage config asks for ({:?})",
        lora.settings(),
        cfg.lora
    );
    // Student parameters that are not trained must not collect gradients (memory, and the
    // frozen check); they get their flag back afterwards.
    let student = converted.named_parameters();
    let flags: Vec<bool> = student.iter().map(|(_, t)| t.requires_grad()).collect();
    for (_, t) in &student {
        let _ = t.set_requires_grad(cfg.train_attention);
    }
    let result = trainer::Trainer::new(model, converted, lora, data, cfg, job)
        .and_then(|trainer| trainer.run(model));
    for ((_, t), flag) in student.iter().zip(flags) {
        let _ = t.set_requires_grad(flag);
    }
    let restored = converted
        .install(model)
        .and_then(|()| lora.attach(model, false));
    let summary = result?;
    restored?;
    Ok(summary)
}
