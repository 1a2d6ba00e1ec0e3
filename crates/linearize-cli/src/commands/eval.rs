//! `linearize eval`: a model on its own or against its teacher.
//!
//! - `linearize eval --model M --perplexity FILE --ctx N [--max-windows K] [--batch-size B]`:
//!   perplexity of a text file by the evaluation protocol (docs/eval.md), printed as
//!   JSON.
//! - `linearize eval --model M --teacher T --out DIR [--perplexity FILE --ctx N ...]
//!   [--config EVAL.yaml]`: the report a recipe's `eval` section writes (docs/eval.md), for the
//!   converted model M against the original T: KL(teacher ‖ student) and top-1 agreement beside
//!   both perplexities, and whatever else the config asks for (recall, tasks, speed,
//!   generations), into DIR (`eval.json`, `eval.md`, plots).
use crate::recipe::resolve_eval_paths;
use crate::runtime::{self, RuntimeArgs};
use anyhow::{bail, ensure, Context, Result};
use linearize_eval::perplexity::{perplexity, WindowOptions};
use linearize_eval::{run_report, EvalConfig};
use linearize_models::lm::CausalLm;
use linearize_models::tokenizer::Tokenizer;
use serde_json::json;
use std::path::{Path, PathBuf};
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
    /// The original model to compare against (same sources as --model): writes a report with
    /// KL and top-1 agreement to --out instead of printing perplexity alone.
    #[arg(long, requires = "out")]
    pub teacher: Option<String>,
    /// Directory of the report (with --teacher).
    #[arg(long, requires = "teacher")]
    pub out: Option<PathBuf>,
    /// YAML file with the keys of a recipe's `eval` section (docs/recipes.md), with --teacher;
    /// --perplexity and its options add to or replace its perplexity files and settings.
    #[arg(long, requires = "teacher")]
    pub config: Option<PathBuf>,
    /// UTF-8 text file to score (`offline:text/<split>` names a file of the offline corpus).
    #[arg(long)]
    pub perplexity: Option<PathBuf>,
    /// Tokens per window (required with --perplexity).
    #[arg(long)]
    pub ctx: Option<usize>,
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
    match (&args.teacher, &args.out) {
        (Some(teacher), Some(out)) => report(&args, teacher, out),
        _ => perplexity_only(&args),
    }
}

/// The eval config of a report: `--config`'s, with the `--perplexity` options on top.
fn report_config(args: &Args) -> Result<EvalConfig> {
    let mut cfg = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_yaml_ng::from_str::<EvalConfig>(&text)
                .with_context(|| format!("{}: not an eval section", path.display()))?
        }
        // Only what the command line asks for: every section that needs no input of its own
        // is off.
        None => EvalConfig::default().perplexity_only(),
    };
    if let Some(file) = &args.perplexity {
        let ctx = args.ctx.context("--perplexity needs --ctx")?;
        let p = &mut cfg.perplexity;
        p.enabled = true;
        if !p.files.contains(file) {
            p.files.insert(0, file.clone());
        }
        p.ctx = ctx;
        p.max_windows = args.max_windows;
        p.batch_size = args.batch_size;
    }
    ensure!(
        !cfg.perplexity.enabled || !cfg.perplexity.files.is_empty(),
        "nothing to score: give --perplexity FILE --ctx N or perplexity.files in --config"
    );
    resolve_eval_paths(&cfg)
}

fn report(args: &Args, teacher: &str, out: &Path) -> Result<()> {
    let cfg = report_config(args)?;
    let (dir, loaded) = runtime::load_model(&args.model, args.adapters.as_deref(), &args.runtime)?;
    let mut student = loaded.model;
    let (_, mut original) = runtime::load_model(teacher, None, &args.runtime)?;
    if original.converted.is_some() {
        bail!("--teacher {teacher}: a converted model; give the original (softmax) model");
    }
    let tokenizer = Tokenizer::from_dir(&dir)?;
    run_report(
        &mut original.model,
        &mut student,
        &tokenizer,
        &cfg,
        out,
        None,
    )
    .context("evaluation")?;
    println!("report: {}", out.join("eval.md").display());
    Ok(())
}

fn perplexity_only(args: &Args) -> Result<()> {
    let (Some(file), Some(ctx)) = (&args.perplexity, args.ctx) else {
        bail!("give --perplexity FILE --ctx N, or --teacher T --out DIR for a report");
    };
    let file = resolve_eval_paths(&{
        let mut cfg = EvalConfig::default();
        cfg.perplexity.files = vec![file.clone()];
        cfg
    })?
    .perplexity
    .files
    .remove(0);
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("reading {} (expected a UTF-8 text file)", file.display()))?;
    let (dir, loaded) = runtime::load_model(&args.model, args.adapters.as_deref(), &args.runtime)?;
    let model = loaded.model;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let tokens = tokenizer.encode(&text, false)?;
    let device = model.device();
    if let Some(max) = model.max_context().filter(|&max| ctx as i64 > max) {
        tracing::warn!("--ctx {ctx} is beyond the model's trained context of {max} tokens");
    }
    let options = WindowOptions {
        ctx,
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
        "file": file,
        "device": linearize_models::names::device_name(device),
        "dtype": args.runtime.dtype,
        "max_windows": args.max_windows,
        "seconds": seconds,
        "tokens_per_second": (report.windows * ctx) as f64 / seconds.max(1e-9),
    });
    if let (Some(out), Some(extra)) = (out.as_object_mut(), extra.as_object()) {
        out.extend(extra.clone());
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
