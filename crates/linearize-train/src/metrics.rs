//! `metrics.jsonl`: one JSON object per logged training step or validation pass, appended and
//! fsynced line by line, so a job killed at any instant leaves complete lines (at worst a
//! truncated last line, which the reader skips).
//!
//! A line looks like
//! `{"stage":"attention_transfer","step":400,"tokens":1638400,"split":"train","lr":0.01,
//! "grad_norm":0.8,"tokens_per_s":5120.5,"elapsed_s":312.4,"time":1767225600.5,
//! "attn_mse":0.0123,"attn_mse/layer_03":0.0101}`.
//! Named values (losses and anything else numeric) are top-level keys, one per series, which is
//! what plotting and `pandas.read_json(lines=True)` want; per-layer values are
//! `<name>/layer_<NN>` (see [`layer_key`]). Non-finite values are written as `null` and read back
//! as NaN.
use crate::tracking::MetricSink;
use anyhow::{ensure, Context, Result};
use linearize_models::atomic;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Which data a record measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    /// The stage's name in the recipe.
    pub stage: String,
    /// Optimizer updates completed in this stage when the record was taken.
    pub step: u64,
    /// Training tokens consumed in this stage so far.
    pub tokens: u64,
    pub split: Split,
    /// Learning rate of the last update (train records).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nan_if_null"
    )]
    pub lr: Option<f64>,
    /// Global gradient norm before clipping (train records).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nan_if_null"
    )]
    pub grad_norm: Option<f64>,
    /// Training throughput around this step.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nan_if_null"
    )]
    pub tokens_per_s: Option<f64>,
    /// Wall-clock seconds of training in this run, summed across resumes (set by the writer).
    #[serde(default)]
    pub elapsed_s: f64,
    /// Unix time of the write, in seconds (set by the writer).
    #[serde(default)]
    pub time: f64,
    /// Named values: `attn_mse`, `lm_loss`, `attn_mse/layer_03`, ...
    #[serde(flatten, deserialize_with = "map_nan_if_null")]
    pub values: BTreeMap<String, f64>,
}

/// Keys of [`MetricRecord`]'s own fields, which named values may not use.
const RESERVED: [&str; 9] = [
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

impl MetricRecord {
    pub fn new(stage: &str, step: u64, tokens: u64, split: Split) -> Self {
        Self {
            stage: stage.to_owned(),
            step,
            tokens,
            split,
            lr: None,
            grad_norm: None,
            tokens_per_s: None,
            elapsed_s: 0.0,
            time: 0.0,
            values: BTreeMap::new(),
        }
    }

    /// Adds the named value `name`.
    pub fn with(mut self, name: &str, value: f64) -> Self {
        self.values.insert(name.to_owned(), value);
        self
    }

    /// Adds one value per layer under [`layer_key`] names.
    pub fn with_layers(
        mut self,
        name: &str,
        per_layer: impl IntoIterator<Item = (usize, f64)>,
    ) -> Self {
        for (layer, value) in per_layer {
            self.values.insert(layer_key(name, layer), value);
        }
        self
    }
}

/// The key of a per-layer value: `attn_mse/layer_03` (two digits at least, so keys sort by
/// layer).
pub fn layer_key(name: &str, layer: usize) -> String {
    format!("{name}/layer_{layer:02}")
}

fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(Some(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN)))
}

fn map_nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let map = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(map
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
        .collect())
}

/// Appends records to `metrics.jsonl`, each line fsynced before [`MetricsWriter::write`] returns.
pub struct MetricsWriter {
    path: PathBuf,
    /// `None`: a writer that drops records (data-parallel ranks other than 0).
    file: Option<File>,
    elapsed_before: f64,
    started: Instant,
    last_sync: Instant,
    /// TensorBoard, MLflow: each record goes to them too (see crate::tracking).
    sinks: Vec<Box<dyn MetricSink>>,
}

/// How often [`MetricsWriter::write`] forces its lines to disk.
const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl MetricsWriter {
    /// Starts a fresh file, replacing any existing one (a run that starts from no saved state).
    pub fn create(path: &Path) -> Result<Self> {
        atomic::write_file(path, b"")?;
        Self::append_to(path, 0.0)
    }

    /// Continues the file of a run resumed after `step` updates of stage `stage`: records written
    /// after that point (later steps of that stage, later stages, a truncated last line) are
    /// dropped so the curves have no duplicates, and `elapsed_s` continues from the last record
    /// kept. A missing file is started fresh.
    pub fn resume(path: &Path, stage: &str, step: u64) -> Result<Self> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut kept_len = 0;
        let mut elapsed_before = 0.0;
        let mut in_stage = false;
        for line in parse_lines(path, &text)? {
            let record = &line.record;
            let after_resume_point = if record.stage == stage {
                in_stage = true;
                record.step > step
            } else {
                in_stage
            };
            if after_resume_point || !line.complete {
                break;
            }
            kept_len = line.end;
            elapsed_before = record.elapsed_s;
        }
        if kept_len < text.len() {
            tracing::info!(
                path = %path.display(),
                dropped_bytes = text.len() - kept_len,
                "dropping metrics written after the resumed state"
            );
            atomic::write_file(path, &text.as_bytes()[..kept_len])?;
        }
        Self::append_to(path, elapsed_before)
    }

    fn append_to(path: &Path, elapsed_before: f64) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {} for appending", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            file: Some(file),
            elapsed_before,
            last_sync: Instant::now(),
            started: Instant::now(),
            sinks: Vec::new(),
        })
    }

    /// A writer that drops every record: what data-parallel ranks other than rank 0 get, so
    /// that one process writes the file.
    pub fn disabled() -> Self {
        Self {
            path: PathBuf::new(),
            file: None,
            elapsed_before: 0.0,
            started: Instant::now(),
            last_sync: Instant::now(),
            sinks: Vec::new(),
        }
    }

    /// Sends every record written from now on to `sinks` as well.
    pub fn set_sinks(&mut self, sinks: Vec<Box<dyn MetricSink>>) {
        self.sinks = sinks;
    }

    /// The sinks, taken out (to move them to the writer that replaces this one).
    pub fn take_sinks(&mut self) -> Vec<Box<dyn MetricSink>> {
        std::mem::take(&mut self.sinks)
    }

    /// Tells the sinks that the job ended without error (an MLflow run is marked finished).
    pub fn finish(&mut self) {
        for sink in &mut self.sinks {
            if let Err(e) = sink.finish() {
                tracing::warn!("{}: {e:#}", sink.name());
            }
        }
    }

    /// Seconds of training in this run so far, across resumes.
    pub fn elapsed_s(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// Stamps `elapsed_s` and `time` on `record` and appends it as one line. The file is fsynced
    /// at most every few seconds: a process killed at any point keeps what it wrote (the page
    /// cache survives it), and a fsync per line would cost a disk round trip per logged step.
    pub fn write(&mut self, mut record: MetricRecord) -> Result<()> {
        for key in record.values.keys() {
            ensure!(
                !RESERVED.contains(&key.as_str()),
                "metric name '{key}' is reserved"
            );
        }
        record.elapsed_s = self.elapsed_s();
        record.time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut line = serde_json::to_string(&record)?;
        line.push('\n');
        file.write_all(line.as_bytes())
            .with_context(|| format!("appending to {}", self.path.display()))?;
        if self.last_sync.elapsed() >= SYNC_INTERVAL {
            file.sync_data()
                .with_context(|| format!("syncing {}", self.path.display()))?;
            self.last_sync = Instant::now();
        }
        for sink in &mut self.sinks {
            if let Err(e) = sink.record(&record) {
                tracing::warn!("{}: {e:#}", sink.name());
            }
        }
        Ok(())
    }
}

/// Reads every record of a `metrics.jsonl`. A truncated last line (a job killed mid-write) is
/// skipped with a warning; any other bad line is an error naming its line number.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRecord>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_lines(path, &text)?
        .into_iter()
        .map(|line| line.record)
        .collect())
}

struct Line {
    record: MetricRecord,
    /// Byte offset just past this line's newline (or end of text).
    end: usize,
    /// Whether the line ends with a newline (the writer always writes one).
    complete: bool,
}

fn parse_lines(path: &Path, text: &str) -> Result<Vec<Line>> {
    let mut lines = Vec::new();
    let mut start = 0;
    for (index, raw) in text.split_inclusive('\n').enumerate() {
        let end = start + raw.len();
        let complete = raw.ends_with('\n');
        let body = raw.trim();
        start = end;
        if body.is_empty() {
            continue;
        }
        match serde_json::from_str::<MetricRecord>(body) {
            Ok(record) => lines.push(Line {
                record,
                end,
                complete,
            }),
            Err(_) if !complete => {
                tracing::warn!(path = %path.display(), line = index + 1, "skipping truncated last line");
            }
            Err(e) => {
                return Err(e).with_context(|| format!("{} line {}", path.display(), index + 1));
            }
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train(stage: &str, step: u64) -> MetricRecord {
        MetricRecord::new(stage, step, step * 100, Split::Train)
            .with("lm_loss", 1.0 / (step + 1) as f64)
    }

    fn steps(path: &Path) -> Vec<(String, u64, Split)> {
        read_metrics(path)
            .unwrap()
            .into_iter()
            .map(|r| (r.stage, r.step, r.split))
            .collect()
    }

    #[test]
    fn round_trip_with_per_layer_values_and_non_finite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut writer = MetricsWriter::create(&path).unwrap();
        let mut record = MetricRecord::new("s1", 3, 300, Split::Train)
            .with("attn_mse", 0.25)
            .with_layers("attn_mse", [(3, 0.5), (12, f64::INFINITY)]);
        record.lr = Some(1e-3);
        record.grad_norm = Some(f64::NAN);
        writer.write(record.clone()).unwrap();
        writer
            .write(MetricRecord::new("s1", 3, 300, Split::Val).with("attn_mse", 0.3))
            .unwrap();

        let text = fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["attn_mse/layer_03"], 0.5);
        assert!(first["attn_mse/layer_12"].is_null());
        assert!(first.get("tokens_per_s").is_none());

        let back = read_metrics(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].values["attn_mse"], 0.25);
        assert!(back[0].values["attn_mse/layer_12"].is_nan());
        assert!(back[0].grad_norm.unwrap().is_nan());
        assert_eq!(back[0].lr, Some(1e-3));
        assert_eq!(back[1].lr, None);
        assert!(back[0].time > 1.6e9 && back[1].elapsed_s >= back[0].elapsed_s);
    }

    #[test]
    fn reserved_names_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = MetricsWriter::create(&dir.path().join("m.jsonl")).unwrap();
        let err = writer.write(train("s", 1).with("step", 2.0)).unwrap_err();
        assert!(err.to_string().contains("'step' is reserved"), "{err}");
    }

    #[test]
    fn reader_skips_truncated_last_line_but_not_a_bad_middle_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut writer = MetricsWriter::create(&path).unwrap();
        writer.write(train("s", 1)).unwrap();
        writer.write(train("s", 2)).unwrap();
        let full = fs::read_to_string(&path).unwrap();
        fs::write(&path, &full[..full.len() - 7]).unwrap();
        assert_eq!(steps(&path), [("s".to_owned(), 1, Split::Train)]);

        let mut lines: Vec<&str> = full.lines().collect();
        lines.insert(1, "{\"stage\": oops}");
        fs::write(&path, lines.join("\n") + "\n").unwrap();
        let err = format!("{:#}", read_metrics(&path).unwrap_err());
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn resume_drops_records_after_the_resumed_step_and_later_stages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut writer = MetricsWriter::create(&path).unwrap();
        for step in [10, 20] {
            writer.write(train("s1", step)).unwrap();
        }
        for step in [10, 20, 30] {
            writer.write(train("s2", step)).unwrap();
        }
        writer
            .write(MetricRecord::new("s2", 30, 0, Split::Val))
            .unwrap();
        writer.write(train("s3", 10)).unwrap();
        drop(writer);
        let mut text = fs::read_to_string(&path).unwrap();
        text.push_str("{\"stage\":\"s3\",\"st");
        fs::write(&path, &text).unwrap();

        let mut writer = MetricsWriter::resume(&path, "s2", 20).unwrap();
        writer.write(train("s2", 30)).unwrap();
        let expected: Vec<(String, u64, Split)> =
            [("s1", 10), ("s1", 20), ("s2", 10), ("s2", 20), ("s2", 30)]
                .into_iter()
                .map(|(s, n)| (s.to_owned(), n, Split::Train))
                .collect();
        assert_eq!(steps(&path), expected);
        assert!(fs::read_to_string(&path).unwrap().ends_with("}\n"));
    }

    #[test]
    fn resume_continues_elapsed_time_and_keeps_everything_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut record = train("s1", 5);
        record.elapsed_s = 1000.0;
        fs::write(&path, serde_json::to_string(&record).unwrap() + "\n").unwrap();
        let writer = MetricsWriter::resume(&path, "s1", 5).unwrap();
        assert!(writer.elapsed_s() >= 1000.0 && writer.elapsed_s() < 1010.0);
        assert_eq!(steps(&path).len(), 1);
        let fresh = MetricsWriter::resume(&dir.path().join("new.jsonl"), "s1", 0).unwrap();
        assert!(fresh.elapsed_s() < 10.0);
    }
}
