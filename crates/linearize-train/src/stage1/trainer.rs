//! The attention-transfer loop: batches, accumulation, clipping, AdamW, schedule, validation,
//! best state, metrics, progress, resumable states.
use super::transfer::{set_mode, take_losses, with_mode, LayerLoss, SharedTap, TapMode};
use super::{Stage1Config, Stage1Data, Stage1Job, Stage1Summary, ValMse};
use crate::convert::ConvertedLayers;
use crate::data::PackedSequences;
use crate::metrics::{MetricRecord, MetricsWriter, Split};
use crate::optim::Trainable;
use crate::progress::TrainProgress;
use crate::stage2::kl_to_teacher;
use crate::train_loop::{loop_settings, mean, run_stage, LoopCore, Stage};
use anyhow::{bail, ensure, Context, Result};
use linearize_attention::linearized::Method;
use linearize_models::llama::Model;
use tch::Tensor;

pub(super) struct Trainer<'a> {
    cfg: &'a Stage1Config,
    metrics: &'a mut MetricsWriter,
    tap: SharedTap,
    layers: Vec<usize>,
    val: Option<PackedSequences>,
    core: LoopCore<'a>,
}

/// Mean training loss terms of one update.
pub(super) struct StepLoss {
    attn_mse: f64,
    /// The objective: `mse_factor * attn_mse (+ xent_factor * xent) (+ kl_factor * kl)`.
    loss: f64,
    xent: Option<f64>,
    /// KL(teacher || student) per token, with `kl_factor`.
    kl: Option<f64>,
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
        let settings = loop_settings!(cfg, job);
        let mut core = LoopCore::new(settings, job.group, data.train, data.seq_len, params)?;
        if cfg.verify_frozen {
            core.capture_frozen(model)?;
        }
        if let Some(loaded) = job.resume {
            core.resume(loaded)?;
        }
        core.ensure_ranks_agree()?;
        tracing::info!(
            stage = %cfg.name,
            layers = converted.len(),
            parameters = core.params.num_elements(),
            total_steps = core.total_steps,
            start_step = core.step,
            "attention transfer"
        );
        Ok(Self {
            cfg,
            metrics: job.metrics,
            tap,
            layers: converted.indices(),
            val: data.val,
            core,
        })
    }

    pub(super) fn run(mut self, model: &mut Model) -> Result<Stage1Summary> {
        let cfg = self.cfg;
        let end = run_stage(&mut self, model, &cfg.name)?;
        Ok(Stage1Summary {
            steps: self.core.step,
            tokens: self.core.tokens,
            initial_val: end.initial_val,
            final_val: end.final_val,
            best_val_loss: self.core.best_val,
        })
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

    /// KL(teacher || student) per token for `ids` (b, L), from a pass of the whole converted
    /// model (student outputs flow on). `teacher_hidden` (b, L, hidden) are the final hidden
    /// states of the transfer pass over the same `ids`: it passed the teacher's attention output
    /// on in every layer, so they are the teacher's own, and the teacher costs no third pass.
    /// With `backward_scale`, backpropagates `kl * backward_scale` into the converted layers
    /// (checkpointed with `kl_activation_checkpointing`).
    fn student_kl(
        &self,
        model: &Model,
        ids: &Tensor,
        teacher_hidden: &Tensor,
        backward_scale: Option<f64>,
    ) -> Result<f64> {
        let teacher = tch::no_grad(|| model.logits(teacher_hidden)); // (b, L, V) f32
        let _range = linearize_profile::range("transfer.kl");
        let kl = with_mode(&self.tap, TapMode::Student, || match backward_scale {
            Some(scale) if self.cfg.kl_activation_checkpointing => {
                let mut kl = None;
                model.backward_checkpointed(ids, &mut |hidden| {
                    let value = kl_to_teacher(&model.logits(hidden), &teacher);
                    kl = Some(value.detach());
                    Ok(value * scale)
                })?;
                kl.context("the KL term was not evaluated")
            }
            Some(scale) => {
                let kl = kl_to_teacher(&model.forward(ids, None)?, &teacher); // logits (b, L, V)
                (&kl * scale).f_backward()?;
                Ok(kl)
            }
            None => Ok(kl_to_teacher(&model.forward(ids, None)?, &teacher)),
        })?;
        Ok(kl.double_value(&[]))
    }

    /// Means over micro-batches (per layer) and over layers; `kl` is already the micro-batches'
    /// mean.
    fn summarise(
        &self,
        losses: &[LayerLoss],
        kl: Option<f64>,
        lr: f64,
        grad_norm: f64,
    ) -> StepLoss {
        let per_layer = per_layer_means(&self.layers, losses, |l| l.mse);
        let attn_mse = mean(per_layer.iter().map(|(_, m)| *m));
        let xent = losses
            .iter()
            .map(|l| l.xent)
            .collect::<Option<Vec<f64>>>()
            .map(|x| mean(x.into_iter()));
        let loss = self.cfg.mse_factor * attn_mse
            + self.cfg.xent_factor * xent.unwrap_or(0.0)
            + self.cfg.kl_factor * kl.unwrap_or(0.0);
        StepLoss {
            attn_mse,
            loss,
            xent,
            kl,
            per_layer,
            lr,
            grad_norm,
        }
    }
}

impl<'a> Stage<'a> for Trainer<'a> {
    type Step = StepLoss;
    type Val = ValMse;

    fn core(&mut self) -> &mut LoopCore<'a> {
        &mut self.core
    }

    /// The attention MSE, or with the KL term the objective (MSE alone would hide the KL).
    fn shown_loss(step: &StepLoss) -> f64 {
        step.kl.map_or(step.attn_mse, |_| step.loss)
    }

    fn val_step(val: &ValMse) -> u64 {
        val.step
    }

    /// One optimizer update over `grad_accum` micro-batches; `None` when the data ran out.
    fn train_step(&mut self, model: &mut Model) -> Result<Option<StepLoss>> {
        let cfg = self.cfg;
        self.core.begin_step();
        let accum = cfg.grad_accum as f64;
        let scale = 1.0 / (self.layers.len() as f64 * accum);
        set_mode(
            &self.tap,
            TapMode::Train {
                backward_scale: scale,
            },
        )?;
        let mut losses = Vec::new();
        let mut kl_sum = 0.0;
        for _ in 0..cfg.grad_accum {
            let Some(batch) = self.core.next_batch() else {
                return Ok(None);
            };
            // The wrapped layers backpropagate their losses; the hidden states (the teacher's)
            // are only needed for the KL term.
            let ids = batch.inputs().to_device(model.device()); // (b, L)
            let hidden = model.hidden_states(&ids, None)?; // (b, L, hidden)
            losses.extend(self.collect(take_losses(&self.tap)?)?);
            if cfg.kl_factor > 0.0 {
                kl_sum += self.student_kl(model, &ids, &hidden, Some(cfg.kl_factor / accum))?;
            }
        }
        let (lr, grad_norm) = self.core.finish_step()?;
        let kl = (cfg.kl_factor > 0.0).then_some(kl_sum / accum);
        let mut loss = self.summarise(&losses, kl, lr, grad_norm);
        // Each rank measured its share of the batch (equal shares): the batch's loss is the mean.
        let mut values = vec![
            loss.attn_mse,
            loss.loss,
            loss.xent.unwrap_or(0.0),
            loss.kl.unwrap_or(0.0),
        ];
        values.extend(loss.per_layer.iter().map(|(_, m)| *m));
        self.core.mean_over_ranks(&mut values)?;
        (loss.attn_mse, loss.loss) = (values[0], values[1]);
        loss.xent = loss.xent.map(|_| values[2]);
        loss.kl = loss.kl.map(|_| values[3]);
        for ((_, m), v) in loss.per_layer.iter_mut().zip(&values[4..]) {
            *m = *v;
        }
        Ok(Some(loss))
    }
    fn log_train(&mut self, loss: &StepLoss, tokens_per_s: Option<f64>) -> Result<()> {
        let mut record = MetricRecord::new(
            &self.cfg.name,
            self.core.step,
            self.core.tokens,
            Split::Train,
        )
        .with("attn_mse", loss.attn_mse)
        .with("loss", loss.loss)
        .with_layers("attn_mse", loss.per_layer.iter().copied());
        if let Some(xent) = loss.xent {
            record = record.with("attn_xent", xent);
        }
        if let Some(kl) = loss.kl {
            record = record.with("kl", kl);
        }
        record.lr = Some(loss.lr);
        record.grad_norm = Some(loss.grad_norm);
        record.tokens_per_s = tokens_per_s;
        self.metrics.write(record)
    }
    /// Validates, records the result, tracks the best state and feeds a plateau schedule.
    fn validate(&mut self, model: &mut Model, progress: &TrainProgress) -> Result<Option<ValMse>> {
        let Some(val) = self.measure(model)? else {
            return Ok(None);
        };
        let mut record =
            MetricRecord::new(&self.cfg.name, self.core.step, self.core.tokens, Split::Val)
                .with("attn_mse", val.attn_mse)
                .with_layers("attn_mse", val.per_layer.iter().copied());
        if let Some(kl) = val.kl {
            record = record.with("kl", kl).with("loss", val.loss);
        }
        self.metrics.write(record)?;
        let kl = val.kl.map(|kl| format!(", KL {kl:.4}")).unwrap_or_default();
        progress.println(&format!(
            "step {}: validation attention MSE {:.6}{kl}",
            self.core.step, val.attn_mse
        ));
        self.core.record_val(val.loss)?;
        Ok(Some(val))
    }
    /// Mean validation attention MSE per layer (and KL), weighting batches by their sequences.
    fn measure(&self, model: &mut Model) -> Result<Option<ValMse>> {
        let Some(val) = &self.val else {
            return Ok(None);
        };
        let cfg = self.cfg;
        set_mode(&self.tap, TapMode::Eval)?;
        let mut sums = vec![0.0; self.layers.len()];
        let (mut kl_sum, mut sequences) = (0.0, 0usize);
        let batches =
            self.core
                .val_batches(val, self.cfg.eval_batch_size, self.cfg.max_eval_batches)?;
        for tokens in batches {
            let n = tokens.size()[0] as usize;
            let ids = tokens
                .narrow(1, 0, val.seq_len() as i64)
                .to_device(model.device()); // (n, L)
            let hidden = tch::no_grad(|| model.hidden_states(&ids, None))?; // (n, L, hidden)
            for (sum, loss) in sums.iter_mut().zip(self.collect(take_losses(&self.tap)?)?) {
                *sum += loss.mse * n as f64;
            }
            if cfg.kl_factor > 0.0 {
                let kl = tch::no_grad(|| self.student_kl(model, &ids, &hidden, None))?;
                kl_sum += kl * n as f64;
            }
            sequences += n;
        }
        // Each rank scored its share of the batches: add the shares up.
        sums.extend([kl_sum, sequences as f64]);
        self.core.sum_over_ranks(&mut sums)?;
        let sequences = sums.pop().expect("pushed above") as usize;
        let kl_sum = sums.pop().expect("pushed above");
        ensure!(sequences > 0, "validation data holds no sequence");
        let per_layer: Vec<(usize, f64)> = self
            .layers
            .iter()
            .zip(sums)
            .map(|(&layer, sum)| (layer, sum / sequences as f64))
            .collect();
        let attn_mse = mean(per_layer.iter().map(|(_, m)| *m));
        let kl = (cfg.kl_factor > 0.0).then(|| kl_sum / sequences as f64);
        // Without the KL term the best state is the best MSE, as before the term existed.
        let loss = kl.map_or(attn_mse, |kl| {
            cfg.mse_factor * attn_mse + cfg.kl_factor * kl
        });
        Ok(Some(ValMse {
            step: self.core.step,
            attn_mse,
            per_layer,
            kl,
            loss,
        }))
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
