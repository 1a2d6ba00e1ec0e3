//! Reading documents out of one source file: plain text, or text, alpaca and chat records from
//! JSONL, a JSON list or Parquet.
use super::config::{SourceConfig, SourceKind};
use super::encoder::{ChatTurn, TextEncoder};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{Map, Value};
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::Path;

/// Calls `sink` with the text of every document of `file` in order (chat and alpaca records
/// rendered in the encoder's prompt format). Errors, the sink's included, name the file
/// and, for JSONL, the line.
pub fn read_documents(
    file: &Path,
    source: &SourceConfig,
    encoder: &dyn TextEncoder,
    mut sink: impl FnMut(&str) -> Result<()>,
) -> Result<()> {
    let format = match source.kind {
        SourceKind::Text => return read_text(file, source.separator.as_deref(), sink),
        SourceKind::Jsonl => Record::Text(source.field_name()),
        SourceKind::Alpaca => Record::Alpaca,
        SourceKind::Chat => Record::Chat(source.field_name()),
    };
    match file.extension().and_then(|e| e.to_str()) {
        Some("parquet") => {
            return read_parquet(file, |row, record| {
                let at = || format!("{}: row {}", file.display(), row + 1);
                let text = record_text(record, &format, encoder).with_context(at)?;
                sink(&text).with_context(at)
            })
        }
        Some("json") if starts_with_array(file)? => {
            let text = fs::read_to_string(file)
                .with_context(|| format!("reading {} (expected UTF-8 JSON)", file.display()))?;
            let records: Vec<Value> = serde_json::from_str(&text)
                .map_err(|e| anyhow!("{}: not a JSON list of records: {e}", file.display()))?;
            for (index, record) in records.into_iter().enumerate() {
                let at = || format!("{}: record {}", file.display(), index + 1);
                let text = record_text(record, &format, encoder).with_context(at)?;
                sink(&text).with_context(at)?;
            }
            return Ok(());
        }
        _ => {}
    }
    let reader =
        BufReader::new(File::open(file).with_context(|| format!("opening {}", file.display()))?);
    for (index, line) in reader.lines().enumerate() {
        let at = || format!("{}:{}", file.display(), index + 1);
        let line = line.with_context(|| format!("{}: reading (expected UTF-8 JSONL)", at()))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Value = serde_json::from_str(&line)
            .map_err(|e| anyhow!("not valid JSON: {e}"))
            .with_context(at)?;
        let text = record_text(record, &format, encoder).with_context(at)?;
        sink(&text).with_context(at)?;
    }
    Ok(())
}

/// Whether a `.json` file holds one JSON list (as `datasets` writes with `lines=False`) rather
/// than JSON Lines.
fn starts_with_array(file: &Path) -> Result<bool> {
    let mut reader =
        BufReader::new(File::open(file).with_context(|| format!("opening {}", file.display()))?);
    loop {
        let buf = reader
            .fill_buf()
            .with_context(|| format!("reading {}", file.display()))?;
        let Some(&first) = buf.first() else {
            return Ok(false);
        };
        if first.is_ascii_whitespace() {
            reader.consume(1);
            continue;
        }
        return Ok(first == b'[');
    }
}

/// Calls `record` with every row of a Parquet file as a JSON object (columns by name), row by
/// row.
fn read_parquet(file: &Path, mut record: impl FnMut(usize, Value) -> Result<()>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let opened = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let reader = SerializedFileReader::new(opened)
        .map_err(|e| anyhow!("{}: not a readable Parquet file: {e}", file.display()))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| anyhow!("{}: reading Parquet rows: {e}", file.display()))?;
    for (index, row) in rows.enumerate() {
        let row = row.map_err(|e| anyhow!("{}: row {}: {e}", file.display(), index + 1))?;
        record(index, row.to_json_value())?;
    }
    Ok(())
}

fn read_text(
    file: &Path,
    separator: Option<&str>,
    mut sink: impl FnMut(&str) -> Result<()>,
) -> Result<()> {
    let text = fs::read_to_string(file)
        .with_context(|| format!("reading {} (expected UTF-8 text)", file.display()))?;
    let pieces: Box<dyn Iterator<Item = &str>> = match separator {
        Some(separator) => Box::new(text.split(separator)),
        None => Box::new(std::iter::once(text.as_str())),
    };
    for piece in pieces.filter(|p| !p.trim().is_empty()) {
        sink(piece).with_context(|| file.display().to_string())?;
    }
    Ok(())
}

/// What a JSONL line holds.
enum Record<'a> {
    /// A string under this field.
    Text(&'a str),
    /// `instruction`, optional `input`, `output`.
    Alpaca,
    /// A list of messages under this field.
    Chat(&'a str),
}

/// The document text of one record (a JSONL line, an element of a JSON list, a Parquet row).
fn record_text(value: Value, format: &Record, encoder: &dyn TextEncoder) -> Result<String> {
    let Value::Object(record) = value else {
        bail!("expected a JSON object, found {}", kind_name(&value));
    };
    match format {
        Record::Text(field) => Ok(string_field(&record, field)?.to_owned()),
        Record::Alpaca => {
            let instruction = string_field(&record, "instruction")?;
            let input = match record.get("input") {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s,
                Some(other) => bail!("field `input` must be a string, found {}", kind_name(other)),
            };
            let output = string_field(&record, "output")?;
            encoder
                .render_instruction(instruction, input, output)
                .context("rendering the instruction")
        }
        Record::Chat(field) => encoder
            .render_chat(&chat_turns(&record, field)?)
            .context("rendering the conversation"),
    }
}

fn chat_turns(record: &Map<String, Value>, field: &str) -> Result<Vec<ChatTurn>> {
    let messages = match record.get(field) {
        Some(Value::Array(messages)) => messages,
        Some(other) => bail!(
            "field `{field}` must be a list of messages, found {}",
            kind_name(other)
        ),
        None => bail!("missing field `{field}` (a list of {{role, content}} messages)"),
    };
    ensure!(!messages.is_empty(), "field `{field}` is an empty list");
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let Value::Object(message) = message else {
                bail!("`{field}[{i}]` must be an object with `role` and `content`");
            };
            let turn = ChatTurn::new(
                string_field(message, "role")?,
                string_field(message, "content")?,
            );
            Ok(turn)
        })
        .collect()
}

fn string_field<'a>(record: &'a Map<String, Value>, name: &str) -> Result<&'a str> {
    match record.get(name) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!(
            "field `{name}` must be a string, found {}",
            kind_name(other)
        ),
        None => bail!("missing string field `{name}`"),
    }
}

fn kind_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
