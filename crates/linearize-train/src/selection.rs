//! Which layers and heads keep the teacher's softmax attention, chosen by measurement: the
//! recipe's `conversion.softmax_layers_by` and `conversion.softmax_heads` selectors, the ranking
//! by KL drop, and `<run>/selection.json`, where a run keeps what was chosen (with every score)
//! so that a resumed run reuses it instead of measuring again.
//!
//! ```yaml
//! conversion:
//!   softmax_layers_by: {count: 2, by: kl}             # or by: mse (= softmax_by_error: 2)
//!   softmax_heads: {fraction: 0.1, by: retrieval}     # or {count: 27, by: kl, batches: 4}
//! ```
//!
//! KL ranking starts from the converted model after attention transfer and measures, on the
//! first validation batches, how much KL(teacher || model) drops when one layer (or one head)
//! alone is given back its softmax attention: the cheap equivalent of measuring the rise when
//! one alone is linearised, one forward pass per candidate.
use crate::convert::ConvertedLayers;
use crate::data::PackedSequences;
use anyhow::{bail, ensure, Context, Result};
use linearize_models::llama::Model;
use linearize_models::mixer::{Mixer, SoftmaxMixer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// Validation batches a KL ranking reads when the recipe does not say.
pub const DEFAULT_KL_BATCHES: usize = 4;

/// How the layers given back to softmax after attention transfer are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerScoring {
    /// The layer's final validation attention MSE of stage 1, largest first.
    Mse,
    /// The drop of KL(teacher || model) when the layer alone is softmax again, largest first.
    Kl,
}

/// How the query heads that keep softmax are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadScoring {
    /// The teacher's retrieval score (attention mass on copied tokens in passkey and MQAR
    /// probes), measured before attention transfer.
    Retrieval,
    /// The drop of KL(teacher || model) when the head alone is softmax again, after attention
    /// transfer.
    Kl,
}

/// `conversion.softmax_layers_by`: `{count: K, by: mse | kl, batches: N}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSelector {
    pub count: usize,
    pub by: LayerScoring,
    /// `by: kl`: validation batches measured per candidate (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches: Option<usize>,
}

impl LayerSelector {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.count >= 1,
            "conversion.softmax_layers_by.count must be at least 1"
        );
        check_batches(
            "softmax_layers_by",
            self.batches,
            self.by == LayerScoring::Kl,
        )
    }

    /// Validation batches of the KL ranking.
    pub fn kl_batches(&self) -> usize {
        self.batches.unwrap_or(DEFAULT_KL_BATCHES)
    }
}

/// What `conversion.softmax_heads` counts and chooses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadUnit {
    /// Query heads, each on its own; a chosen head brings its key/value head into the KV cache
    /// (with GQA, K query heads may need up to K key/value heads).
    #[default]
    QueryHeads,
    /// Key/value heads, each with every query head that reads it (a GQA group): the KV cache
    /// holds exactly the chosen ones. A group scores as its best query head.
    KvHeads,
}

/// `conversion.softmax_heads`: `{count: K | fraction: F, by: retrieval | kl, unit: query_heads
/// | kv_heads, batches: N}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSelector {
    /// Heads (of `unit`) to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// Share of all the model's heads of `unit` (every layer's) to keep, rounded down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    pub by: HeadScoring,
    /// `query_heads` (default) or `kv_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<HeadUnit>,
    /// `by: kl`: validation batches measured per candidate (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches: Option<usize>,
}

impl HeadSelector {
    pub fn validate(&self) -> Result<()> {
        match (self.count, self.fraction) {
            (Some(_), Some(_)) | (None, None) => {
                bail!("conversion.softmax_heads: give exactly one of `count` and `fraction`")
            }
            (Some(count), None) => ensure!(
                count >= 1,
                "conversion.softmax_heads.count must be at least 1"
            ),
            (None, Some(f)) => ensure!(
                f.is_finite() && f > 0.0 && f <= 1.0,
                "conversion.softmax_heads.fraction must be in (0, 1], got {f}"
            ),
        }
        check_batches("softmax_heads", self.batches, self.by == HeadScoring::Kl)
    }

    pub fn unit(&self) -> HeadUnit {
        self.unit.unwrap_or_default()
    }

    /// Heads to keep in a model of `total` heads (of the selector's unit) of which `candidates`
    /// are in converted layers; the error names the key.
    pub fn count_of(&self, total: usize, candidates: usize) -> Result<usize> {
        let count = match (self.count, self.fraction) {
            (Some(count), _) => count,
            (None, Some(f)) => {
                let count = (f * total as f64 + 1e-9).floor() as usize;
                ensure!(
                    count >= 1,
                    "conversion.softmax_heads.fraction: {f} of the model's {total} heads keeps \
                     no head"
                );
                count
            }
            (None, None) => bail!("conversion.softmax_heads: no `count` or `fraction`"),
        };
        ensure!(
            count <= candidates,
            "conversion.softmax_heads: {count} heads asked for, the converted layers have only \
             {candidates}"
        );
        Ok(count)
    }

    /// Validation batches of the KL ranking.
    pub fn kl_batches(&self) -> usize {
        self.batches.unwrap_or(DEFAULT_KL_BATCHES)
    }
}

fn check_batches(key: &str, batches: Option<usize>, kl: bool) -> Result<()> {
    match batches {
        Some(_) if !kl => bail!("conversion.{key}.batches is only read with `by: kl`"),
        Some(0) => bail!("conversion.{key}.batches must be at least 1"),
        _ => Ok(()),
    }
}

/// One layer's score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerScore {
    pub layer: usize,
    pub score: f64,
}

/// One query head's score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeadScore {
    pub layer: usize,
    pub head: usize,
    pub score: f64,
}

/// The layers given back to softmax, with the scores they were chosen by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerChoice {
    pub by: LayerScoring,
    pub count: usize,
    /// Every candidate layer's score, ascending by layer.
    pub scores: Vec<LayerScore>,
    /// Ascending.
    pub chosen: Vec<usize>,
}

/// The query heads that keep softmax, with the scores they were chosen by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadChoice {
    pub by: HeadScoring,
    #[serde(default)]
    pub unit: HeadUnit,
    /// Heads of `unit` chosen.
    pub count: usize,
    /// Every candidate head's score, by layer then head.
    pub scores: Vec<HeadScore>,
    /// The chosen heads of each layer, ascending.
    pub chosen: BTreeMap<usize, Vec<usize>>,
}

/// `<run>/selection.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softmax_layers: Option<LayerChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softmax_heads: Option<HeadChoice>,
}

impl Selection {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("selection.json")
    }

    /// The run's selection so far (empty before anything was chosen).
    pub fn read(run_dir: &Path) -> Result<Self> {
        let path = Self::path(run_dir);
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a selection", path.display()))
    }

    /// Writes the file atomically (a reader sees the old selection or the new one).
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        linearize_models::atomic::write_file(&Self::path(run_dir), text.as_bytes())
    }
}

impl LayerChoice {
    /// Checks that a choice read back from a run directory was made by `selector` (the recipe
    /// of a resumed run may not change how it chooses).
    pub fn check(&self, selector: &LayerSelector) -> Result<()> {
        ensure!(
            self.by == selector.by && self.count == selector.count,
            "selection.json chose {} layers by {:?}, the recipe asks for {} by {:?}: start the \
             run over (--restart) to choose again",
            self.count,
            self.by,
            selector.count,
            selector.by
        );
        Ok(())
    }
}

impl HeadChoice {
    /// See [`LayerChoice::check`]; `count` is the selector's resolved head count.
    pub fn check(&self, by: HeadScoring, unit: HeadUnit, count: usize) -> Result<()> {
        ensure!(
            self.by == by && self.unit == unit && self.count == count,
            "selection.json chose {} {:?} by {:?}, the recipe asks for {count} {unit:?} by \
             {by:?}: start the run over (--restart) to choose again",
            self.count,
            self.unit,
            self.by
        );
        Ok(())
    }

    /// Key/value heads the chosen query heads read (what their KV cache holds), with `group`
    /// query heads per key/value head.
    pub fn kv_heads(&self, group: usize) -> usize {
        self.chosen
            .values()
            .map(|heads| {
                let mut kv: Vec<usize> = heads.iter().map(|h| h / group).collect();
                kv.dedup();
                kv.len()
            })
            .sum()
    }

    /// The chosen heads as `layer.head` pairs with their scores, best first (for the log).
    pub fn describe(&self) -> String {
        let mut chosen: Vec<&HeadScore> = self
            .scores
            .iter()
            .filter(|s| {
                self.chosen
                    .get(&s.layer)
                    .is_some_and(|h| h.contains(&s.head))
            })
            .collect();
        chosen.sort_by(|a, b| b.score.total_cmp(&a.score));
        chosen
            .iter()
            .map(|s| format!("{}.{} ({:.4})", s.layer, s.head, s.score))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The `k` best-scored layers (largest first; ties to the lower layer), ascending.
pub fn top_layers(scores: &[LayerScore], k: usize) -> Result<Vec<usize>> {
    ensure!(
        k <= scores.len(),
        "asked for {k} layers, only {} are candidates",
        scores.len()
    );
    if let Some(s) = scores.iter().find(|s| !s.score.is_finite()) {
        bail!("layer {} has a non-finite score {}", s.layer, s.score);
    }
    let mut ranked = scores.to_vec();
    ranked.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.layer.cmp(&b.layer)));
    let mut chosen: Vec<usize> = ranked[..k].iter().map(|s| s.layer).collect();
    chosen.sort_unstable();
    Ok(chosen)
}

/// The `k` best-scored heads (largest first; ties to the lower layer, then the lower head),
/// grouped by layer, ascending.
pub fn top_heads(scores: &[HeadScore], k: usize) -> Result<BTreeMap<usize, Vec<usize>>> {
    ensure!(
        k <= scores.len(),
        "asked for {k} heads, only {} are candidates",
        scores.len()
    );
    if let Some(s) = scores.iter().find(|s| !s.score.is_finite()) {
        bail!(
            "head {} of layer {} has a non-finite score {}",
            s.head,
            s.layer,
            s.score
        );
    }
    let mut ranked = scores.to_vec();
    ranked.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.layer.cmp(&b.layer))
            .then(a.head.cmp(&b.head))
    });
    let mut chosen: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for s in &ranked[..k] {
        chosen.entry(s.layer).or_default().push(s.head);
    }
    for heads in chosen.values_mut() {
        heads.sort_unstable();
    }
    Ok(chosen)
}

/// The `k` best key/value heads (a group of `group` query heads scores as its best query head;
/// ties to the lower layer, then the lower key/value head), each with every query head of its
/// group that `scores` lists, grouped by layer, ascending.
pub fn top_kv_groups(
    scores: &[HeadScore],
    k: usize,
    group: usize,
) -> Result<BTreeMap<usize, Vec<usize>>> {
    let mut groups: BTreeMap<(usize, usize), f64> = BTreeMap::new();
    for s in scores {
        ensure!(
            s.score.is_finite(),
            "head {} of layer {} has a non-finite score {}",
            s.head,
            s.layer,
            s.score
        );
        let best = groups
            .entry((s.layer, s.head / group))
            .or_insert(f64::NEG_INFINITY);
        *best = best.max(s.score);
    }
    let as_heads: Vec<HeadScore> = groups
        .iter()
        .map(|(&(layer, head), &score)| HeadScore { layer, head, score })
        .collect();
    let chosen = top_heads(&as_heads, k)?;
    Ok(chosen
        .into_iter()
        .map(|(layer, kv_heads)| {
            let mut heads: Vec<usize> = scores
                .iter()
                .filter(|s| s.layer == layer && kv_heads.contains(&(s.head / group)))
                .map(|s| s.head)
                .collect();
            heads.sort_unstable();
            (layer, heads)
        })
        .collect())
}

/// The teacher's next-token log-probabilities on the first validation batches: what a KL
/// ranking compares the model with.
pub struct KlProbe {
    inputs: Vec<Tensor>,  // (b, L) i64 each, on the model's device
    teacher: Vec<Tensor>, // (b, L, V) f32 log-probabilities
}

impl KlProbe {
    /// Runs the teacher (every converted layer given back its softmax for the pass) on the
    /// first `batches` batches of `batch_size` validation sequences of `seq_len` tokens.
    pub fn new(
        model: &mut Model,
        converted: &ConvertedLayers,
        val: &PackedSequences,
        batches: usize,
        batch_size: usize,
    ) -> Result<Self> {
        ensure!(batches >= 1, "a KL ranking needs at least one batch");
        let seq_len = val.seq_len() as i64;
        let device = model.device();
        let inputs: Vec<Tensor> = val
            .eval_batches(batch_size, 0, 1)?
            .take(batches)
            .map(|b| b.narrow(1, 0, seq_len).to_device(device))
            .collect();
        ensure!(
            !inputs.is_empty(),
            "no validation sequence to measure KL on"
        );
        let _no_grad = tch::no_grad_guard();
        let layers = converted.indices();
        let mut saved = Vec::new();
        for &i in &layers {
            let teacher = Box::new(SoftmaxMixer::new(converted.teacher_window(i)));
            saved.push((i, model.set_mixer(i, teacher)?));
        }
        let teacher: Result<Vec<Tensor>> = inputs
            .iter()
            .map(|ids| Ok(model.forward(ids, None)?.log_softmax(-1, Kind::Float)))
            .collect();
        for (i, mixer) in saved {
            model.set_mixer(i, mixer)?;
        }
        Ok(Self {
            inputs,
            teacher: teacher?,
        })
    }

    /// Mean KL(teacher || model) per token, nats.
    pub fn kl(&self, model: &Model) -> Result<f64> {
        let _no_grad = tch::no_grad_guard();
        let (mut sum, mut tokens) = (0.0, 0i64);
        for (ids, logp_t) in self.inputs.iter().zip(&self.teacher) {
            let logp_m = model.forward(ids, None)?.log_softmax(-1, Kind::Float);
            let kl = (logp_t.exp() * (logp_t - logp_m)).sum(Kind::Double);
            sum += kl.double_value(&[]);
            tokens += ids.numel() as i64;
        }
        Ok(sum / tokens as f64)
    }

    /// KL with `mixer` in layer `i` for the measurement, the layer's own mixer put back after.
    fn kl_with(&self, model: &mut Model, i: usize, mixer: Box<dyn Mixer>) -> Result<f64> {
        let own = model.set_mixer(i, mixer)?;
        let kl = self.kl(model);
        model.set_mixer(i, own)?;
        kl
    }
}

/// For every converted layer, the drop of KL(teacher || model) when it alone is softmax again
/// (positive: restoring it helps), ascending by layer; and the model's KL as it is.
pub fn layer_kl_drops(
    model: &mut Model,
    converted: &ConvertedLayers,
    probe: &KlProbe,
) -> Result<(f64, Vec<LayerScore>)> {
    let base = probe.kl(model)?;
    let mut scores = Vec::new();
    for i in converted.indices() {
        linearize_models::stop::check()?;
        let teacher = Box::new(SoftmaxMixer::new(converted.teacher_window(i)));
        let kl = probe.kl_with(model, i, teacher)?;
        tracing::debug!(layer = i, kl, "KL with the layer softmax");
        scores.push(LayerScore {
            layer: i,
            score: base - kl,
        });
    }
    Ok((base, scores))
}

/// For every query head of a converted layer that is not softmax already, the drop of
/// KL(teacher || model) when it alone is softmax too, by layer then head; and the model's KL.
pub fn head_kl_drops(
    model: &mut Model,
    converted: &ConvertedLayers,
    probe: &KlProbe,
) -> Result<(f64, Vec<HeadScore>)> {
    let base = probe.kl(model)?;
    let mut scores = Vec::new();
    for (i, mixer) in converted.mixers() {
        for head in mixer.linear_heads() {
            linearize_models::stop::check()?;
            let mut heads = mixer.softmax_heads().to_vec();
            heads.push(head);
            heads.sort_unstable();
            let hybrid = mixer.with_softmax_heads(Some(heads))?;
            let kl = probe.kl_with(model, i, Box::new(hybrid))?;
            scores.push(HeadScore {
                layer: i,
                head,
                score: base - kl,
            });
        }
    }
    Ok((base, scores))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_name_the_key_of_a_bad_value() {
        let heads = |yaml: &str| {
            serde_yaml_ng::from_str::<HeadSelector>(yaml)
                .map_err(anyhow::Error::from)
                .and_then(|s| s.validate().map(|_| s))
        };
        let e = heads("{count: 2, fraction: 0.1, by: kl}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("exactly one of `count` and `fraction`"), "{e}");
        let e = heads("{by: kl}").unwrap_err().to_string();
        assert!(e.contains("exactly one"), "{e}");
        let e = heads("{fraction: 1.5, by: kl}").unwrap_err().to_string();
        assert!(
            e.contains("softmax_heads.fraction must be in (0, 1]"),
            "{e}"
        );
        let e = heads("{count: 0, by: retrieval}").unwrap_err().to_string();
        assert!(e.contains("softmax_heads.count must be at least 1"), "{e}");
        let e = heads("{count: 2, by: retrieval, batches: 3}")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("softmax_heads.batches is only read with `by: kl`"),
            "{e}"
        );
        let e = heads("{count: 2, by: attention}").unwrap_err().to_string();
        assert!(e.contains("retrieval") && e.contains("kl"), "{e}");
        let e = heads("{count: 2, by: kl, heads: 3}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `heads`"), "{e}");
        let ok = heads("{fraction: 0.1, by: retrieval}").unwrap();
        assert_eq!(ok.count_of(270, 270).unwrap(), 27);
        assert_eq!(ok.count_of(30, 30).unwrap(), 3);
        let e = ok.count_of(9, 9).unwrap_err().to_string();
        assert!(e.contains("keeps no head"), "{e}");
        let e = heads("{count: 10, by: kl}")
            .unwrap()
            .count_of(12, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only 8"), "{e}");

        let layers = |yaml: &str| {
            serde_yaml_ng::from_str::<LayerSelector>(yaml)
                .map_err(anyhow::Error::from)
                .and_then(|s| s.validate().map(|_| s))
        };
        let e = layers("{count: 0, by: kl}").unwrap_err().to_string();
        assert!(e.contains("softmax_layers_by.count"), "{e}");
        let e = layers("{count: 1, by: mse, batches: 2}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("softmax_layers_by.batches is only read"), "{e}");
        let e = layers("{count: 1, by: kl, batches: 0}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 1"), "{e}");
        assert_eq!(layers("{count: 1, by: kl}").unwrap().kl_batches(), 4);
    }

    #[test]
    fn top_choices_break_ties_by_position() {
        let head = |layer, head, score| HeadScore { layer, head, score };
        let scores = [
            head(0, 1, 0.5),
            head(2, 0, 0.9),
            head(1, 3, 0.9),
            head(1, 2, 0.9),
            head(0, 0, 0.1),
        ];
        let chosen = top_heads(&scores, 2).unwrap();
        assert_eq!(chosen, BTreeMap::from([(1, vec![2, 3])]));
        // Groups of 2 query heads: (1, kv 1) and (2, kv 0) score 0.9, (0, kv 0) 0.5.
        let groups = top_kv_groups(&scores, 2, 2).unwrap();
        assert_eq!(groups, BTreeMap::from([(1, vec![2, 3]), (2, vec![0])]));
        let groups = top_kv_groups(&scores, 3, 2).unwrap();
        assert_eq!(groups[&0], vec![0, 1]);
        let chosen = top_heads(&scores, 4).unwrap();
        assert_eq!(
            chosen,
            BTreeMap::from([(0, vec![1]), (1, vec![2, 3]), (2, vec![0])])
        );
        assert!(top_heads(&scores, 6).is_err());
        let e = top_heads(&[head(3, 1, f64::NAN)], 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("head 1 of layer 3"), "{e}");

        let layer = |layer, score| LayerScore { layer, score };
        let scores = [layer(4, 0.2), layer(1, 0.7), layer(3, 0.7), layer(0, 0.1)];
        assert_eq!(top_layers(&scores, 2).unwrap(), [1, 3]);
        assert_eq!(top_layers(&scores, 3).unwrap(), [1, 3, 4]);
    }

    #[test]
    fn a_selection_round_trips_and_refuses_another_selector() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Selection::read(dir.path()).unwrap(), Selection::default());
        let selection = Selection {
            softmax_layers: Some(LayerChoice {
                by: LayerScoring::Kl,
                count: 1,
                scores: vec![LayerScore {
                    layer: 2,
                    score: 0.25,
                }],
                chosen: vec![2],
            }),
            softmax_heads: Some(HeadChoice {
                by: HeadScoring::Retrieval,
                unit: HeadUnit::QueryHeads,
                count: 1,
                scores: vec![HeadScore {
                    layer: 0,
                    head: 3,
                    score: 0.5,
                }],
                chosen: BTreeMap::from([(0, vec![3])]),
            }),
        };
        selection.write(dir.path()).unwrap();
        let back = Selection::read(dir.path()).unwrap();
        assert_eq!(back, selection);
        let heads = back.softmax_heads.unwrap();
        heads
            .check(HeadScoring::Retrieval, HeadUnit::QueryHeads, 1)
            .unwrap();
        assert_eq!(heads.describe(), "0.3 (0.5000)");
        assert_eq!(heads.kv_heads(3), 1);
        let e = heads
            .check(HeadScoring::Kl, HeadUnit::QueryHeads, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--restart"), "{e}");
        assert!(heads
            .check(HeadScoring::Retrieval, HeadUnit::KvHeads, 1)
            .is_err());
        let e = back
            .softmax_layers
            .unwrap()
            .check(&LayerSelector {
                count: 2,
                by: LayerScoring::Kl,
                batches: None,
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("chose 1 layers by Kl"), "{e}");
    }
}
