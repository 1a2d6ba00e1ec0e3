//! TensorBoard event files: TFRecord framing (length, masked CRC-32C of the length, the record,
//! its masked CRC-32C) around `tensorflow.Event` protobufs, encoded here for the few fields the
//! scalar and text plugins read.
use super::MetricSink;
use crate::metrics::MetricRecord;
use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes one `events.out.tfevents.<time>.<host>` file; a resumed job starts a new one beside
/// the old (TensorBoard reads every file of the directory).
pub struct TensorBoardSink {
    path: PathBuf,
    file: File,
}

impl TensorBoardSink {
    /// A new event file in `dir` (created), starting with the file-version event and the
    /// resolved recipe as the text summary `recipe` (TensorBoard's Text tab).
    pub fn create(dir: &Path, recipe_yaml: &str) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = unix_time();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now as u64,
            std::process::id()
        ));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut sink = Self { path, file };
        let mut version = Vec::new();
        event_header(&mut version, now, 0);
        string_field(&mut version, 3, "brain.Event:2");
        sink.append(&version)?;
        // A text summary renders markdown: indented four spaces, the YAML shows as code.
        let text: String = recipe_yaml.lines().map(|l| format!("    {l}\n")).collect();
        sink.append(&event(now, 0, &text_value("recipe", &text)))?;
        Ok(sink)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&tf_record(event))
            .and_then(|_| self.file.flush())
            .with_context(|| format!("appending to {}", self.path.display()))
    }
}

impl MetricSink for TensorBoardSink {
    fn name(&self) -> &str {
        "TensorBoard"
    }

    /// One scalar per value of the record, tagged `<stage>/<split>/<name>` at the record's step.
    fn record(&mut self, record: &MetricRecord) -> Result<()> {
        let mut summary = Vec::new();
        for (name, value) in scalars(record) {
            let tag = format!("{}/{}/{name}", record.stage, split_name(record));
            summary.extend(scalar_value(&tag, value as f32));
        }
        self.append(&event(record.time, record.step as i64, &summary))
    }
}

/// Every number of a record that TensorBoard plots: tokens, lr, grad_norm, tokens_per_s,
/// elapsed_s and the named values.
pub fn scalars(record: &MetricRecord) -> Vec<(String, f64)> {
    let mut out = vec![
        ("tokens".to_string(), record.tokens as f64),
        ("elapsed_s".to_string(), record.elapsed_s),
    ];
    for (name, value) in [
        ("lr", record.lr),
        ("grad_norm", record.grad_norm),
        ("tokens_per_s", record.tokens_per_s),
    ] {
        out.extend(value.map(|v| (name.to_string(), v)));
    }
    out.extend(record.values.iter().map(|(k, v)| (k.clone(), *v)));
    out
}

pub fn split_name(record: &MetricRecord) -> &'static str {
    match record.split {
        crate::metrics::Split::Train => "train",
        crate::metrics::Split::Val => "val",
    }
}

fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `Event { wall_time = 1 (double); step = 2 (int64); summary = 5 (Summary) }`, where
/// `summary_values` are already encoded `Summary.value` entries (field 1 of Summary).
fn event(wall_time: f64, step: i64, summary_values: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    event_header(&mut out, wall_time, step);
    bytes_field(&mut out, 5, summary_values);
    out
}

fn event_header(out: &mut Vec<u8>, wall_time: f64, step: i64) {
    key(out, 1, 1);
    out.extend_from_slice(&wall_time.to_le_bytes());
    key(out, 2, 0);
    varint(out, step as u64);
}

/// `Summary.value` (field 1) holding `Value { tag = 1; simple_value = 2 (float) }`.
fn scalar_value(tag: &str, value: f32) -> Vec<u8> {
    let mut inner = Vec::new();
    string_field(&mut inner, 1, tag);
    key(&mut inner, 2, 5);
    inner.extend_from_slice(&value.to_le_bytes());
    let mut out = Vec::new();
    bytes_field(&mut out, 1, &inner);
    out
}

/// `Summary.value` (field 1) holding a text-plugin value: `Value { tag = 1; metadata = 9
/// { plugin_data = 1 { plugin_name = 1: "text" } }; tensor = 8 { dtype = 1: DT_STRING (7);
/// tensor_shape = 2: {} ; string_val = 8 } }`.
fn text_value(tag: &str, text: &str) -> Vec<u8> {
    let mut plugin = Vec::new();
    string_field(&mut plugin, 1, "text");
    let mut metadata = Vec::new();
    bytes_field(&mut metadata, 1, &plugin);
    let mut tensor = Vec::new();
    key(&mut tensor, 1, 0);
    varint(&mut tensor, 7);
    bytes_field(&mut tensor, 2, &[]);
    string_field(&mut tensor, 8, text);
    let mut inner = Vec::new();
    string_field(&mut inner, 1, tag);
    bytes_field(&mut inner, 8, &tensor);
    bytes_field(&mut inner, 9, &metadata);
    let mut out = Vec::new();
    bytes_field(&mut out, 1, &inner);
    out
}

fn key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    varint(out, u64::from(field << 3 | u32::from(wire_type)));
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn string_field(out: &mut Vec<u8>, field: u32, text: &str) {
    bytes_field(out, field, text.as_bytes());
}

/// TFRecord framing of one record.
fn tf_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's masked CRC-32C: rotated right by 15 bits plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}
