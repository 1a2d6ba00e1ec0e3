//! Retrieval heads of the teacher (Wu et al. 2024, "Retrieval Head Mechanistically Explains
//! Long-Context Factuality"; DuoAttention; RazorAttention): for every layer and query head, the
//! share of its attention that the positions producing a copied answer put on the tokens being
//! copied, on passkey and MQAR probes. The probes are teacher-forced: one forward pass per probe,
//! with the pass key appended to a passkey prompt, and every layer's softmax weights are
//! recomputed for the answer positions only. A head that looks facts up puts most of its mass on
//! them; few heads do. `conversion.softmax_heads: {by: retrieval}` keeps the top heads softmax in
//! a head-level hybrid (linearize_train::selection).
//!
//! Per head: `passkey` = mean over the passkey answer positions of the attention mass on the key
//! tokens (every mention of the key in the prompt), `mqar` = the same over the MQAR answer
//! positions and the pair's value tokens, `score` = their mean.
use crate::recall::{mqar_samples, passkey_prompts, MqarConfig, PasskeyConfig};
use anyhow::{anyhow, ensure, Context, Result};
use linearize_models::llama::Model;
use linearize_models::mixer::{Mixer, MixerInput, MixerState};
use linearize_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::{Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrievalHeadsConfig {
    pub enabled: bool,
    /// Length of the passkey probes, tokens (capped at the model's context).
    pub passkey_length: usize,
    /// Passkey probes, needles at depths (i + 0.5) / passkey_probes.
    pub passkey_probes: usize,
    /// MQAR probes and the pairs of each.
    pub mqar_probes: usize,
    pub mqar_pairs: usize,
    /// Heads listed in the report, best first.
    pub top: usize,
}

impl Default for RetrievalHeadsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            passkey_length: 1024,
            passkey_probes: 4,
            mqar_probes: 2,
            mqar_pairs: 16,
            top: 16,
        }
    }
}

impl RetrievalHeadsConfig {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.passkey_probes + self.mqar_probes >= 1,
            "retrieval_heads needs passkey_probes or mqar_probes >= 1"
        );
        ensure!(
            self.mqar_probes == 0 || (1..=64).contains(&self.mqar_pairs),
            "retrieval_heads.mqar_pairs must be 1 to 64, got {}",
            self.mqar_pairs
        );
        ensure!(self.top >= 1, "retrieval_heads.top must be at least 1");
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadScore {
    pub layer: usize,
    pub head: usize,
    pub score: f64,
    pub passkey: f64,
    pub mqar: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetrievalHeadsReport {
    /// Answer positions scored (each counted once per head).
    pub passkey_queries: usize,
    pub mqar_queries: usize,
    /// Passkey probes whose key could not be found in the prompt's tokens (left out).
    pub passkey_skipped: usize,
    /// [layer][query head]: the mean of `passkey` and `mqar` (the one measured, when only one is).
    pub scores: Vec<Vec<f64>>,
    pub passkey: Vec<Vec<f64>>,
    pub mqar: Vec<Vec<f64>>,
    /// The `top` heads by score, best first.
    pub top: Vec<HeadScore>,
}

/// One forward pass's answer positions and what each should copy.
struct Target {
    /// (R,) int64: positions whose next token is an answer token.
    rows: Tensor,
    /// (R, L) f32: 1 at the tokens being copied.
    sources: Tensor,
    task: Task,
}

#[derive(Clone, Copy, PartialEq)]
enum Task {
    Passkey,
    Mqar,
}

/// What the recording mixers share: the model's own mixers (given back afterwards), the target of
/// the pass under way, and per task the summed mass [layer][head] and the number of rows.
struct Recorder {
    originals: Vec<Option<Box<dyn Mixer>>>,
    target: Option<Target>,
    sums: [Vec<Vec<f64>>; 2],
    rows: [usize; 2],
}

type Shared = Arc<Mutex<Recorder>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Recorder> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Installed in every layer while measuring: runs the layer's own mixer and adds each head's
/// attention mass on the sources at the target rows.
struct RecordingMixer {
    layer: usize,
    sliding_window: Option<i64>,
    shared: Shared,
}

impl Mixer for RecordingMixer {
    fn forward(&self, input: &MixerInput, state: Option<&mut MixerState>) -> Result<Tensor> {
        ensure!(
            state.is_none() && input.offset == 0,
            "layer {} is being measured and runs whole sequences only",
            self.layer
        );
        let mut recorder = lock(&self.shared);
        let y = recorder.originals[self.layer]
            .as_ref()
            .ok_or_else(|| anyhow!("layer {}: the model's mixer is gone", self.layer))?
            .forward(input, None)?;
        let Some(target) = &recorder.target else {
            return Ok(y);
        };
        let mass = self.mass(input, target); // (h,)
        let task = target.task as usize;
        let mass = Vec::<f64>::try_from(&mass).context("copying attention mass")?;
        for (sum, m) in recorder.sums[task][self.layer].iter_mut().zip(mass) {
            *sum += m;
        }
        Ok(y)
    }

    fn new_state(&self, _batch: i64) -> Result<MixerState> {
        Err(anyhow!(
            "layer {} is being measured and cannot decode",
            self.layer
        ))
    }

    fn name(&self) -> String {
        format!("retrieval probe (layer {})", self.layer)
    }
}

impl RecordingMixer {
    /// Each query head's attention mass on the sources, summed over the target rows (h,), f64.
    fn mass(&self, input: &MixerInput, target: &Target) -> Tensor {
        let (q, k) = (input.q, input.k); // (1, h, L, d), (1, h_k, L, d)
        let (heads, len, dim) = (q.size()[1], q.size()[2], q.size()[3]);
        let device = q.device();
        let rows = target.rows.to_device(device);
        let q = q.index_select(2, &rows).to_kind(Kind::Float); // (1, h, R, d)
        let k = k
            .to_kind(Kind::Float)
            .repeat_interleave_self_int(heads / k.size()[1], 1, None); // (1, h, L, d)
        let scores = q.matmul(&k.transpose(-1, -2)) / (dim as f64).sqrt(); // (1, h, R, L)
        let q_pos = rows.unsqueeze(1); // (R, 1)
        let k_pos = Tensor::arange(len, (Kind::Int64, device)).unsqueeze(0); // (1, L)
        let mut allowed = k_pos.le_tensor(&q_pos);
        if let Some(w) = self.sliding_window {
            allowed = allowed.logical_and(&(&q_pos - &k_pos).lt(w));
        }
        let weights = scores
            .masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
            .softmax(-1, Kind::Float);
        (weights * target.sources.to_device(device))
            .sum_dim_intlist([0i64, 2, 3].as_slice(), false, Kind::Double)
            .to_device(tch::Device::Cpu)
    }
}

/// The model with recording mixers in every layer; dropping it puts the model's own back.
struct Recording<'a> {
    model: &'a mut Model,
    shared: Shared,
}

impl<'a> Recording<'a> {
    fn install(model: &'a mut Model) -> Result<Self> {
        let layers = model.num_layers();
        let heads = model.config().num_attention_heads as usize;
        let shared = Arc::new(Mutex::new(Recorder {
            originals: (0..layers).map(|_| None).collect(),
            target: None,
            sums: [
                vec![vec![0.0; heads]; layers],
                vec![vec![0.0; heads]; layers],
            ],
            rows: [0, 0],
        }));
        let recording = Self { model, shared };
        for layer in 0..layers {
            let mixer = RecordingMixer {
                layer,
                sliding_window: recording.model.config().layer_window(layer),
                shared: recording.shared.clone(),
            };
            let original = recording.model.set_mixer(layer, Box::new(mixer))?;
            lock(&recording.shared).originals[layer] = Some(original);
        }
        Ok(recording)
    }

    /// One forward pass over `ids`, recording `task`'s mass at `rows` on `sources[r]`.
    fn run(&mut self, ids: &[u32], rows: &[i64], sources: &[Vec<usize>], task: Task) -> Result<()> {
        let len = ids.len();
        let mut mask = vec![0f32; rows.len() * len];
        for (r, positions) in sources.iter().enumerate() {
            for &p in positions {
                mask[r * len + p] = 1.0;
            }
        }
        lock(&self.shared).target = Some(Target {
            rows: Tensor::from_slice(rows),
            sources: Tensor::from_slice(&mask).view([rows.len() as i64, len as i64]),
            task,
        });
        let input: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let input = Tensor::from_slice(&input)
            .view([1, -1])
            .to_device(self.model.device());
        let result = self.model.hidden_states(&input, None).map(|_| ());
        let mut recorder = lock(&self.shared);
        recorder.target = None;
        recorder.rows[task as usize] += rows.len();
        result
    }

    fn put_back(&mut self) -> Result<()> {
        for layer in 0..self.model.num_layers() {
            let original = lock(&self.shared).originals[layer].take();
            if let Some(original) = original {
                self.model.set_mixer(layer, original)?;
            }
        }
        Ok(())
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        if let Err(err) = self.put_back() {
            tracing::error!("restoring the teacher's attention after scoring heads: {err:#}");
        }
    }
}

/// Every start of `needle` in `haystack`.
fn occurrences(haystack: &[u32], needle: &[u32]) -> Vec<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return Vec::new();
    }
    (0..=haystack.len() - needle.len())
        .filter(|&i| haystack[i..i + needle.len()] == *needle)
        .collect()
}

/// Scores every head of `model` (the teacher) on the probes of `cfg`, deterministic from `seed`.
/// The model's mixers are swapped for recording ones while it runs and put back afterwards.
pub fn retrieval_heads(
    model: &mut Model,
    tokenizer: &Tokenizer,
    cfg: &RetrievalHeadsConfig,
    seed: u64,
) -> Result<RetrievalHeadsReport> {
    cfg.validate()?;
    let context = model.config().max_position_embeddings as usize;
    let passkey_cfg = PasskeyConfig {
        enabled: true,
        min_length: cfg.passkey_length.min(context),
        max_length: Some(cfg.passkey_length.min(context)),
        depths: (0..cfg.passkey_probes)
            .map(|i| (i as f64 + 0.5) / cfg.passkey_probes as f64)
            .collect(),
        trials: 1,
    };
    let passkeys = if cfg.passkey_probes > 0 {
        passkey_prompts(tokenizer, &passkey_cfg, seed, Some(context))?
    } else {
        Vec::new()
    };
    let samples = if cfg.mqar_probes > 0 {
        let mqar_cfg = MqarConfig {
            enabled: true,
            num_pairs: cfg.mqar_pairs,
            trials: cfg.mqar_probes,
        };
        mqar_samples(tokenizer, &mqar_cfg, seed)?
    } else {
        Vec::new()
    };

    let _no_grad = tch::no_grad_guard();
    let mut recording = Recording::install(model)?;
    let mut passkey_skipped = 0;
    for prompt in &passkeys {
        let answer = tokenizer.encode(&format!(" {}", prompt.passkey), false)?;
        let starts = occurrences(&prompt.ids, &answer);
        if starts.is_empty() {
            passkey_skipped += 1;
            continue;
        }
        let key: Vec<usize> = starts.iter().flat_map(|&s| s..s + answer.len()).collect();
        let ids = [prompt.ids.as_slice(), &answer].concat();
        // Position p predicts token p + 1: the last prompt token the first answer token, and so on.
        let first = prompt.ids.len() as i64 - 1;
        let rows: Vec<i64> = (0..answer.len() as i64).map(|j| first + j).collect();
        let sources = vec![key; rows.len()];
        recording
            .run(&ids, &rows, &sources, Task::Passkey)
            .context("passkey probe")?;
    }
    for sample in &samples {
        ensure!(
            sample.ids.len() <= context,
            "an MQAR probe of {} tokens exceeds the context of {context}; lower mqar_pairs",
            sample.ids.len()
        );
        let (mut rows, mut sources) = (Vec::new(), Vec::new());
        for query in &sample.queries {
            let first = query.value_start - query.distance;
            let value: Vec<usize> = (first..first + query.value.len()).collect();
            for j in 0..query.value.len() {
                rows.push((query.value_start + j - 1) as i64);
                sources.push(value.clone());
            }
        }
        recording
            .run(&sample.ids, &rows, &sources, Task::Mqar)
            .context("MQAR probe")?;
    }
    let (sums, counts) = {
        let recorder = lock(&recording.shared);
        (recorder.sums.clone(), recorder.rows)
    };
    recording.put_back()?;
    drop(recording);

    let mean = |task: usize| -> Vec<Vec<f64>> {
        sums[task]
            .iter()
            .map(|heads| {
                heads
                    .iter()
                    .map(|s| s / counts[task].max(1) as f64)
                    .collect()
            })
            .collect()
    };
    let (passkey, mqar) = (mean(Task::Passkey as usize), mean(Task::Mqar as usize));
    let combine = |p: f64, m: f64| match (counts[0] > 0, counts[1] > 0) {
        (true, true) => (p + m) / 2.0,
        (true, false) => p,
        _ => m,
    };
    let scores: Vec<Vec<f64>> = passkey
        .iter()
        .zip(&mqar)
        .map(|(p, m)| p.iter().zip(m).map(|(&p, &m)| combine(p, m)).collect())
        .collect();
    let mut all: Vec<HeadScore> = scores
        .iter()
        .enumerate()
        .flat_map(|(layer, heads)| {
            let (passkey, mqar) = (&passkey, &mqar);
            heads
                .iter()
                .enumerate()
                .map(move |(head, &score)| HeadScore {
                    layer,
                    head,
                    score,
                    passkey: passkey[layer][head],
                    mqar: mqar[layer][head],
                })
        })
        .collect();
    all.sort_by(|a, b| b.score.total_cmp(&a.score));
    all.truncate(cfg.top);
    Ok(RetrievalHeadsReport {
        passkey_queries: counts[0],
        mqar_queries: counts[1],
        passkey_skipped,
        scores,
        passkey,
        mqar,
        top: all,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mass of one row (position 3 of 4) on keys 0 and 1, per head.
    fn mass(q: &Tensor, k: &Tensor, window: Option<i64>) -> Vec<f64> {
        let v = k.zeros_like();
        let input = MixerInput {
            q,
            k,
            v: &v,
            q_raw: q,
            k_raw: k,
            offset: 0,
            position: None,
        };
        let target = Target {
            rows: Tensor::from_slice(&[3i64]),
            sources: Tensor::from_slice(&[1f32, 1.0, 0.0, 0.0]).view([1, 4]),
            task: Task::Passkey,
        };
        let mixer = RecordingMixer {
            layer: 0,
            sliding_window: window,
            shared: Arc::new(Mutex::new(Recorder {
                originals: Vec::new(),
                target: None,
                sums: [Vec::new(), Vec::new()],
                rows: [0, 0],
            })),
        };
        Vec::<f64>::try_from(&mixer.mass(&input, &target)).unwrap()
    }

    #[test]
    fn mass_is_the_softmax_share_of_the_sources() {
        let opts = (Kind::Float, tch::Device::Cpu);
        // Equal scores: each of the 4 causal keys gets 1/4; two are sources.
        let (q, k) = (
            Tensor::zeros([1, 2, 4, 8], opts),
            Tensor::zeros([1, 1, 4, 8], opts),
        );
        assert_eq!(mass(&q, &k, None), [0.5, 0.5]);
        // A window of 2 keeps keys 2 and 3 only.
        assert_eq!(mass(&q, &k, Some(2)), [0.0, 0.0]);
        // Head 0's query matches key 1 strongly (score 100 / sqrt(8)); head 1's nothing.
        let k = Tensor::zeros([1, 1, 4, 8], opts);
        let _ = k.get(0).get(0).get(1).get(0).fill_(10.0);
        let q = Tensor::zeros([1, 2, 4, 8], opts);
        let _ = q.get(0).get(0).get(3).get(0).fill_(10.0);
        let got = mass(&q, &k, None);
        assert!(got[0] > 0.999_999 && got[1] == 0.5, "{got:?}");
    }

    #[test]
    fn occurrences_finds_every_start() {
        assert_eq!(occurrences(&[1, 2, 3, 1, 2], &[1, 2]), [0, 3]);
        assert!(occurrences(&[1, 2], &[3]).is_empty());
        assert!(occurrences(&[1], &[1, 2]).is_empty());
    }
}
