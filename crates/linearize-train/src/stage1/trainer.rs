//! The attention-transfer loop: batches, accumulation, clipping, AdamW, schedule, validation,
//! best state, metrics, progress, resumable states.
use super::transfer::{set_mode, take_losses, LayerLoss, SharedTap, TapMode};
use super::{Stage1Config, Stage1Data, Stage1Job, Stage1Summary, ValMse};
use crate::convert::ConvertedLayers;
use crate::data::{Batcher, DataCursor, PackedSequences};
use crate::metrics::{MetricRecord, MetricsWriter, Split};
use crate::optim::{AdamW, FrozenSnapshot, Trainable};
use crate::progress::TrainProgress;
use crate::schedule::Schedule;
use crate::state::{
    self, LoadedState, Preempted, Preemption, SeedStream, StateTensors, TrainState,
};
use anyhow::{bail, ensure, Context, Result};
use linearize_attention::linearized::Method;
use linearize_models::llama::Model;
use std::path::Path;
use tch::Tensor;

pub(super) struct Trainer<'a> {
    cfg: &'a Stage1Config,
    run_dir: &'a Path,
    metrics: &'a mut MetricsWriter,
    recipe_hash: &'a str,
    run_step_offset: u64,
    preemption: Option<&'a Preemption>,
    tap: SharedTap,
    layers: Vec<usize>,
    frozen: Option<FrozenSnapshot>,

    train: Batcher,
    seq_len: usize,
    val: Option<PackedSequences>,
    params: Trainable,
    optimizer: AdamW,
    schedule: Schedule,
    seeds: SeedStream,
    total_steps: u64,

    step: u64,
    tokens: u64,
    best_val_mse: Option<f64>,
    /// Copies of the parameters of the best validation, when they are not the current ones.
    best_params: Option<Vec<(String, Tensor)>>,
    /// Whether the latest validation was the best so far (then the current parameters are).
    latest_is_best: bool,
}

/// Mean training loss terms of one update.
struct StepLoss {
    attn_mse: f64,
    /// The objective: `mse_factor * attn_mse (+ xent_factor * xent)`.
    loss: f64,
    xent: Option<f64>,
    per_layer: Vec<(usize, f64)>,
    lr: f64,
    /// Before clipping.
    grad_norm: f64,
}

impl<'a> Trainer<'a> {
    pub(super) fn new(
        model: &Model,
        converted: &ConvertedLayers,
        data: Stage1Data,
        cfg: &'a Stage1Config,
        job: Stage1Job<'a>,
        tap: SharedTap,
    ) -> Result<Self> {
        if cfg.xent_factor > 0.0 {
            ensure!(
                data.seq_len <= cfg.xent_max_seq_len,
                "xent_factor needs the L x L attention weights: seq_len {} is above \
                 xent_max_seq_len {}",
                data.seq_len,
                cfg.xent_max_seq_len
            );
            if let Some((layer, m)) = converted
                .mixers()
                .find(|(_, m)| m.method() != Method::Linear)
            {
                bail!(
                    "xent_factor is implemented for the `linear` method only; layer {layer} is {}",
                    m.config().name()
                );
            }
        }
        let params = Trainable::new(converted.named_parameters())
            .context("the converted layers have no trainable parameters to transfer into")?;
        let optimizer = AdamW::new(&params, cfg.optimizer.clone())?;
        let total_steps = total_steps(cfg, &data.train, data.seq_len)?;
        let schedule = Schedule::new(cfg.schedule.clone(), cfg.optimizer.lr, total_steps)?;
        let frozen = cfg
            .verify_frozen
            .then(|| {
                let named: Vec<_> = model.named_parameters().into_iter().collect();
                FrozenSnapshot::capture(&named)
            })
            .transpose()?;
        let mut trainer = Self {
            cfg,
            run_dir: job.run_dir,
            metrics: job.metrics,
            recipe_hash: job.recipe_hash,
            run_step_offset: job.run_step_offset,
            preemption: job.preemption,
            tap,
            layers: converted.indices(),
            frozen,
            train: data.train,
            seq_len: data.seq_len,
            val: data.val,
            params,
            optimizer,
            schedule,
            seeds: SeedStream::new(job.seed),
            total_steps,
            step: 0,
            tokens: 0,
            best_val_mse: None,
            best_params: None,
            latest_is_best: false,
        };
        if let Some(loaded) = job.resume {
            trainer.resume(loaded)?;
        }
        tracing::info!(
            stage = %cfg.name,
            layers = trainer.layers.len(),
            parameters = trainer.params.num_elements(),
            total_steps,
            start_step = trainer.step,
            "attention transfer"
        );
        Ok(trainer)
    }

    /// Continues from a saved state of this stage.
    fn resume(&mut self, loaded: &LoadedState) -> Result<()> {
        let saved = &loaded.state;
        ensure!(
            saved.stage == self.cfg.name,
            "{} is a state of stage '{}', not of '{}'",
            loaded.dir.display(),
            saved.stage,
            self.cfg.name
        );
        loaded.ensure_recipe(self.recipe_hash)?;
        ensure!(
            saved.run_step == self.run_step_offset + saved.step,
            "{}: run step {} does not follow {} updates of earlier stages plus {} of this one",
            loaded.dir.display(),
            saved.run_step,
            self.run_step_offset,
            saved.step
        );
        self.params.load(&loaded.tensors.params)?;
        self.optimizer.load_state(&loaded.tensors.optimizer)?;
        self.schedule.restore(saved.schedule.clone())?;
        let cursor: DataCursor = serde_json::from_value(saved.data_cursor.clone())
            .with_context(|| format!("{}: data cursor", loaded.dir.display()))?;
        self.train.seek(cursor)?;
        self.seeds = saved.rng.clone();
        self.step = saved.step;
        self.tokens = saved.tokens_seen;
        self.best_val_mse = saved.best_val_loss;
        if self.cfg.keep_best {
            if let Some(best) = state::load_best(self.run_dir)? {
                if best.state.stage == self.cfg.name && best.state.recipe_hash == self.recipe_hash {
                    self.best_params = Some(best.tensors.params);
                }
            }
        }
        tracing::info!(dir = %loaded.dir.display(), step = self.step, "resumed attention transfer");
        Ok(())
    }

    pub(super) fn run(mut self, model: &Model) -> Result<Stage1Summary> {
        let cfg = self.cfg;
        let mut progress = TrainProgress::new(
            &cfg.name,
            self.step,
            self.total_steps,
            self.tokens,
            cfg.log_every,
        );
        let mut initial_val = None;
        let mut latest_val = None;
        if self.step == 0 && cfg.eval_at_start {
            initial_val = self.validate(model, &progress)?;
            latest_val.clone_from(&initial_val);
        }
        while self.step < self.total_steps {
            if let Some(signal) = self.preemption.and_then(Preemption::requested) {
                self.save()?;
                progress.finish();
                return Err(Preempted { signal }.into());
            }
            let Some(loss) = self.train_step(model)? else {
                tracing::warn!(
                    step = self.step,
                    "training data ran out before the step budget"
                );
                break;
            };
            progress.update(self.step, self.tokens, loss.attn_mse);
            if self.step % cfg.log_every.max(1) == 0 || self.step == self.total_steps {
                self.log_train(&loss, progress.tokens_per_s())?;
            }
            if cfg.eval_every > 0 && self.step % cfg.eval_every == 0 {
                latest_val = self.validate(model, &progress)?;
            }
            if cfg.save_every > 0 && self.step % cfg.save_every == 0 {
                self.save()?;
            }
        }
        if latest_val.as_ref().is_none_or(|v| v.step != self.step) {
            latest_val = self.validate(model, &progress)?;
        }
        self.save()?;
        progress.finish();
        let final_val = match self.best_params.take() {
            Some(best) if cfg.keep_best && !self.latest_is_best => {
                self.params.load(&best)?;
                tracing::info!(best = ?self.best_val_mse, "restored the parameters of the best validation");
                self.measure(model)?
            }
            _ => latest_val,
        };
        if let Some(frozen) = &self.frozen {
            frozen.verify()?;
        }
        Ok(Stage1Summary {
            steps: self.step,
            tokens: self.tokens,
            initial_val,
            final_val,
            best_val_mse: self.best_val_mse,
        })
    }

    /// One optimizer update over `grad_accum` micro-batches; `None` when the data ran out.
    fn train_step(&mut self, model: &Model) -> Result<Option<StepLoss>> {
        let cfg = self.cfg;
        self.seeds.reseed_torch();
        self.optimizer.zero_grad();
        let scale = 1.0 / (self.layers.len() as f64 * cfg.grad_accum as f64);
        set_mode(
            &self.tap,
            TapMode::Train {
                backward_scale: scale,
            },
        )?;
        let mut losses = Vec::new();
        for _ in 0..cfg.grad_accum {
            let Some(batch) = self.train.next_batch() else {
                return Ok(None);
            };
            let ids = batch.inputs().to_device(model.device()); // (b, L)
                                                                // The wrapped layers backpropagate their losses; the hidden states are not needed.
            let _ = model.hidden_states(&ids, None)?;
            losses.extend(self.collect(take_losses(&self.tap)?)?);
        }
        let grad_norm = match cfg.max_grad_norm {
            Some(max) => self.params.clip_grad_norm(max)?,
            None => self.params.grad_norm()?,
        };
        let lr = self.schedule.lr(self.step);
        if grad_norm.is_finite() {
            self.optimizer.set_lr(lr);
            self.optimizer.step()?;
        } else {
            tracing::warn!(step = self.step, "non-finite gradient norm: update skipped");
        }
        self.step += 1;
        self.tokens = self.train.cursor().consumed * self.seq_len as u64;
        Ok(Some(self.summarise(&losses, lr, grad_norm)))
    }

    /// Checks that every converted layer reported its loss once, in layer order.
    fn collect(&self, losses: Vec<LayerLoss>) -> Result<Vec<LayerLoss>> {
        let reported: Vec<usize> = losses.iter().map(|l| l.layer).collect();
        ensure!(
            reported == self.layers,
            "attention transfer: layers {reported:?} reported a loss, expected {:?}",
            self.layers
        );
        Ok(losses)
    }

    /// Means over micro-batches (per layer) and over layers.
    fn summarise(&self, losses: &[LayerLoss], lr: f64, grad_norm: f64) -> StepLoss {
        let per_layer = per_layer_means(&self.layers, losses, |l| l.mse);
        let attn_mse = mean(per_layer.iter().map(|(_, m)| *m));
        let xent = losses
            .iter()
            .map(|l| l.xent)
            .collect::<Option<Vec<f64>>>()
            .map(|x| mean(x.into_iter()));
        let loss = self.cfg.mse_factor * attn_mse + self.cfg.xent_factor * xent.unwrap_or(0.0);
        StepLoss {
            attn_mse,
            loss,
            xent,
            per_layer,
            lr,
            grad_norm,
        }
    }

    fn log_train(&mut self, loss: &StepLoss, tokens_per_s: Option<f64>) -> Result<()> {
        let mut record = MetricRecord::new(&self.cfg.name, self.step, self.tokens, Split::Train)
            .with("attn_mse", loss.attn_mse)
            .with("loss", loss.loss)
            .with_layers("attn_mse", loss.per_layer.iter().copied());
        if let Some(xent) = loss.xent {
            record = record.with("attn_xent", xent);
        }
        record.lr = Some(loss.lr);
        record.grad_norm = Some(loss.grad_norm);
        record.tokens_per_s = tokens_per_s;
        self.metrics.write(record)
    }

    /// Validates, records the result, tracks the best state and feeds a plateau schedule.
    fn validate(&mut self, model: &Model, progress: &TrainProgress) -> Result<Option<ValMse>> {
        let Some(val) = self.measure(model)? else {
            return Ok(None);
        };
        let record = MetricRecord::new(&self.cfg.name, self.step, self.tokens, Split::Val)
            .with("attn_mse", val.attn_mse)
            .with_layers("attn_mse", val.per_layer.iter().copied());
        self.metrics.write(record)?;
        progress.println(&format!(
            "step {}: validation attention MSE {:.6}",
            self.step, val.attn_mse
        ));
        self.latest_is_best = self.best_val_mse.is_none_or(|best| val.attn_mse < best);
        if self.latest_is_best {
            self.best_val_mse = Some(val.attn_mse);
            if self.cfg.keep_best {
                self.best_params = Some(tch::no_grad(|| {
                    self.params
                        .named()
                        .iter()
                        .map(|(name, t)| (name.clone(), t.copy()))
                        .collect()
                }));
                state::save_best(self.run_dir, &self.train_state()?, &self.tensors())?;
            }
        }
        self.schedule.observe_val_loss(self.step, val.attn_mse);
        Ok(Some(val))
    }

    /// Mean validation attention MSE per layer, weighting batches by their sequences.
    fn measure(&self, model: &Model) -> Result<Option<ValMse>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        set_mode(&self.tap, TapMode::Eval)?;
        let mut sums = vec![0.0; self.layers.len()];
        let mut sequences = 0usize;
        let batches = val
            .eval_batches(self.cfg.eval_batch_size, 0, 1)?
            .take(self.cfg.max_eval_batches.unwrap_or(usize::MAX));
        for tokens in batches {
            let n = tokens.size()[0] as usize;
            let ids = tokens
                .narrow(1, 0, val.seq_len() as i64)
                .to_device(model.device()); // (n, L)
            let _ = tch::no_grad(|| model.hidden_states(&ids, None))?;
            for (sum, loss) in sums.iter_mut().zip(self.collect(take_losses(&self.tap)?)?) {
                *sum += loss.mse * n as f64;
            }
            sequences += n;
        }
        ensure!(sequences > 0, "validation data holds no sequence");
        let per_layer: Vec<(usize, f64)> = self
            .layers
            .iter()
            .zip(sums)
            .map(|(&layer, sum)| (layer, sum / sequences as f64))
            .collect();
        Ok(Some(ValMse {
            step: self.step,
            attn_mse: mean(per_layer.iter().map(|(_, m)| *m)),
            per_layer,
        }))
    }

    fn train_state(&self) -> Result<TrainState> {
        Ok(TrainState {
            stage: self.cfg.name.clone(),
            step: self.step,
            run_step: self.run_step_offset + self.step,
            tokens_seen: self.tokens,
            best_val_loss: self.best_val_mse,
            schedule: self.schedule.state(),
            rng: self.seeds.clone(),
            data_cursor: serde_json::to_value(self.train.cursor())?,
            recipe_hash: self.recipe_hash.to_owned(),
        })
    }

    fn tensors(&self) -> StateTensors {
        StateTensors {
            params: self
                .params
                .named()
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            optimizer: self.optimizer.state_tensors(),
        }
    }

    fn save(&self) -> Result<()> {
        state::save_state(
            self.run_dir,
            &self.train_state()?,
            &self.tensors(),
            self.cfg.keep_last,
        )?;
        Ok(())
    }
}

/// For each layer, the mean of `value` over its entries in `losses`.
fn per_layer_means(
    layers: &[usize],
    losses: &[LayerLoss],
    value: impl Fn(&LayerLoss) -> f64,
) -> Vec<(usize, f64)> {
    layers
        .iter()
        .map(|&layer| {
            let values = losses.iter().filter(|l| l.layer == layer).map(&value);
            (layer, mean(values))
        })
        .collect()
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// The number of updates of the stage: the smallest of `max_steps`, the updates `max_tokens`
/// allows and the updates the batcher's own budget allows.
fn total_steps(cfg: &Stage1Config, train: &Batcher, seq_len: usize) -> Result<u64> {
    let tokens_per_step = cfg.grad_accum * train.step_sequences() as u64 * seq_len as u64;
    let by_data = train
        .remaining_steps()
        .map(|batches| (train.cursor().steps + batches) / cfg.grad_accum);
    let total = [
        cfg.max_steps,
        cfg.max_tokens.map(|t| t / tokens_per_step),
        by_data,
    ]
    .into_iter()
    .flatten()
    .min()
    .context("attention transfer needs max_steps or max_tokens")?;
    ensure!(
        total > 0,
        "attention transfer: the budget allows no update ({tokens_per_step} tokens per update, \
         max_tokens {:?}, max_steps {:?}, data batches {by_data:?})",
        cfg.max_tokens,
        cfg.max_steps
    );
    Ok(total)
}
