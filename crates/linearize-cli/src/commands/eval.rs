//! `linearize eval --model M --perplexity FILE --ctx N [--max-windows K] [--batch-size B]`:
//! perplexity of a text file by the evaluation protocol of docs/eval.md, printed as JSON.
use crate::runtime::{self, RuntimeArgs};
use anyhow::{Context, Result};
use linearize_eval::perplexity::{perplexity, WindowOptions};
use linearize_models::lm::CausalLm;
use linearize_models::tokenizer::Tokenizer;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The model: a local Hugging Face-layout directory (a plain model or an exported converted
    /// `model/` directory) or a hub id `org/name[@revision]`.
    #[arg(long)]
    pub model: String,
    /// `adapters.safetensors` of a run, applied to the base model given by --model.
    #[arg(long)]
    pub adapters: Option<PathBuf>,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub perplexity: PathBuf,
    /// Tokens per window.
    #[arg(long)]
    pub ctx: usize,
    /// Score only the first K windows.
    #[arg(long)]
    pub max_windows: Option<usize>,
    /// Windows per forward pass (memory grows with it; the result does not change).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: Args) -> Result<()> {
    let text = std::fs::read_to_string(&args.perplexity).with_context(|| {
        format!(
            "reading {} (expected a UTF-8 text file)",
            args.perplexity.display()
        )
    })?;
    let (dir, loaded) = runtime::load_model(&args.model, args.adapters.as_deref(), &args.runtime)?;
    let model = loaded.model;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let tokens = tokenizer.encode(&text, false)?;
    let device = model.device();
    if let Some(max) = model.max_context().filter(|&max| args.ctx as i64 > max) {
        tracing::warn!(
            "--ctx {} is beyond the model's trained context of {max} tokens",
            args.ctx
        );
    }
    let options = WindowOptions {
        ctx: args.ctx,
        max_windows: args.max_windows,
        batch_size: args.batch_size,
    };
    let start = Instant::now();
    let report = perplexity(&model, &tokens, &options)?;
    let seconds = start.elapsed().as_secs_f64();
    let mut out = serde_json::to_value(&report)?;
    let extra = json!({
        "model": args.model,
        "model_dir": dir,
        "adapters": args.adapters,
        "file": args.perplexity,
        "device": format!("{device:?}"),
        "dtype": args.runtime.dtype,
        "max_windows": args.max_windows,
        "seconds": seconds,
        "tokens_per_second": (report.windows * args.ctx) as f64 / seconds.max(1e-9),
    });
    if let (Some(out), Some(extra)) = (out.as_object_mut(), extra.as_object()) {
        out.extend(extra.clone());
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
