//! Learning-rate schedules: constant, linear warmup + cosine decay, and reduce-on-plateau driven
//! by validation loss; each with a serializable state so that a resumed run continues the same
//! curve.
//!
//! Step convention: `lr(step)` is the rate for the optimizer update that follows `step` completed
//! updates, so the first update uses `lr(0)`. Warmup rises linearly, `lr * (step + 1) / warmup`,
//! reaching the peak at update `warmup_steps` (the first update is never wasted at lr 0).
use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// A stage's `schedule` section, selected by `kind`. The peak learning rate is the optimizer's
/// `lr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleConfig {
    /// The peak rate throughout, after the warmup.
    Constant {
        /// Updates of linear warmup (0: none).
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Linear warmup, then half a cosine from the peak down to `min_lr_ratio * lr`, reached at the
    /// stage's last step (the usual `get_cosine_schedule_with_warmup` curve with a floor).
    Cosine {
        /// Updates of linear warmup (0: none); must be below the stage's number of steps.
        #[serde(default)]
        warmup_steps: u64,
        /// Final rate as a fraction of the peak, in [0, 1].
        #[serde(default)]
        min_lr_ratio: f64,
    },
    /// Linear warmup, then the rate is multiplied by `factor` whenever validation loss has not
    /// improved for more than `patience` evaluations (as torch's `ReduceLROnPlateau` in "min",
    /// "rel" mode). Evaluations during warmup only record the best loss.
    Plateau {
        /// Updates of linear warmup (0: none).
        #[serde(default)]
        warmup_steps: u64,
        /// Multiplier applied at each reduction, in (0, 1).
        #[serde(default = "default_factor")]
        factor: f64,
        /// Evaluations without improvement tolerated before a reduction.
        #[serde(default = "default_patience")]
        patience: u32,
        /// Relative improvement that counts: a loss below `best * (1 - threshold)`.
        #[serde(default = "default_threshold")]
        threshold: f64,
        /// Evaluations after a reduction during which no bad evaluation is counted.
        #[serde(default)]
        cooldown: u32,
        /// Floor of the rate (absolute).
        #[serde(default)]
        min_lr: f64,
    },
}

fn default_factor() -> f64 {
    0.1
}

fn default_patience() -> u32 {
    10
}

fn default_threshold() -> f64 {
    1e-4
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self::Cosine {
            warmup_steps: 0,
            min_lr_ratio: 0.0,
        }
    }
}

/// What a resumed schedule needs beyond its config: for plateau, the reduced rate and the
/// bookkeeping of recent evaluations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleState {
    Constant,
    Cosine,
    Plateau {
        /// Current (possibly reduced) rate before any warmup factor.
        lr: f64,
        /// Lowest validation loss seen so far.
        best: Option<f64>,
        /// Evaluations since the last improvement (outside warmup and cooldown).
        bad_evals: u32,
        /// Evaluations of cooldown left.
        cooldown_left: u32,
    },
}

/// A schedule bound to a peak rate and a stage length.
#[derive(Debug, Clone)]
pub struct Schedule {
    config: ScheduleConfig,
    peak_lr: f64,
    total_steps: u64,
    state: ScheduleState,
}

impl Schedule {
    /// `peak_lr` is the optimizer's `lr`; `total_steps` the stage's number of updates.
    pub fn new(config: ScheduleConfig, peak_lr: f64, total_steps: u64) -> Result<Self> {
        ensure!(
            peak_lr.is_finite() && peak_lr > 0.0,
            "peak learning rate must be > 0, got {peak_lr}"
        );
        let state = match &config {
            ScheduleConfig::Constant { .. } => ScheduleState::Constant,
            ScheduleConfig::Cosine {
                warmup_steps,
                min_lr_ratio,
            } => {
                ensure!(
                    *warmup_steps < total_steps,
                    "schedule.warmup_steps ({warmup_steps}) must be below the stage's steps ({total_steps})"
                );
                ensure!(
                    (0.0..=1.0).contains(min_lr_ratio),
                    "schedule.min_lr_ratio must be in [0, 1], got {min_lr_ratio}"
                );
                ScheduleState::Cosine
            }
            ScheduleConfig::Plateau {
                factor,
                threshold,
                min_lr,
                ..
            } => {
                ensure!(
                    *factor > 0.0 && *factor < 1.0,
                    "schedule.factor must be in (0, 1), got {factor}"
                );
                ensure!(
                    threshold.is_finite() && *threshold >= 0.0,
                    "schedule.threshold must be >= 0, got {threshold}"
                );
                ensure!(
                    min_lr.is_finite() && *min_lr >= 0.0 && *min_lr <= peak_lr,
                    "schedule.min_lr must be in [0, lr = {peak_lr}], got {min_lr}"
                );
                ScheduleState::Plateau {
                    lr: peak_lr,
                    best: None,
                    bad_evals: 0,
                    cooldown_left: 0,
                }
            }
        };
        Ok(Self {
            config,
            peak_lr,
            total_steps,
            state,
        })
    }

    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// The rate for the update after `step` completed updates.
    pub fn lr(&self, step: u64) -> f64 {
        let warmup_steps = match self.config {
            ScheduleConfig::Constant { warmup_steps }
            | ScheduleConfig::Cosine { warmup_steps, .. }
            | ScheduleConfig::Plateau { warmup_steps, .. } => warmup_steps,
        };
        if step < warmup_steps {
            let base = match self.state {
                ScheduleState::Plateau { lr, .. } => lr,
                _ => self.peak_lr,
            };
            return base * (step + 1) as f64 / warmup_steps as f64;
        }
        match (&self.config, &self.state) {
            (ScheduleConfig::Cosine { min_lr_ratio, .. }, _) => {
                let decay_steps = (self.total_steps - warmup_steps) as f64;
                let progress = ((step - warmup_steps) as f64 / decay_steps).min(1.0);
                let cosine = 0.5 * (1.0 + (PI * progress).cos());
                self.peak_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)
            }
            (_, ScheduleState::Plateau { lr, .. }) => *lr,
            _ => self.peak_lr,
        }
    }

    /// Feeds the validation loss measured after `step` updates. Returns the new rate when this
    /// evaluation reduced it. Schedules other than plateau ignore it.
    pub fn observe_val_loss(&mut self, step: u64, loss: f64) -> Option<f64> {
        let ScheduleConfig::Plateau {
            warmup_steps,
            factor,
            patience,
            threshold,
            cooldown,
            min_lr,
        } = self.config
        else {
            return None;
        };
        let ScheduleState::Plateau {
            lr,
            best,
            bad_evals,
            cooldown_left,
        } = &mut self.state
        else {
            unreachable!("a plateau config always has a plateau state");
        };
        let improved = match *best {
            None => loss.is_finite(),
            Some(best) => loss < best * (1.0 - threshold),
        };
        if improved {
            *best = Some(loss);
            *bad_evals = 0;
        } else if step >= warmup_steps {
            *bad_evals += 1;
        }
        if *cooldown_left > 0 {
            *cooldown_left -= 1;
            *bad_evals = 0;
        }
        if *bad_evals > patience {
            let reduced = (*lr * factor).max(min_lr);
            *bad_evals = 0;
            *cooldown_left = cooldown;
            if reduced < *lr {
                tracing::info!(
                    step,
                    from = *lr,
                    to = reduced,
                    "validation loss plateaued: reducing lr"
                );
                *lr = reduced;
                return Some(reduced);
            }
        }
        None
    }

    /// The state to save with a checkpoint.
    pub fn state(&self) -> ScheduleState {
        self.state.clone()
    }

    /// Restores a state saved by [`Schedule::state`] from a schedule of the same kind.
    pub fn restore(&mut self, state: ScheduleState) -> Result<()> {
        match (&self.state, &state) {
            (ScheduleState::Constant, ScheduleState::Constant)
            | (ScheduleState::Cosine, ScheduleState::Cosine) => {}
            (ScheduleState::Plateau { .. }, ScheduleState::Plateau { lr, .. }) => {
                ensure!(
                    lr.is_finite() && *lr > 0.0 && *lr <= self.peak_lr,
                    "saved plateau schedule has lr {lr}, expected a value in (0, {}]",
                    self.peak_lr
                );
            }
            (mine, saved) => bail!(
                "saved schedule state is for a {} schedule, but the recipe asks for {}",
                kind_name(saved),
                kind_name(mine)
            ),
        }
        self.state = state;
        Ok(())
    }
}

fn kind_name(state: &ScheduleState) -> &'static str {
    match state {
        ScheduleState::Constant => "constant",
        ScheduleState::Cosine => "cosine",
        ScheduleState::Plateau { .. } => "plateau",
    }
}
