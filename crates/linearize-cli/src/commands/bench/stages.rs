//! `bench stages`: tokens/s and peak memory of the training stages beside the teacher's
//! forward-only pass on the same batch (the floor of attention transfer, which must run it).
//! Stage steps run the real trainers (`run_stage1`, `run_stage2`) on random tokens; their
//! throughput is read from the `metrics.jsonl` they write, after `--warmup` updates. Each case
//! runs in its own child process, so each peak-memory reading starts from a clean allocator and
//! an out-of-memory failure only loses that case.
use super::harness::{
    cell, device_arg, machine, median_ms, parse_worker_spec, run_child, self_command, write_json,
    GIB,
};
use super::memory::MemoryProbe;
use super::model::{random_ids, ModelArgs};
use anyhow::{bail, ensure, Context, Result};
use linearize_models::markdown_table::MarkdownTable;
use linearize_profile::summary::Summary;
use linearize_profile::{range, Profiler};
use linearize_train::data::{Batcher, PackedSequences};
use linearize_train::lora::{LoraAdapters, LoraSettings};
use linearize_train::metrics::MetricsWriter;
use linearize_train::stage::{StageData, StageJob};
use linearize_train::stage1::{run_stage1, Stage1Config};
use linearize_train::stage2::{run_stage2, LossName, LossSpec, Stage2Config};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StageCase {
    /// The teacher's forward pass without gradients: hidden states, and with the LM head.
    Teacher,
    /// Attention transfer into every layer.
    Stage1,
    /// LoRA on the converted model with next-token cross-entropy.
    Stage2,
}

impl StageCase {
    fn name(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Stage1 => "stage1",
            Self::Stage2 => "stage2",
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Stage2Loss {
    Xent,
    Kl,
}

impl Stage2Loss {
    fn name(self) -> &'static str {
        match self {
            Self::Xent => "xent",
            Self::Kl => "kl",
        }
    }

    fn loss(self) -> LossName {
        match self {
            Self::Xent => LossName::Xent,
            Self::Kl => LossName::Kl,
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct StageArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Context lengths (tokens per sequence).
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
    ctx: Vec<i64>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 1)]
    batch: i64,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "teacher,stage1,stage2"
    )]
    cases: Vec<StageCase>,
    /// Timed updates (or forward passes) per case.
    #[arg(long, default_value_t = 8)]
    steps: u64,
    /// Untimed updates first (allocator, cuBLAS and kernel selection).
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// LoRA rank of stage 2 (on q, k, v, o).
    #[arg(long, default_value_t = 8)]
    lora_rank: i64,
    /// Stage 2 with activation checkpointing (layers recomputed in the backward).
    #[arg(long)]
    activation_checkpointing: bool,
    /// Stage 2's objective: `xent` (the benchmarks of docs/BENCHMARKS.md) or `kl` (the recipes'
    /// default: one more forward pass of the teacher per update).
    #[arg(long, value_enum, default_value = "xent")]
    stage2_loss: Stage2Loss,
    /// Stage 2's tokens per chunk of the loss (the recipe's `lora.loss_chunk`); at least
    /// batch x ctx computes the loss in one piece.
    #[arg(long, default_value_t = 1024)]
    loss_chunk: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Profile each case with libtorch's profiler: write its trace (Chrome trace JSON) and a
    /// summary of device time per range, operator and kernel over the timed updates to this
    /// directory, and print the summaries. Profiling slows the cases it measures.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Rows of each profile table.
    #[arg(long, default_value_t = 25)]
    profile_top: usize,
    /// Internal: run one `CASE:CTX` in this process and print its result as JSON.
    #[arg(long, hide = true)]
    worker: Option<String>,
}

pub fn run(args: StageArgs) -> Result<()> {
    ensure!(args.steps >= 2, "--steps must be >= 2");
    ensure!(args.batch >= 1, "--batch must be >= 1");
    ensure!(args.loss_chunk >= 1, "--loss-chunk must be >= 1");
    if let Some(spec) = &args.worker {
        return worker(&args, spec);
    }
    if let Some(&bad) = args.ctx.iter().find(|&&l| l < 2) {
        bail!("--ctx: {bad} is not a context length (>= 2)");
    }
    let device = args.model.device()?;
    let machine = machine(device)?;
    let cfg = args.model.model_config()?;
    tracing::info!(%machine, config = %args.model.config.display(), "benchmarking stages");
    let mut results = Vec::new();
    for &ctx in &args.ctx {
        for &case in &args.cases {
            let spec = format!("{}:{ctx}", case.name());
            let mut cmd = self_command()?;
            cmd.args(["bench", "stages"]).args(args.model.child_args());
            for (flag, value) in [
                ("--batch", args.batch),
                ("--steps", args.steps as i64),
                ("--warmup", args.warmup as i64),
                ("--lora-rank", args.lora_rank),
            ] {
                cmd.args([flag.to_string(), value.to_string()]);
            }
            if args.activation_checkpointing {
                cmd.arg("--activation-checkpointing");
            }
            cmd.args(["--stage2-loss", args.stage2_loss.name()]);
            cmd.args(["--loss-chunk", &args.loss_chunk.to_string()]);
            if let Some(dir) = &args.profile {
                cmd.arg("--profile").arg(dir);
                cmd.args(["--profile-top", &args.profile_top.to_string()]);
            }
            cmd.args(["--worker", &spec]);
            let mut outcome = json!({"case": case.name(), "ctx": ctx, "batch": args.batch});
            match run_child(cmd, &spec)? {
                Ok(report) => {
                    outcome["status"] = json!("ok");
                    for (k, v) in report.as_object().into_iter().flatten() {
                        outcome[k] = v.clone();
                    }
                }
                Err(reason) => {
                    outcome["status"] = json!("failed");
                    outcome["note"] = json!(reason);
                }
            }
            tracing::info!(case = case.name(), ctx, result = %outcome, "case done");
            results.push(outcome);
        }
    }
    add_ratios(&mut results);
    println!("{}", table(&results));
    if args.profile.is_some() {
        println!("Under the profiler: these rates are slowed by its recording.\n");
        for r in &results {
            if let Some(md) = r["profile"]["summary_md"].as_str() {
                let text = std::fs::read_to_string(md).with_context(|| format!("reading {md}"))?;
                println!(
                    "### {} ctx {} batch {}\n\n{text}",
                    r["case"].as_str().unwrap_or(""),
                    r["ctx"],
                    r["batch"]
                );
            }
        }
    }
    if let Some(path) = &args.json {
        let report = json!({
            "machine": machine,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "settings": {
                "device": device_arg(device), "dtype": args.model.runtime.dtype,
                "config": args.model.config.display().to_string(),
                "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
                "attention": args.model.attention_config()?,
                "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                "lora_rank": args.lora_rank,
                "activation_checkpointing": args.activation_checkpointing,
                "stage2_loss": args.stage2_loss.name(),
                "loss_chunk": args.loss_chunk,
            },
            "results": results,
        });
        write_json(path, &report)?;
    }
    Ok(())
}

/// Each stage's tokens/s as a fraction of the teacher's forward-only tokens/s at the same ctx:
/// stage 1 against the hidden-states pass it must run, stage 2 against the pass with the LM head.
fn add_ratios(results: &mut [Value]) {
    let teacher: Vec<(i64, Value)> = results
        .iter()
        .filter(|r| r["case"] == "teacher" && r["status"] == "ok")
        .map(|r| (r["ctx"].as_i64().unwrap_or(0), r.clone()))
        .collect();
    for r in results.iter_mut() {
        let Some((_, t)) = teacher
            .iter()
            .find(|(ctx, _)| Some(*ctx) == r["ctx"].as_i64())
        else {
            continue;
        };
        let floor = match r["case"].as_str() {
            Some("stage1") => &t["tokens_per_s"],
            Some("stage2") => &t["tokens_per_s_logits"],
            _ => continue,
        };
        if let (Some(x), Some(f)) = (r["tokens_per_s"].as_f64(), floor.as_f64()) {
            r["vs_teacher_forward"] = json!(x / f);
        }
    }
}

/// The child's side: build the model, measure one case, print one JSON line.
fn worker(args: &StageArgs, spec: &str) -> Result<()> {
    let (case, ctx) = parse_worker_spec::<StageCase>(spec)?;
    let device = args.model.device()?;
    let probe = MemoryProbe::new(device)?;
    let profiler = args
        .profile
        .as_ref()
        .map(|_| Profiler::start(device.is_cuda()))
        .transpose()?;
    let mut report = match case {
        StageCase::Teacher => {
            let model = args.model.teacher()?;
            let baseline = probe.start()?;
            let ids = random_ids(model.config(), args.batch, ctx, device);
            let iters = (args.warmup + args.steps) as usize;
            let tokens = (args.batch * ctx) as f64;
            let hidden_ms = tch::no_grad(|| {
                median_ms(iters, device, || {
                    let _update = range("update");
                    model.hidden_states(&ids, None).map(drop)
                })
            })?;
            let logits_ms =
                tch::no_grad(|| median_ms(iters, device, || model.forward(&ids, None).map(drop)))?;
            json!({
                "tokens_per_s": tokens / hidden_ms * 1e3,
                "tokens_per_s_logits": tokens / logits_ms * 1e3,
                "step_ms": hidden_ms,
                "peak_bytes": probe.peak_since(baseline)?,
            })
        }
        StageCase::Stage1 | StageCase::Stage2 => {
            let mut student = args.model.student()?;
            let baseline = probe.start()?;
            let run_dir = tempfile::tempdir().context("creating a scratch run directory")?;
            let metrics_path = run_dir.path().join("metrics.jsonl");
            let mut metrics = MetricsWriter::create(&metrics_path)?;
            let updates = args.warmup + args.steps;
            let targets = case == StageCase::Stage2;
            let window = ctx as usize + usize::from(targets);
            let sequences = updates as usize * args.batch as usize;
            let cfg = student.model.config();
            let tokens: Vec<u32> = Vec::<i64>::try_from(
                random_ids(cfg, 1, (sequences * window) as i64, tch::Device::Cpu).view([-1]),
            )?
            .into_iter()
            .map(|t| t as u32)
            .collect();
            let data = StageData {
                train: Batcher::new(
                    PackedSequences::from_tokens(ctx as usize, targets, tokens)?,
                    args.batch as usize,
                    0,
                )?,
                seq_len: ctx as usize,
                val: None,
            };
            let job = StageJob {
                run_dir: run_dir.path(),
                metrics: &mut metrics,
                recipe_hash: "bench",
                seed: 0,
                run_step_offset: 0,
                resume: None,
                preemption: None,
                group: None,
            };
            if case == StageCase::Stage1 {
                let cfg = Stage1Config {
                    max_steps: Some(updates),
                    eval_every: 0,
                    eval_at_start: false,
                    save_every: 0,
                    log_every: 1,
                    verify_frozen: false,
                    ..Stage1Config::default()
                };
                run_stage1(&mut student.model, &student.converted, data, &cfg, job)?;
            } else {
                let cfg = Stage2Config {
                    max_steps: Some(updates),
                    lora: LoraSettings {
                        rank: args.lora_rank,
                        ..LoraSettings::default()
                    },
                    eval_every: 0,
                    eval_at_start: false,
                    save_every: 0,
                    log_every: 1,
                    verify_frozen: false,
                    activation_checkpointing: args.activation_checkpointing,
                    loss: LossSpec::Name(args.stage2_loss.loss()),
                    loss_chunk: args.loss_chunk,
                    ..Stage2Config::default()
                };
                let lora = LoraAdapters::install(&mut student.model, &cfg.lora, 0)?;
                run_stage2(
                    &mut student.model,
                    &student.converted,
                    &lora,
                    data,
                    &cfg,
                    job,
                )?;
            }
            let peak = probe.peak_since(baseline)?;
            let (tokens_per_s, step_ms) = steady_rate(&metrics_path, args.warmup)?;
            json!({"tokens_per_s": tokens_per_s, "step_ms": step_ms, "peak_bytes": peak})
        }
    };
    if let (Some(profiler), Some(dir)) = (profiler, &args.profile) {
        let stem = dir.join(format!("{}_ctx{ctx}_b{}", case.name(), args.batch));
        let trace = stem.with_extension("trace.json");
        profiler.finish(&trace)?;
        let summary = Summary::from_trace(&trace, "update", args.warmup as usize)?;
        let md = stem.with_extension("profile.md");
        linearize_models::atomic::write_file(&md, summary.markdown(args.profile_top).as_bytes())
            .with_context(|| format!("writing {}", md.display()))?;
        write_json(
            &stem.with_extension("profile.json"),
            &serde_json::to_value(&summary)?,
        )?;
        report["profile"] = json!({
            "trace": trace.display().to_string(),
            "summary_md": md.display().to_string(),
        });
    }
    println!("{report}");
    Ok(())
}

/// Tokens/s and ms per update over the training records after the first `warmup` updates.
fn steady_rate(metrics: &Path, warmup: u64) -> Result<(f64, f64)> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let train: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<std::result::Result<Vec<Value>, _>>()
        .with_context(|| format!("parsing {}", metrics.display()))?
        .into_iter()
        .filter(|r| r["split"] == "train")
        .collect();
    let at = |step: u64| {
        train
            .iter()
            .find(|r| r["step"].as_u64() == Some(step))
            .and_then(|r| Some((r["tokens"].as_f64()?, r["elapsed_s"].as_f64()?)))
    };
    let last = train
        .iter()
        .filter_map(|r| r["step"].as_u64())
        .max()
        .context("the stage logged no training step")?;
    let ((t0, s0), (t1, s1)) = (
        at(warmup).context("no record of the last warm-up step")?,
        at(last).context("no record of the last step")?,
    );
    ensure!(
        last > warmup && s1 > s0,
        "too few timed steps ({last} after {warmup} warm-up)"
    );
    Ok((
        (t1 - t0) / (s1 - s0),
        (s1 - s0) * 1e3 / (last - warmup) as f64,
    ))
}

fn table(results: &[Value]) -> String {
    let mut table = MarkdownTable::new().left("case");
    for name in [
        "ctx",
        "batch",
        "tokens/s",
        "ms/step",
        "x teacher fwd",
        "peak GiB",
    ] {
        table = table.right(name);
    }
    let mut table = table.left("note");
    for r in results {
        table.row([
            r["case"].as_str().unwrap_or("").to_string(),
            r["ctx"].to_string(),
            r["batch"].to_string(),
            cell(&r["tokens_per_s"], 1.0, 0),
            cell(&r["step_ms"], 1.0, 1),
            cell(&r["vs_teacher_forward"], 1.0, 2),
            cell(&r["peak_bytes"], GIB, 2),
            r["note"].as_str().unwrap_or("").to_string(),
        ]);
    }
    table.to_string()
}
