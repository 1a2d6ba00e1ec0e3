//! Per-layer attention output error of the converted layers: how well each student attention
//! reproduces the teacher's softmax attention output (before o_proj) on validation text.
//!
//! Measured as stage 1 trains it: every converted layer of the student is wrapped for the
//! duration of the measurement by a probe that runs the student mixer and causal softmax
//! attention on the same q, k, v (the student model's own projections, which are the teacher's
//! unless stage 2 trained adapters into them) and passes the softmax output on, so each layer's
//! error is its own and not the accumulated drift of the layers before it. The probes are removed
//! again before [`attention_error`] returns, whatever happens.
//!
//! Per layer: `mse` = mean over all output elements of (y_student - y_teacher)^2, and
//! `relative_error` = ||y_student - y_teacher|| / ||y_teacher|| (Frobenius norms over all scored
//! windows), which compares across layers whose outputs differ in scale.
use crate::perplexity::{windows, WindowOptions};
use anyhow::{anyhow, ensure, Context, Result};
use linearize_models::llama::Model;
use linearize_models::mixer::{Mixer, MixerInput, MixerState, SoftmaxMixer};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::{Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerError {
    pub layer: usize,
    /// The student mixer's name, e.g. `lolcats-sw64+hedgehog64`.
    pub method: String,
    pub mse: f64,
    pub relative_error: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionErrorReport {
    pub ctx: usize,
    pub windows: usize,
    /// Converted layers, in order; empty when the student has none.
    pub layers: Vec<LayerError>,
}

/// The layers whose attention the student replaced: those whose mixer differs (by name) from
/// the teacher's.
pub fn converted_layers(teacher: &Model, student: &Model) -> Result<Vec<usize>> {
    ensure!(
        teacher.num_layers() == student.num_layers(),
        "the teacher has {} layers, the student {}: not a conversion of it",
        teacher.num_layers(),
        student.num_layers()
    );
    Ok((0..student.num_layers())
        .filter(|&i| teacher.mixer(i).name() != student.mixer(i).name())
        .collect())
}

/// The attention error of every converted layer of `student` on the protocol windows of
/// `tokens`. The reference is causal softmax attention with the teacher's sliding window.
pub fn attention_error(
    teacher: &Model,
    student: &mut Model,
    tokens: &[u32],
    options: &WindowOptions,
) -> Result<AttentionErrorReport> {
    let layers = converted_layers(teacher, student)?;
    let windows = windows(tokens, options)?;
    let mut probed = Probed {
        model: student,
        probes: Vec::new(),
    };
    for &layer in &layers {
        let reference = SoftmaxMixer::new(teacher.config().layer_window(layer));
        probed.install(layer, reference)?;
    }
    let _no_grad = tch::no_grad_guard();
    let device = probed.model.device();
    for batch in windows.chunks(options.batch_size) {
        linearize_models::stop::check()?;
        let ids: Vec<i64> = batch
            .iter()
            .flat_map(|w| w.iter().map(|&t| t as i64))
            .collect();
        let ids = Tensor::from_slice(&ids)
            .view([batch.len() as i64, options.ctx as i64])
            .to_device(device);
        // Only what the probes record is wanted, not the hidden states.
        let _hidden = probed
            .model
            .hidden_states(&ids, None)
            .context("running the student with attention probes")?;
    }
    let layers = probed.restore()?;
    Ok(AttentionErrorReport {
        ctx: options.ctx,
        windows: windows.len(),
        layers,
    })
}

/// What a probe shares with [`Probed`]: the wrapped student mixer (given back afterwards) and
/// the running sums of its error.
struct Probe {
    student: Option<Box<dyn Mixer>>,
    method: String,
    squared_error: f64,
    squared_reference: f64,
    elements: f64,
}

type SharedProbe = Arc<Mutex<Probe>>;

fn lock(probe: &SharedProbe) -> MutexGuard<'_, Probe> {
    // A panic inside a probe leaves its sums unusable but the student mixer intact, and the
    // mixer must still go back into the model.
    probe
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The mixer installed in a converted layer while it is measured.
struct ProbeMixer {
    layer: usize,
    reference: SoftmaxMixer,
    probe: SharedProbe,
}

impl Mixer for ProbeMixer {
    fn forward(&self, input: &MixerInput, state: Option<&mut MixerState>) -> Result<Tensor> {
        ensure!(
            state.is_none(),
            "layer {} is being measured and runs whole sequences only",
            self.layer
        );
        let mut probe = lock(&self.probe);
        let student = probe
            .student
            .as_ref()
            .ok_or_else(|| anyhow!("layer {}: the probe's student mixer is gone", self.layer))?;
        let y_student = student
            .forward(input, None)
            .with_context(|| format!("student attention of layer {}", self.layer))?;
        let y_teacher = self.reference.forward(input, None)?;
        let teacher32 = y_teacher.to_kind(Kind::Float);
        let diff = y_student.to_kind(Kind::Float) - &teacher32;
        probe.squared_error += diff.square().sum(Kind::Double).double_value(&[]);
        probe.squared_reference += teacher32.square().sum(Kind::Double).double_value(&[]);
        probe.elements += y_teacher.numel() as f64;
        Ok(y_teacher)
    }

    fn new_state(&self, _batch: i64) -> Result<MixerState> {
        Err(anyhow!(
            "layer {} is being measured and cannot decode",
            self.layer
        ))
    }

    fn name(&self) -> String {
        format!("probe({})", lock(&self.probe).method)
    }
}

/// A student with probes in some layers; dropping it puts the student mixers back.
struct Probed<'a> {
    model: &'a mut Model,
    probes: Vec<(usize, SharedProbe)>,
}

impl Probed<'_> {
    fn install(&mut self, layer: usize, reference: SoftmaxMixer) -> Result<()> {
        let method = self.model.mixer(layer).name();
        let probe = Arc::new(Mutex::new(Probe {
            student: None,
            method,
            squared_error: 0.0,
            squared_reference: 0.0,
            elements: 0.0,
        }));
        let mixer = ProbeMixer {
            layer,
            reference,
            probe: probe.clone(),
        };
        let student = self.model.set_mixer(layer, Box::new(mixer))?;
        lock(&probe).student = Some(student);
        self.probes.push((layer, probe));
        Ok(())
    }

    /// Puts the student mixers back and returns each layer's error.
    fn restore(mut self) -> Result<Vec<LayerError>> {
        let sums: Vec<LayerError> = self
            .probes
            .iter()
            .map(|(layer, probe)| {
                let p = lock(probe);
                LayerError {
                    layer: *layer,
                    method: p.method.clone(),
                    mse: p.squared_error / p.elements,
                    relative_error: (p.squared_error / p.squared_reference).sqrt(),
                }
            })
            .collect();
        self.put_back()?;
        Ok(sums)
    }

    fn put_back(&mut self) -> Result<()> {
        for (layer, probe) in self.probes.drain(..) {
            let student = lock(&probe)
                .student
                .take()
                .ok_or_else(|| anyhow!("layer {layer}: the student mixer was already taken"))?;
            self.model.set_mixer(layer, student)?;
        }
        Ok(())
    }
}

impl Drop for Probed<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.put_back() {
            tracing::error!("restoring the student's attention after measuring it: {err:#}");
        }
    }
}
