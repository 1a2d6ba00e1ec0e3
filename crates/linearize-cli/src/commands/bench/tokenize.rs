//! `linearize bench tokenize`: peak resident memory of tokenising one large document (no
//! separator, as a data source reads it) beside its token count, each size in its own process.
//! The target (issue 27): at most twice the peak of a 2 MB document plus the ids themselves.
use super::harness::{machine, run_child, self_command, write_json, MIB};
use super::memory::MemoryProbe;
use crate::recipe::resolve_model;
use anyhow::{bail, Context, Result};
use linearize_train::data::{tokenize_source, ModelEncoder, SourceConfig, SourceKind};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::Device;

#[derive(clap::Args, Clone, Debug)]
pub struct TokenizeArgs {
    /// The model whose tokenizer is measured (a directory, a hub id or `offline:smollm2`).
    #[arg(long, default_value = "offline:smollm2")]
    model: String,
    /// Document sizes in MB (10^6 bytes); the first is the base of the target.
    #[arg(long, value_delimiter = ',', default_value = "2,20,200")]
    sizes_mb: Vec<u64>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Internal: measure one document of this many bytes in this process and print JSON.
    #[arg(long, hide = true)]
    worker: Option<u64>,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let model_dir = resolve_model(&args.model)?;
    if let Some(bytes) = args.worker {
        println!("{}", measure(&model_dir, bytes)?);
        return Ok(());
    }
    if args.sizes_mb.is_empty() {
        bail!("--sizes-mb: give at least one size");
    }
    let mut rows = Vec::new();
    for &mb in &args.sizes_mb {
        let mut cmd = self_command()?;
        cmd.args(["bench", "tokenize", "--model"])
            .arg(&model_dir)
            .args(["--worker", &(mb * 1_000_000).to_string()]);
        tracing::info!(mb, "tokenising one document");
        let row = run_child(cmd, &format!("a {mb} MB document"))?
            .map_err(|why| anyhow::anyhow!("{mb} MB: {why}"))?;
        rows.push(row);
    }
    let base_peak = rows[0]["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN);
    println!("machine: {}", machine(Device::Cpu)?);
    println!(
        "| document MB | tokens | ids MB | peak RSS MB | RSS at start MB | seconds | target MB | met |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in &mut rows {
        let ids = row["ids_bytes"].as_f64().unwrap_or(f64::NAN);
        let peak = row["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN);
        let target = 2.0 * base_peak + ids;
        row["target_bytes"] = json!(target);
        row["target_met"] = json!(peak <= target);
        println!(
            "| {:.0} | {} | {:.1} | {:.0} | {:.0} | {:.1} | {:.0} | {} |",
            row["document_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
            row["tokens"],
            ids / MIB,
            peak / MIB,
            row["start_rss_bytes"].as_f64().unwrap_or(f64::NAN) / MIB,
            row["seconds"].as_f64().unwrap_or(f64::NAN),
            target / MIB,
            if peak <= target { "yes" } else { "no" },
        );
    }
    if let Some(path) = &args.json {
        let report = json!({
            "benchmark": "tokenize",
            "machine": machine(Device::Cpu)?,
            "model": args.model,
            "target": "peak RSS <= 2 x peak RSS of the first size + the ids' bytes",
            "rows": rows,
        });
        write_json(path, &report)?;
    }
    Ok(())
}

/// Writes one document of `bytes` bytes (the offline corpus' training text, repeated) and
/// tokenises it as a text source; the peak RSS covers reading and tokenising, from a process
/// that has loaded the tokenizer.
fn measure(model_dir: &Path, bytes: u64) -> Result<Value> {
    let encoder = ModelEncoder::new(model_dir, None)?;
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let path = dir.path().join("document.txt");
    write_document(&path, bytes)?;
    let probe = MemoryProbe::new(Device::Cpu)?;
    let start_rss = probe.start()?;
    let started = Instant::now();
    let source = SourceConfig::new(SourceKind::Text, &path);
    let docs = tokenize_source(&source, &encoder, None)?;
    let seconds = started.elapsed().as_secs_f64();
    let peak = start_rss + probe.peak_since(start_rss)?;
    Ok(json!({
        "document_bytes": bytes,
        "documents": docs.len(),
        "tokens": docs.num_tokens(),
        "ids_bytes": docs.num_tokens() * std::mem::size_of::<u32>(),
        "start_rss_bytes": start_rss,
        "peak_rss_bytes": peak,
        "seconds": seconds,
    }))
}

/// `bytes` bytes of real English text, streamed to `path` (never held whole in memory).
fn write_document(path: &Path, bytes: u64) -> Result<()> {
    let corpus = linearize_models::offline::ensure_text()?;
    let text = std::fs::read_to_string(corpus.split_path(linearize_models::offline::Split::Train))
        .context("reading the offline corpus")?;
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut left = bytes as usize;
    while left > 0 {
        let mut take = left.min(text.len());
        while !text.is_char_boundary(take) {
            take -= 1;
        }
        if take == 0 {
            break;
        }
        file.write_all(&text.as_bytes()[..take])?;
        left -= take;
    }
    file.flush()?;
    Ok(())
}
