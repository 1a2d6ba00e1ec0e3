//! Training curves from a run's `metrics.jsonl` (docs/eval.md, "Training curves"): one JSON
//! object per line with `stage`, `step`, `tokens`, `split` (`train` or `val`) and named values.
//! The curves are the top-level named values (losses such as `attn_mse`, `lm_loss`), per stage
//! and split; bookkeeping fields (`lr`, `grad_norm`, throughput, times) and per-layer values
//! (`name/layer_NN`) are left out. A truncated last line (a job killed mid-write) is skipped; a
//! malformed line elsewhere is an error. `null` values (non-finite when written) are skipped.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Fields of a record that are not curves.
const NOT_CURVES: [&str; 9] = [
    "stage",
    "step",
    "tokens",
    "split",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
    "time",
];

/// The curves of one stage: `(step, value)` per named value and split.
#[derive(Clone, Debug, PartialEq)]
pub struct StageCurves {
    pub stage: String,
    /// Largest step logged.
    pub steps: u64,
    /// Largest token count logged.
    pub tokens: u64,
    /// Keyed by `(name, split)`, e.g. `("attn_mse", "val")`.
    pub curves: BTreeMap<(String, String), Vec<(u64, f64)>>,
}

/// What the report keeps of a stage: its length and the last value of every curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    pub stage: String,
    pub steps: u64,
    pub tokens: u64,
    /// `"<name>/<split>"` -> last logged value.
    pub last: BTreeMap<String, f64>,
}

impl StageCurves {
    pub fn summary(&self) -> StageSummary {
        StageSummary {
            stage: self.stage.clone(),
            steps: self.steps,
            tokens: self.tokens,
            last: self
                .curves
                .iter()
                .filter_map(|((name, split), points)| {
                    Some((format!("{name}/{split}"), points.last()?.1))
                })
                .collect(),
        }
    }

    /// Curve names in order, each with its splits.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.curves.keys().map(|(n, _)| n.clone()).collect();
        names.dedup();
        names
    }
}

/// Stages in the order they first appear in `path`.
pub fn read_metrics(path: &Path) -> Result<Vec<StageCurves>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading training metrics {}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let complete = text.ends_with('\n');
    let mut stages: Vec<StageCurves> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if i + 1 == lines.len() && !complete => {
                tracing::warn!("{}: skipping a truncated last line", path.display());
                continue;
            }
            Err(err) => bail!("{}:{}: not a JSON line: {err}", path.display(), i + 1),
        };
        let at = || format!("{}:{}", path.display(), i + 1);
        let Some(fields) = record.as_object() else {
            bail!("{}: not a JSON object", at());
        };
        let stage = fields
            .get("stage")
            .and_then(Value::as_str)
            .with_context(|| format!("{}: no `stage`", at()))?;
        let step = fields
            .get("step")
            .and_then(Value::as_u64)
            .with_context(|| format!("{}: no `step`", at()))?;
        let split = fields
            .get("split")
            .and_then(Value::as_str)
            .with_context(|| format!("{}: no `split`", at()))?;
        let tokens = fields.get("tokens").and_then(Value::as_u64).unwrap_or(0);
        let index = match stages.iter().position(|s| s.stage == stage) {
            Some(index) => index,
            None => {
                stages.push(StageCurves {
                    stage: stage.to_string(),
                    steps: 0,
                    tokens: 0,
                    curves: BTreeMap::new(),
                });
                stages.len() - 1
            }
        };
        let curves = &mut stages[index];
        curves.steps = curves.steps.max(step);
        curves.tokens = curves.tokens.max(tokens);
        for (name, value) in fields {
            if NOT_CURVES.contains(&name.as_str()) || name.contains('/') {
                continue;
            }
            let Some(value) = value.as_f64().filter(|v| v.is_finite()) else {
                continue;
            };
            curves
                .curves
                .entry((name.clone(), split.to_string()))
                .or_default()
                .push((step, value));
        }
    }
    Ok(stages)
}
