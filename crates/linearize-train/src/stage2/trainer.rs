//! The LoRA loop: batches, accumulation, clipping, AdamW, schedule, validation, best state,
//! metrics, progress, resumable states (the shared parts in [`crate::train_loop`]).
use super::loss::{ChunkedLoss, Losses, Scored};
use super::teacher::teacher_hidden;
use super::{Stage2Config, Stage2Data, Stage2Job, Stage2Summary, ValLoss};
use crate::convert::ConvertedLayers;
use crate::data::PackedSequences;
use crate::lora::LoraAdapters;
use crate::metrics::{MetricRecord, MetricsWriter, Split};
use crate::optim::Trainable;
use crate::progress::TrainProgress;
use crate::train_loop::{loop_settings, run_stage, LoopCore, Stage};
use anyhow::{ensure, Context, Result};
use linearize_models::llama::Model;
use tch::{Kind, Tensor};

pub(super) struct Trainer<'a> {
    cfg: &'a Stage2Config,
    metrics: &'a mut MetricsWriter,
    converted: &'a ConvertedLayers,
    lora: &'a LoraAdapters,
    val: Option<PackedSequences>,
    core: LoopCore<'a>,
}

/// Mean training losses of one update.
pub(super) struct StepLoss {
    lm_loss: f64,
    kl: Option<f64>,
    /// The weighted objective.
    loss: f64,
    lr: f64,
    /// Before clipping.
    grad_norm: f64,
}

impl<'a> Trainer<'a> {
    pub(super) fn new(
        model: &Model,
        converted: &'a ConvertedLayers,
        lora: &'a LoraAdapters,
        data: Stage2Data,
        cfg: &'a Stage2Config,
        job: Stage2Job<'a>,
    ) -> Result<Self> {
        let mut params = lora.named_parameters();
        if cfg.train_attention {
            params.extend(converted.named_parameters());
            params.sort_by(|a, b| a.0.cmp(&b.0));
        }
        let params = Trainable::new(params)?;
        let settings = loop_settings!(cfg, job);
        let mut core = LoopCore::new(settings, job.group, data.train, data.seq_len, params)?;
        // The base weights only: untrained student parameters cannot change (they are not
        // optimised and `run_stage2` turns their gradients off), but may still hold the zeroed
        // gradients stage 1 left, which the snapshot would report.
        if cfg.verify_frozen {
            core.capture_frozen(model)?;
        }
        if let Some(loaded) = job.resume {
            core.resume(loaded)?;
        }
        core.ensure_ranks_agree()?;
        tracing::info!(
            stage = %cfg.name,
            adapters = lora.len(),
            parameters = core.params.num_elements(),
            total_steps = core.total_steps,
            start_step = core.step,
            "LoRA"
        );
        Ok(Self {
            cfg,
            metrics: job.metrics,
            converted,
            lora,
            val: data.val,
            core,
        })
    }

    pub(super) fn run(mut self, model: &mut Model) -> Result<Stage2Summary> {
        let cfg = self.cfg;
        let end = run_stage(&mut self, model, &cfg.name)?;
        Ok(Stage2Summary {
            steps: self.core.step,
            tokens: self.core.tokens,
            initial_val: end.initial_val,
            final_val: end.final_val,
            best_val_loss: self.core.best_val,
        })
    }

    /// Forward and backward passes of one update's micro-batches; the summed `(lm_loss, kl,
    /// objective)`, or `None` when the data ran out.
    fn accumulate(&mut self, model: &mut Model) -> Result<Option<(f64, Option<f64>, f64)>> {
        let cfg = self.cfg;
        let (mut lm_sum, mut kl_sum, mut loss_sum) = (0.0, None::<f64>, 0.0);
        for _ in 0..cfg.grad_accum {
            let Some(batch) = self.core.next_batch() else {
                return Ok(None);
            };
            let scored = Scored::new(&batch.tokens, self.core.seq_len)?;
            let ids = scored.inputs.to_device(model.device()); // (b, L)
            let teacher = cfg
                .loss
                .uses_teacher()
                .then(|| {
                    let _range = linearize_profile::range("teacher");
                    teacher_hidden(model, self.converted, self.lora, true, &ids)
                })
                .transpose()?; // (b, L, hidden)
            let model: &Model = model;
            let chunked = ChunkedLoss {
                model,
                spec: &cfg.loss,
                chunk: cfg.loss_chunk,
            };
            let mut losses = None;
            // The objective's value as `sum(hidden · grad)`, grad (b, n, hidden) the gradient of
            // the scaled loss with respect to the scored positions' hidden states: its backward
            // runs the model's layers once for all chunks.
            let mut objective = |hidden: &Tensor| -> Result<Tensor> {
                let (value, grad) = chunked.evaluate(
                    hidden,
                    teacher.as_ref(),
                    &scored.targets,
                    Some(1.0 / cfg.grad_accum as f64),
                )?;
                losses = Some(value);
                let grad = grad.context("a gradient was asked for")?;
                let n = grad.size()[1];
                Ok((hidden.narrow(1, 0, n) * grad).sum(Kind::Float))
            };
            if cfg.activation_checkpointing {
                let _range = linearize_profile::range("checkpointed forward and backward");
                model.backward_checkpointed(&ids, &mut objective)?;
            } else {
                let forward = linearize_profile::range("forward");
                let hidden = model.hidden_states(&ids, None)?; // (b, L, hidden)
                drop(forward);
                let _range = linearize_profile::range("loss and backward");
                objective(&hidden)?.f_backward()?;
            }
            let Losses { lm, kl, loss } =
                losses.context("the stage-2 objective was not evaluated")?;
            lm_sum += lm;
            if let Some(kl) = kl {
                *kl_sum.get_or_insert(0.0) += kl;
            }
            loss_sum += loss;
        }
        Ok(Some((lm_sum, kl_sum, loss_sum)))
    }
}

impl<'a> Stage<'a> for Trainer<'a> {
    type Step = StepLoss;
    type Val = ValLoss;

    fn core(&mut self) -> &mut LoopCore<'a> {
        &mut self.core
    }

    fn shown_loss(step: &StepLoss) -> f64 {
        step.loss
    }

    fn val_step(val: &ValLoss) -> u64 {
        val.step
    }

    /// One optimizer update over `grad_accum` micro-batches; `None` when the data ran out.
    fn train_step(&mut self, model: &mut Model) -> Result<Option<StepLoss>> {
        let cfg = self.cfg;
        self.core.begin_step();
        self.lora.attach(model, true)?;
        let result = self.accumulate(model);
        self.lora.attach(model, false)?;
        let Some((lm, kl, loss)) = result? else {
            return Ok(None);
        };
        let (lr, grad_norm) = self.core.finish_step()?;
        let n = cfg.grad_accum as f64;
        // Each rank measured its share of the batch (equal shares): the batch's loss is the mean.
        let mut values = [lm / n, kl.unwrap_or(0.0) / n, loss / n];
        self.core.mean_over_ranks(&mut values)?;
        Ok(Some(StepLoss {
            lm_loss: values[0],
            kl: kl.map(|_| values[1]),
            loss: values[2],
            lr,
            grad_norm,
        }))
    }
    fn log_train(&mut self, loss: &StepLoss, tokens_per_s: Option<f64>) -> Result<()> {
        let mut record = MetricRecord::new(
            &self.cfg.name,
            self.core.step,
            self.core.tokens,
            Split::Train,
        )
        .with("lm_loss", loss.lm_loss)
        .with("loss", loss.loss);
        if let Some(kl) = loss.kl {
            record = record.with("kl", kl);
        }
        record.lr = Some(loss.lr);
        record.grad_norm = Some(loss.grad_norm);
        record.tokens_per_s = tokens_per_s;
        self.metrics.write(record)
    }
    /// Validates, records the result, tracks the best state and feeds a plateau schedule.
    fn validate(&mut self, model: &mut Model, progress: &TrainProgress) -> Result<Option<ValLoss>> {
        let Some(val) = self.measure(model)? else {
            return Ok(None);
        };
        let mut record =
            MetricRecord::new(&self.cfg.name, self.core.step, self.core.tokens, Split::Val)
                .with("lm_loss", val.lm_loss)
                .with("ppl", val.ppl)
                .with("loss", val.loss);
        if let Some(kl) = val.kl {
            record = record.with("kl", kl);
        }
        self.metrics.write(record)?;
        let kl = val.kl.map(|kl| format!(", KL {kl:.4}")).unwrap_or_default();
        progress.println(&format!(
            "step {}: validation lm loss {:.4} (ppl {:.2}){kl}",
            self.core.step, val.lm_loss, val.ppl
        ));
        self.core.record_val(val.loss)?;
        Ok(Some(val))
    }
    /// Mean validation losses per scored token (all sequences score the same number).
    fn measure(&self, model: &mut Model) -> Result<Option<ValLoss>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let cfg = self.cfg;
        let (mut lm_sum, mut kl_sum, mut sequences) = (0.0, 0.0, 0usize);
        let batches = self
            .core
            .val_batches(val, cfg.eval_batch_size, cfg.max_eval_batches)?;
        for tokens in batches {
            let n = tokens.size()[0] as usize;
            let scored = Scored::new(&tokens, val.seq_len())?;
            let ids = scored.inputs.to_device(model.device()); // (n, L)
            let hidden = tch::no_grad(|| model.hidden_states(&ids, None))?; // (n, L, hidden)
            let teacher = cfg
                .loss
                .uses_teacher()
                .then(|| teacher_hidden(model, self.converted, self.lora, false, &ids))
                .transpose()?;
            let chunked = ChunkedLoss {
                model,
                spec: &cfg.loss,
                chunk: cfg.loss_chunk,
            };
            let (losses, _) = tch::no_grad(|| {
                chunked.evaluate(&hidden, teacher.as_ref(), &scored.targets, None)
            })?;
            lm_sum += losses.lm * n as f64;
            kl_sum += losses.kl.unwrap_or(0.0) * n as f64;
            sequences += n;
        }
        // Each rank scored its share of the batches: add the shares up.
        let mut sums = [lm_sum, kl_sum, sequences as f64];
        self.core.sum_over_ranks(&mut sums)?;
        let [lm_sum, kl_sum, sequences] = sums;
        let sequences = sequences as usize;
        ensure!(sequences > 0, "validation data holds no sequence");
        let lm = lm_sum / sequences as f64;
        let kl = cfg.loss.uses_teacher().then(|| kl_sum / sequences as f64);
        let loss = cfg.loss.combine_values(lm, kl);
        Ok(Some(ValLoss {
            step: self.core.step,
            lm_loss: lm,
            ppl: lm.exp(),
            kl,
            loss,
        }))
    }
}
