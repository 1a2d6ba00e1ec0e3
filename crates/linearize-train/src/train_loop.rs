//! What the stages' training loops share: the trained parameters with their optimizer, schedule
//! and seed stream, the position in the data, the best-validation bookkeeping and the resumable
//! state. A stage adds its forward pass, its losses and its metrics on top.
//!
//! Data parallelism lives here too: with a [`ProcessGroup`] of N ranks, each rank takes its
//! `1/N` share of every global batch ([`Batcher::split_across_ranks`]), the gradients are
//! averaged before clipping and the update (so all ranks stay identical), losses are averaged
//! for reporting, a stop on a signal is agreed on by all ranks, and only rank 0 writes states.
use crate::data::{Batch, Batcher, DataCursor};
use crate::optim::{AdamW, AdamWConfig, FrozenSnapshot, Trainable};
use crate::progress::TrainProgress;
use crate::schedule::{Schedule, ScheduleConfig};
use crate::state::{
    self, LoadedState, Preempted, Preemption, SeedStream, StateTensors, TrainState,
};
use anyhow::{ensure, Context, Result};
use linearize_dist::{ProcessGroup, ReduceOp};
use linearize_models::llama::Model;
use sha2::{Digest, Sha256};
use std::path::Path;
use tch::{Device, Tensor};

/// The [`LoopSettings`] of a stage from its config and job, whose fields of the same names
/// every stage has (the stage configs are separate types: each validates its own keys).
macro_rules! loop_settings {
    ($cfg:expr, $job:expr) => {
        $crate::train_loop::LoopSettings {
            stage: &$cfg.name,
            run_dir: $job.run_dir,
            recipe_hash: $job.recipe_hash,
            run_step_offset: $job.run_step_offset,
            seed: $job.seed,
            optimizer: $cfg.optimizer.clone(),
            schedule: $cfg.schedule.clone(),
            max_steps: $cfg.max_steps,
            max_tokens: $cfg.max_tokens,
            grad_accum: $cfg.grad_accum,
            max_grad_norm: $cfg.max_grad_norm,
            keep_last: $cfg.keep_last,
            keep_best: $cfg.keep_best,
            cadence: $crate::train_loop::Cadence {
                log_every: $cfg.log_every,
                eval_every: $cfg.eval_every,
                save_every: $cfg.save_every,
                eval_at_start: $cfg.eval_at_start,
            },
            preemption: $job.preemption,
        }
    };
}
pub(crate) use loop_settings;

/// The settings a loop takes from its stage's config and job.
pub(crate) struct LoopSettings<'a> {
    /// The stage's name (states, metrics, messages).
    pub stage: &'a str,
    pub run_dir: &'a Path,
    pub recipe_hash: &'a str,
    pub run_step_offset: u64,
    pub seed: u64,
    pub optimizer: AdamWConfig,
    pub schedule: ScheduleConfig,
    pub max_steps: Option<u64>,
    pub max_tokens: Option<u64>,
    pub grad_accum: u64,
    pub max_grad_norm: Option<f64>,
    pub keep_last: usize,
    pub keep_best: bool,
    pub cadence: Cadence,
    /// Asked to stop (a signal) when set.
    pub preemption: Option<&'a Preemption>,
}

/// How often a stage logs, validates and saves, from its config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cadence {
    pub log_every: u64,
    /// 0: only at the start and the end.
    pub eval_every: u64,
    /// 0: only at the end and on a signal.
    pub save_every: u64,
    pub eval_at_start: bool,
}

/// What a stage puts into the loop that [`run_stage`] drives: its update, its validation and
/// its metrics.
pub(crate) trait Stage<'a> {
    /// The losses of one update.
    type Step;
    /// One validation's numbers.
    type Val: Clone;

    fn core(&mut self) -> &mut LoopCore<'a>;
    /// One optimizer update over `grad_accum` micro-batches; `None` when the data ran out.
    fn train_step(&mut self, model: &mut Model) -> Result<Option<Self::Step>>;
    /// The loss the progress bar shows.
    fn shown_loss(step: &Self::Step) -> f64;
    fn log_train(&mut self, step: &Self::Step, tokens_per_s: Option<f64>) -> Result<()>;
    /// Validates, records the result, tracks the best state and feeds a plateau schedule.
    fn validate(
        &mut self,
        model: &mut Model,
        progress: &TrainProgress,
    ) -> Result<Option<Self::Val>>;
    /// Validation numbers of the current parameters, recorded nowhere.
    fn measure(&self, model: &mut Model) -> Result<Option<Self::Val>>;
    fn val_step(val: &Self::Val) -> u64;
}

/// The validations that bracket a stage.
pub(crate) struct StageEnd<V> {
    /// Before the first update, when the stage starts at step 0 and validates there.
    pub initial_val: Option<V>,
    /// Of the parameters the stage ends with (the best ones when it keeps the best).
    pub final_val: Option<V>,
}

/// The training loop of every stage: updates until the budget or the data ends, with logging,
/// validation and states at the stage's cadence; a signal saves a state and ends the stage with
/// [`Preempted`]; at the end the best parameters are restored (when kept) and frozen weights
/// checked.
pub(crate) fn run_stage<'a, S: Stage<'a>>(
    stage: &mut S,
    model: &mut Model,
    name: &str,
) -> Result<StageEnd<S::Val>> {
    let core = stage.core();
    let (cadence, preemption) = (core.settings.cadence, core.settings.preemption);
    let mut progress = TrainProgress::new(
        name,
        core.step,
        core.total_steps,
        core.tokens,
        cadence.log_every,
    );
    if !core.is_main() {
        progress = progress.silent();
    }
    let mut initial_val = None;
    let mut latest_val = None;
    if stage.core().step == 0 && cadence.eval_at_start {
        initial_val = stage.validate(model, &progress)?;
        latest_val.clone_from(&initial_val);
    }
    while stage.core().step < stage.core().total_steps {
        if let Some(signal) = stage.core().stop_requested(preemption)? {
            stage.core().save_and_wait()?;
            progress.finish();
            return Err(Preempted { signal }.into());
        }
        let update = linearize_profile::range("update");
        let step_loss = stage.train_step(model)?;
        drop(update);
        let Some(loss) = step_loss else {
            tracing::warn!(
                step = stage.core().step,
                "training data ran out before the step budget"
            );
            break;
        };
        let (step, tokens, total_steps) = {
            let core = stage.core();
            (core.step, core.tokens, core.total_steps)
        };
        progress.update(step, tokens, S::shown_loss(&loss));
        if step % cadence.log_every.max(1) == 0 || step == total_steps {
            stage.log_train(&loss, progress.tokens_per_s())?;
        }
        if cadence.eval_every > 0 && step % cadence.eval_every == 0 {
            latest_val = stage.validate(model, &progress)?;
        }
        if cadence.save_every > 0 && step % cadence.save_every == 0 {
            stage.core().save()?;
        }
    }
    let step = stage.core().step;
    if latest_val.as_ref().is_none_or(|v| S::val_step(v) != step) {
        latest_val = stage.validate(model, &progress)?;
    }
    stage.core().save_and_wait()?;
    progress.finish();
    let final_val = if stage.core().restore_best()? {
        stage.measure(model)?
    } else {
        latest_val
    };
    if let Some(frozen) = &stage.core().frozen {
        frozen.verify()?;
    }
    Ok(StageEnd {
        initial_val,
        final_val,
    })
}

pub(crate) struct LoopCore<'a> {
    pub settings: LoopSettings<'a>,
    /// The data-parallel ranks (a world of one without a launch).
    pub group: &'a ProcessGroup,
    pub train: Batcher,
    pub seq_len: usize,
    pub params: Trainable,
    optimizer: AdamW,
    schedule: Schedule,
    seeds: SeedStream,
    pub total_steps: u64,
    /// Optimizer updates completed in this stage.
    pub step: u64,
    /// Training tokens consumed in this stage.
    pub tokens: u64,
    /// Lowest validation loss seen.
    pub best_val: Option<f64>,
    /// Copies of the parameters of the best validation, when they are not the current ones.
    best_params: Option<Vec<(String, Tensor)>>,
    /// Whether the latest validation was the best so far (then the current parameters are).
    latest_is_best: bool,
    /// The model's own weights as they were, to check after training.
    pub frozen: Option<FrozenSnapshot>,
}

impl<'a> LoopCore<'a> {
    /// `train` serves the global batches; with a distributed `group` it is split across the
    /// ranks here.
    pub fn new(
        settings: LoopSettings<'a>,
        group: Option<&'a ProcessGroup>,
        train: Batcher,
        seq_len: usize,
        params: Trainable,
    ) -> Result<Self> {
        let group = group.unwrap_or_else(|| ProcessGroup::single_ref());
        let train = if group.is_distributed() {
            train
                .split_across_ranks(group.rank(), group.world_size())
                .with_context(|| format!("stage '{}': data.batch_size", settings.stage))?
        } else {
            train
        };
        let optimizer = AdamW::new(&params, settings.optimizer.clone())?;
        let total_steps = total_steps(&settings, &train, seq_len)?;
        let schedule = Schedule::new(
            settings.schedule.clone(),
            settings.optimizer.lr,
            total_steps,
        )?;
        Ok(Self {
            seeds: SeedStream::new(settings.seed),
            settings,
            group,
            train,
            seq_len,
            params,
            optimizer,
            schedule,
            total_steps,
            step: 0,
            tokens: 0,
            best_val: None,
            best_params: None,
            latest_is_best: false,
            frozen: None,
        })
    }

    /// Snapshots the model's own weights (not the students' or adapters', which live in other
    /// stores) to check after training that they are bit-identical and gradient-free.
    pub fn capture_frozen(&mut self, model: &Model) -> Result<()> {
        let named: Vec<(String, Tensor)> = model.named_parameters().into_iter().collect();
        self.frozen = Some(FrozenSnapshot::capture(&named)?);
        Ok(())
    }

    /// Continues from a saved state of this stage: parameters, optimizer, schedule, data
    /// position, seeds, counters and (with `keep_best`) the best parameters.
    pub fn resume(&mut self, loaded: &LoadedState) -> Result<()> {
        let saved = &loaded.state;
        let s = &self.settings;
        ensure!(
            saved.stage == s.stage,
            "{} is a state of stage '{}', not of '{}'",
            loaded.dir.display(),
            saved.stage,
            s.stage
        );
        loaded.ensure_recipe(s.recipe_hash)?;
        ensure!(
            saved.run_step == s.run_step_offset + saved.step,
            "{}: run step {} does not follow {} updates of earlier stages plus {} of this one",
            loaded.dir.display(),
            saved.run_step,
            s.run_step_offset,
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
        self.best_val = saved.best_val_loss;
        if s.keep_best {
            if let Some(best) = state::load_best(s.run_dir)? {
                if best.state.stage == s.stage && best.state.recipe_hash == s.recipe_hash {
                    self.best_params = Some(best.tensors.params);
                }
            }
        }
        tracing::info!(dir = %loaded.dir.display(), step = self.step, stage = %s.stage, "resumed");
        Ok(())
    }

    /// With several ranks, fails on every rank unless all start from the same trainable values,
    /// optimizer step, data position and seeds (a rank that loaded another state, or
    /// initialised its parameters differently, would silently train another model). Call after
    /// [`LoopCore::resume`].
    pub fn ensure_ranks_agree(&self) -> Result<()> {
        if !self.group.is_distributed() {
            return Ok(());
        }
        let mut hash = Sha256::new();
        hash.update(serde_json::to_vec(&self.train_state()?)?);
        for (name, t) in self.params.named() {
            hash.update(name.as_bytes());
            let cpu = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
            let bytes = cpu.numel() * cpu.kind().elt_size_in_bytes();
            let mut buf = vec![0u8; bytes];
            cpu.f_copy_data_u8(&mut buf, cpu.numel())?;
            hash.update(&buf);
        }
        self.group.ensure_same(
            &format!(
                "stage '{}': the starting state (trainable parameters, step, data cursor, seeds)",
                self.settings.stage
            ),
            &hash.finalize(),
        )
    }

    /// Whether the job should stop here after a signal: agreed on by every rank (a signal may
    /// reach the ranks at different steps), so that all stop at the same step. Returns the
    /// signal (SIGTERM if it reached only other ranks).
    pub fn stop_requested(&self, preemption: Option<&Preemption>) -> Result<Option<i32>> {
        let local = preemption.and_then(Preemption::requested);
        if !self.group.is_distributed() {
            return Ok(local);
        }
        let mut signal = [local.map_or(0.0, f64::from)];
        self.group.all_reduce_f64(&mut signal, ReduceOp::Max)?;
        Ok((signal[0] > 0.0).then(|| local.unwrap_or(signal[0] as i32)))
    }

    /// The mean of each value over the ranks (losses for reporting), in place.
    pub fn mean_over_ranks(&self, values: &mut [f64]) -> Result<()> {
        if self.group.is_distributed() {
            self.group.all_reduce_f64(values, ReduceOp::Sum)?;
            let n = self.group.world_size() as f64;
            values.iter_mut().for_each(|v| *v /= n);
        }
        Ok(())
    }

    /// The sum of each value over the ranks (validation sums), in place.
    pub fn sum_over_ranks(&self, values: &mut [f64]) -> Result<()> {
        self.group.all_reduce_f64(values, ReduceOp::Sum)
    }

    /// This rank's validation batches: the first `max_batches` batches of `eval_batch_size`
    /// (all of them without a cap) dealt round-robin to the ranks, so the ranks together score
    /// exactly what one process would.
    pub fn val_batches<'v>(
        &self,
        val: &'v crate::data::PackedSequences,
        eval_batch_size: usize,
        max_batches: Option<usize>,
    ) -> Result<impl Iterator<Item = Tensor> + 'v> {
        let (rank, world) = (self.group.rank(), self.group.world_size());
        let mine = max_batches.map_or(usize::MAX, |max| {
            if max > rank {
                (max - rank).div_ceil(world)
            } else {
                0
            }
        });
        Ok(val.eval_batches(eval_batch_size, rank, world)?.take(mine))
    }

    /// Whether this rank reports (progress, metrics, summaries).
    pub fn is_main(&self) -> bool {
        self.group.is_main()
    }

    /// Starts an update: re-seeds torch from the seed stream (so random ops are a function of
    /// the step, identical after a resume) and clears the gradients.
    pub fn begin_step(&mut self) {
        self.seeds.reseed_torch();
        self.optimizer.zero_grad();
    }

    /// The next training batch; `None` when the data ran out.
    pub fn next_batch(&mut self) -> Option<Batch> {
        self.train.next_batch()
    }

    /// Ends an update: clips, applies AdamW at the schedule's learning rate (skipped on a
    /// non-finite gradient) and advances the counters. Returns `(lr, grad_norm before clipping)`.
    pub fn finish_step(&mut self) -> Result<(f64, f64)> {
        let _range = linearize_profile::range("optimizer");
        // Before clipping: the norm is that of the global batch's gradient, the same on every
        // rank, so every rank clips and skips alike.
        self.params.average_gradients(self.group)?;
        let grad_norm = match self.settings.max_grad_norm {
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
        Ok((lr, grad_norm))
    }

    /// Records a validation loss: tracks the best (saving `state/best` with `keep_best`) and
    /// feeds a plateau schedule. Returns whether it is the best so far.
    pub fn record_val(&mut self, loss: f64) -> Result<bool> {
        self.latest_is_best = self.best_val.is_none_or(|best| loss < best);
        if self.latest_is_best {
            self.best_val = Some(loss);
            if self.settings.keep_best {
                self.best_params = Some(tch::no_grad(|| {
                    self.params
                        .named()
                        .iter()
                        .map(|(name, t)| (name.clone(), t.copy()))
                        .collect()
                }));
                if self.group.is_main() {
                    state::save_best(self.settings.run_dir, &self.train_state()?, &self.tensors())?;
                }
            }
        }
        self.schedule.observe_val_loss(self.step, loss);
        Ok(self.latest_is_best)
    }

    /// With `keep_best`, puts the parameters of the best validation back when the latest
    /// validation was not the best. Returns whether it did.
    pub fn restore_best(&mut self) -> Result<bool> {
        match self.best_params.take() {
            Some(best) if self.settings.keep_best && !self.latest_is_best => {
                self.params.load(&best)?;
                tracing::info!(best = ?self.best_val, "restored the parameters of the best validation");
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn train_state(&self) -> Result<TrainState> {
        Ok(TrainState {
            stage: self.settings.stage.to_owned(),
            step: self.step,
            run_step: self.settings.run_step_offset + self.step,
            tokens_seen: self.tokens,
            best_val_loss: self.best_val,
            schedule: self.schedule.state(),
            rng: self.seeds.clone(),
            data_cursor: serde_json::to_value(self.train.cursor())?,
            recipe_hash: self.settings.recipe_hash.to_owned(),
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

    /// Saves a resumable state of the current step (rank 0 only: every rank holds the same
    /// values).
    pub fn save(&self) -> Result<()> {
        if self.group.is_main() {
            state::save_state(
                self.settings.run_dir,
                &self.train_state()?,
                &self.tensors(),
                self.settings.keep_last,
            )?;
        }
        Ok(())
    }

    /// [`LoopCore::save`], then waits until rank 0 has written it: before the ranks stop (a
    /// signal, the end of the stage), so that none exits while the state is still being
    /// written.
    pub fn save_and_wait(&self) -> Result<()> {
        self.save()?;
        self.group.barrier(&format!(
            "waiting for rank 0 to save the state of stage '{}' at step {}",
            self.settings.stage, self.step
        ))
    }
}

/// The mean of `values` (0 for none).
pub(crate) fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

/// The number of updates of the stage: the smallest of `max_steps`, the updates `max_tokens`
/// allows and the updates the batcher's own budget allows.
fn total_steps(s: &LoopSettings, train: &Batcher, seq_len: usize) -> Result<u64> {
    let tokens_per_step = s.grad_accum * train.step_sequences() as u64 * seq_len as u64;
    let by_data = train
        .remaining_steps()
        .map(|batches| (train.cursor().steps + batches) / s.grad_accum);
    let total = [
        s.max_steps,
        s.max_tokens.map(|t| t / tokens_per_step),
        by_data,
    ]
    .into_iter()
    .flatten()
    .min()
    .with_context(|| format!("stage '{}' needs max_steps or max_tokens", s.stage))?;
    ensure!(
        total > 0,
        "stage '{}': the budget allows no update ({tokens_per_step} tokens per update, \
         max_tokens {:?}, max_steps {:?}, data batches {by_data:?})",
        s.stage,
        s.max_tokens,
        s.max_steps
    );
    Ok(total)
}
