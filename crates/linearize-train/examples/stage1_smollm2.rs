//! Attention transfer on the real SmolLM2-135M-Instruct (offline cache; fetched and imported on
//! first use) at ctx 512 with the LoLCATs preset (Hedgehog 64, sliding window 64, all layers).
//!
//! ```text
//! OMP_NUM_THREADS=2 cargo run --release -p linearize-train --example stage1_smollm2 -- train 200
//! OMP_NUM_THREADS=2 cargo run --release -p linearize-train --example stage1_smollm2 -- step
//! OMP_NUM_THREADS=2 cargo run --release -p linearize-train --example stage1_smollm2 -- forward
//! ```
//! `train [steps]`: validation attention MSE per layer before and after `steps` updates.
//! `step` / `forward`: peak resident memory (VmHWM) of one stage-1 update, or of one plain
//! teacher forward pass, counted from after the model is loaded (the peak is reset first).
use anyhow::{bail, Context, Result};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_models::llama::Model;
use linearize_models::offline::{ensure_smollm2, ensure_text, Split};
use linearize_models::tokenizer::Tokenizer;
use linearize_train::convert::{convert, ConversionConfig};
use linearize_train::data::{Batcher, PackedSequences};
use linearize_train::metrics::MetricsWriter;
use linearize_train::stage1::{run_stage1, Stage1Config, Stage1Data, Stage1Job};
use std::time::Instant;
use tch::{nn, Device, Kind};

const CTX: usize = 512;
const VAL_SEQUENCES: usize = 8;

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map_or("train", String::as_str);
    let steps: u64 = match args.get(1) {
        Some(s) => s
            .parse()
            .with_context(|| format!("steps: not a number: {s}"))?,
        None => 200,
    };
    let dir = ensure_smollm2(None)?;
    let corpus = ensure_text()?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let mut model = Model::load(&dir, Device::Cpu, Kind::Float)?;
    let train_steps = if mode == "train" { steps } else { 1 };
    let train = sequences(
        &tokenizer,
        &corpus.split_path(Split::Train),
        train_steps as usize,
    )?;
    let val = sequences(
        &tokenizer,
        &corpus.split_path(Split::Validation),
        VAL_SEQUENCES,
    )?;
    reset_peak_memory()?;
    let start_rss = vm_kb("VmRSS")?;
    let started = Instant::now();
    match mode {
        "forward" => {
            let ids = train.gather(&[0]);
            let _ = tch::no_grad(|| model.hidden_states(&ids, None))?;
        }
        "step" | "train" => {
            let student = nn::VarStore::new(Device::Cpu);
            let converted = convert(
                &mut model,
                &ConversionConfig::all(AttentionConfig::new(Method::Lolcats)),
                &student,
            )?;
            let run_dir = tempfile::tempdir()?;
            let mut metrics = MetricsWriter::create(&run_dir.path().join("metrics.jsonl"))?;
            let cfg = Stage1Config {
                max_steps: Some(train_steps),
                eval_every: 0,
                eval_at_start: mode == "train",
                eval_batch_size: 1,
                save_every: 0,
                verify_frozen: false,
                ..Stage1Config::default()
            };
            let data = Stage1Data {
                train: Batcher::new(train, 1, 0)?,
                seq_len: CTX,
                val: (mode == "train").then_some(val),
            };
            let job = Stage1Job {
                run_dir: run_dir.path(),
                metrics: &mut metrics,
                recipe_hash: "stage1_smollm2",
                seed: 0,
                run_step_offset: 0,
                resume: None,
                preemption: None,
                group: None,
            };
            let summary = run_stage1(&mut model, &converted, data, &cfg, job)?;
            if let (Some(first), Some(last)) = (&summary.initial_val, &summary.final_val) {
                println!("layer  val MSE step 0  val MSE step {}  factor", last.step);
                for ((layer, before), (_, after)) in first.per_layer.iter().zip(&last.per_layer) {
                    println!(
                        "{layer:>5}  {before:>14.6e}  {after:>16.6e}  {:>6.1}x",
                        before / after
                    );
                }
                println!(
                    "mean   {:>14.6e}  {:>16.6e}  {:>6.1}x",
                    first.attn_mse,
                    last.attn_mse,
                    first.attn_mse / last.attn_mse
                );
            }
        }
        other => bail!("unknown mode '{other}': train [steps] | step | forward"),
    }
    println!(
        "{mode}: {:.1}s, RSS after loading {} MiB, peak after loading (VmHWM) {} MiB",
        started.elapsed().as_secs_f64(),
        start_rss / 1024,
        vm_kb("VmHWM")? / 1024
    );
    Ok(())
}

/// The first `count` sequences of `CTX` tokens of a text file (only as much text as needed is
/// tokenised).
fn sequences(
    tokenizer: &Tokenizer,
    path: &std::path::Path,
    count: usize,
) -> Result<PackedSequences> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut chars = count * CTX * 6;
    loop {
        let end = text
            .char_indices()
            .nth(chars)
            .map_or(text.len(), |(i, _)| i);
        let ids = tokenizer.encode(&text[..end], false)?;
        if ids.len() >= count * CTX {
            return PackedSequences::from_tokens(CTX, false, ids[..count * CTX].to_vec());
        }
        if end == text.len() {
            bail!(
                "{}: {} tokens, fewer than {count} x {CTX}",
                path.display(),
                ids.len()
            );
        }
        chars *= 2;
    }
}

/// Resets the kernel's peak-RSS counter of this process (Linux: `5` to `clear_refs`).
fn reset_peak_memory() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
        .context("resetting VmHWM via /proc/self/clear_refs")
}

/// A `kB` field of `/proc/self/status`.
fn vm_kb(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("/proc/self/status has no {field}"))?;
    line.split_whitespace()
        .nth(1)
        .context("malformed /proc/self/status line")?
        .parse()
        .with_context(|| format!("parsing {line}"))
}
