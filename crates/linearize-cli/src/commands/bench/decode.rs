//! `bench decode`: decoding tokens/s and memory at long contexts, for the teacher (KV cache) and
//! the student (recurrent state), at batch 1 and at the largest batch that fits; `student-graph`
//! is the student decoding by CUDA graph replays ([`GraphDecoder`]). Each (model,
//! context) runs in its own child process: it prefills one sequence of random tokens to the
//! context length, keeps that state on the host, and forks it into batches of growing size on
//! the device (doubling, then bisecting after the first out-of-memory failure), decoding greedily
//! from each. Every point is also given as a fraction of its memory roofline ([`super::roofline`]):
//! the weights plus the state a step must move, over the copy bandwidth the child measures.
use super::harness::{
    cell, device_arg, machine, parse_worker_spec, run_child, self_command, synchronize, with_batch,
    write_json, GIB, MIB,
};
use super::memory::MemoryProbe;
use super::model::{random_ids, ModelArgs};
use super::roofline::{copy_bandwidth, roofline_tokens_per_s, state_traffic, weight_bytes};
use anyhow::{bail, ensure, Result};
use linearize_models::config::ModelConfig;
use linearize_models::graph_decode::GraphDecoder;
use linearize_models::llama::{Model, ModelCache};
use linearize_models::markdown_table::MarkdownTable;
use serde_json::{json, Value};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Decoder {
    Teacher,
    Student,
    /// The student, each step a replay of one captured CUDA graph.
    StudentGraph,
}

impl Decoder {
    fn name(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Student => "student",
            Self::StudentGraph => "student-graph",
        }
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Context lengths reached by prefill before decoding.
    #[arg(long, value_delimiter = ',', default_value = "4096,32768,131072")]
    contexts: Vec<i64>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "teacher,student"
    )]
    models: Vec<Decoder>,
    /// Timed decoding steps per batch size (after 2 untimed ones).
    #[arg(long, default_value_t = 16)]
    tokens: i64,
    /// Largest batch tried. By default, on CUDA, the largest whose states fit in the memory left
    /// after the model (see `memory_bound_batch`); on the CPU that bound or 8, the smaller.
    #[arg(long)]
    max_batch: Option<i64>,
    /// Bisection steps between the last batch that fit and the first that did not.
    #[arg(long, default_value_t = 3)]
    refine: u32,
    /// Prefill block length.
    #[arg(long, default_value_t = 4096)]
    prefill_chunk: i64,
    /// `student-graph` at batch 1: greedy steps decoded both eagerly and by graph replays from
    /// the same state, whose logits are compared (`graph_max_logit_diff`); 0 skips the check.
    #[arg(long, default_value_t = 130)]
    graph_check_steps: i64,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also draw tokens/s and memory against context here (PNG).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Internal: run one `MODEL:CONTEXT` in this process and print its result as JSON.
    #[arg(long, hide = true)]
    worker: Option<String>,
}

const WARMUP_STEPS: i64 = 2;

pub fn run(args: DecodeArgs) -> Result<()> {
    ensure!(args.tokens >= 1, "--tokens must be >= 1");
    ensure!(
        args.max_batch.is_none_or(|b| b >= 1),
        "--max-batch must be >= 1"
    );
    ensure!(args.prefill_chunk >= 1, "--prefill-chunk must be >= 1");
    if let Some(spec) = &args.worker {
        return worker(&args, spec);
    }
    if let Some(&bad) = args.contexts.iter().find(|&&l| l < 1) {
        bail!("--contexts: {bad} is not a context length (>= 1)");
    }
    let device = args.model.device()?;
    let machine = machine(device)?;
    tracing::info!(%machine, config = %args.model.config.display(), "benchmarking decoding");
    let mut results = Vec::new();
    for &context in &args.contexts {
        for &decoder in &args.models {
            let spec = format!("{}:{context}", decoder.name());
            let mut cmd = self_command()?;
            cmd.args(["bench", "decode"]).args(args.model.child_args());
            if let Some(max) = args.max_batch {
                cmd.args(["--max-batch".to_string(), max.to_string()]);
            }
            for (flag, value) in [
                ("--tokens", args.tokens),
                ("--refine", i64::from(args.refine)),
                ("--prefill-chunk", args.prefill_chunk),
                ("--graph-check-steps", args.graph_check_steps),
            ] {
                cmd.args([flag.to_string(), value.to_string()]);
            }
            cmd.args(["--worker", &spec]);
            let base = json!({"model": decoder.name(), "context": context});
            match run_child(cmd, &spec)? {
                Ok(report) => {
                    for row in report["batches"].as_array().into_iter().flatten() {
                        let mut r = base.clone();
                        for (k, v) in row.as_object().into_iter().flatten() {
                            r[k] = v.clone();
                        }
                        for key in [
                            "prefill_tokens_per_s",
                            "copy_bandwidth_bytes_per_s",
                            "weight_bytes",
                            "memory_bound_batch",
                        ] {
                            r[key] = report[key].clone();
                        }
                        results.push(r);
                    }
                }
                Err(reason) => {
                    let mut r = base;
                    r["status"] = json!("failed");
                    r["note"] = json!(reason);
                    results.push(r);
                }
            }
            tracing::info!(model = decoder.name(), context, "case done");
        }
    }
    let best = best_rows(&results);
    println!("{}", table(&results));
    println!("{}", best_table(&best));
    if let Some(path) = &args.json {
        let report = json!({
            "machine": machine,
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "settings": {
                "device": device_arg(device), "dtype": args.model.runtime.dtype,
                "config": args.model.config.display().to_string(),
                "attention": args.model.attention_config()?,
                "tokens": args.tokens, "max_batch": args.max_batch,
                "prefill_chunk": args.prefill_chunk,
                "graph_check_steps": args.graph_check_steps,
            },
            "results": results,
            "best": best,
        });
        write_json(path, &report)?;
    }
    if let Some(path) = &args.plot {
        super::decode_plot::write(path, &results)?;
    }
    Ok(())
}

/// Per context: each model's batch-1 and best (largest tokens/s) rows, and the student's best
/// tokens/s over the teacher's.
fn best_rows(results: &[Value]) -> Vec<Value> {
    let mut contexts: Vec<i64> = results
        .iter()
        .filter_map(|r| r["context"].as_i64())
        .collect();
    contexts.dedup();
    contexts
        .into_iter()
        .map(|context| {
            let ok = |model: &'static str| {
                results.iter().filter(move |r| {
                    r["context"].as_i64() == Some(context)
                        && r["model"] == model
                        && r["status"] == "ok"
                })
            };
            let best = |model: &'static str| {
                ok(model).max_by(|a, b| {
                    let t = |r: &Value| r["tokens_per_s"].as_f64().unwrap_or(0.0);
                    t(a).total_cmp(&t(b))
                })
            };
            let batch1 = |model: &'static str| ok(model).find(|r| r["batch"] == 1);
            let single = |model: &'static str| batch1(model).map(|r| r["tokens_per_s"].clone());
            let fraction = |row: Option<&Value>| row.map(|r| r["roofline_fraction"].clone());
            let (teacher, student, graph) =
                (best("teacher"), best("student"), best("student-graph"));
            let speedup = match (teacher, student) {
                (Some(t), Some(s)) => {
                    json!(
                        s["tokens_per_s"].as_f64().unwrap_or(0.0)
                            / t["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
                    )
                }
                _ => Value::Null,
            };
            json!({
                "context": context,
                "teacher_batch1_tokens_per_s": single("teacher"),
                "student_batch1_tokens_per_s": single("student"),
                "teacher_best_tokens_per_s": teacher.map(|r| r["tokens_per_s"].clone()),
                "teacher_best_batch": teacher.map(|r| r["batch"].clone()),
                "student_best_tokens_per_s": student.map(|r| r["tokens_per_s"].clone()),
                "student_best_batch": student.map(|r| r["batch"].clone()),
                "teacher_state_bytes_per_seq": teacher.map(|r| r["state_bytes_per_seq"].clone()),
                "student_state_bytes_per_seq": student.map(|r| r["state_bytes_per_seq"].clone()),
                "student_over_teacher": speedup,
                "student_graph_batch1_tokens_per_s": single("student-graph"),
                "student_graph_best_tokens_per_s": graph.map(|r| r["tokens_per_s"].clone()),
                "student_graph_best_batch": graph.map(|r| r["batch"].clone()),
                "teacher_batch1_roofline_fraction": fraction(batch1("teacher")),
                "student_batch1_roofline_fraction": fraction(batch1("student")),
                "student_graph_batch1_roofline_fraction": fraction(batch1("student-graph")),
                "teacher_best_roofline_fraction": fraction(teacher),
                "student_best_roofline_fraction": fraction(student),
                "student_graph_best_roofline_fraction": fraction(graph),
            })
        })
        .collect()
}

/// The child's side.
fn worker(args: &DecodeArgs, spec: &str) -> Result<()> {
    let (decoder, context) = parse_worker_spec::<Decoder>(spec)?;
    let device = args.model.device()?;
    let probe = MemoryProbe::new(device)?;
    // Measured before the model takes the device's memory.
    let bandwidth = copy_bandwidth(device);
    // The student's converted parameters must outlive its model's use.
    let (model, _student) = match decoder {
        Decoder::Teacher => (args.model.teacher()?, None),
        Decoder::Student | Decoder::StudentGraph => {
            let s = args.model.student()?;
            (s.model, Some((s.converted, s.store)))
        }
    };
    let weights = weight_bytes(&model, _student.as_ref().map(|(_, store)| store));
    let traffic = Traffic {
        bandwidth,
        weights,
        rewritten: decoder != Decoder::Teacher,
    };
    let baseline = probe.start()?;

    let headroom = probe.headroom(baseline)?;

    let started = Instant::now();
    let host = tch::no_grad(|| prefill(&model, context, args.prefill_chunk))?;
    let prefill_s = started.elapsed().as_secs_f64();

    // The sweep reaches the largest batch whose states fit beside the model.
    let host_bytes = model.cache_bytes(&host)?;
    let state_per_seq = match traffic.rewritten {
        true => host_bytes,
        // A KV cache grows by the decoded tokens.
        false => host_bytes * (context + WARMUP_STEPS + args.tokens) as u64 / context as u64,
    };
    let bound = memory_bound_batch(headroom, state_per_seq + step_bytes_per_seq(model.config()));
    let max_batch = match args.max_batch {
        Some(max) => max,
        None if device.is_cuda() => bound,
        None => bound.min(CPU_MAX_BATCH),
    };
    tracing::info!(
        headroom_gib = headroom as f64 / GIB,
        state_per_seq_mib = state_per_seq as f64 / MIB,
        bound,
        max_batch,
        "batches up to what memory allows"
    );

    let mut batches = Vec::new();
    let mut try_batch = |batch: i64| -> Result<bool> {
        let run = Run {
            batch,
            tokens: args.tokens,
            graph: decoder == Decoder::StudentGraph,
            // The check decodes from the same position as the timed run, on a copy: it may not
            // step past the model's positions either.
            check_steps: if batch == 1 {
                args.graph_check_steps
                    .min(model.config().max_position_embeddings - context - WARMUP_STEPS)
                    .max(0)
            } else {
                0
            },
        };
        let row = match decode(&model, &host, &run, &probe, baseline, &traffic) {
            Ok(row) => row,
            Err(e) if is_out_of_memory(&e) => {
                json!({"batch": batch, "status": "oom", "note": "out of memory"})
            }
            Err(e) => return Err(e),
        };
        let fits = row["status"] == "ok";
        tracing::info!(batch, %row, "decoded");
        batches.push(row);
        Ok(fits)
    };
    let (mut fits, mut fails) = (0, None);
    for batch in batch_ladder(max_batch) {
        if !try_batch(batch)? {
            fails = Some(batch);
            break;
        }
        fits = batch;
    }
    if let Some(mut high) = fails {
        for _ in 0..args.refine {
            let mid = (fits + high) / 2;
            if mid <= fits {
                break;
            }
            if try_batch(mid)? {
                fits = mid;
            } else {
                high = mid;
            }
        }
    }
    println!(
        "{}",
        json!({
            "prefill_tokens_per_s": context as f64 / prefill_s,
            "copy_bandwidth_bytes_per_s": bandwidth,
            "weight_bytes": weights,
            "memory_bound_batch": bound,
            "headroom_bytes": headroom,
            "batches": batches,
        })
    );
    Ok(())
}

/// The default largest batch on the CPU, where large batches only take long.
const CPU_MAX_BATCH: i64 = 8;

/// Bytes one sequence's decoding step takes beside its state: the f32 logits twice (the logits
/// and what reads them) and four f32 rows of the MLP's width. Steps update their states in
/// place, so nothing else grows with the batch.
fn step_bytes_per_seq(config: &ModelConfig) -> u64 {
    4 * (2 * config.vocab_size + 4 * config.intermediate_size) as u64
}

/// The largest batch whose decoding fits in 90% of `headroom` bytes (the rest left to the
/// allocator's fragmentation), each sequence taking `per_seq` bytes; at least 1.
fn memory_bound_batch(headroom: u64, per_seq: u64) -> i64 {
    i64::try_from(headroom / 10 * 9 / per_seq.max(1))
        .unwrap_or(i64::MAX)
        .max(1)
}

/// The batches tried up to `max`: doubling from 1, then `max` itself.
fn batch_ladder(max: i64) -> Vec<i64> {
    let mut batches: Vec<i64> = std::iter::successors(Some(1i64), |b| b.checked_mul(2))
        .take_while(|&b| b < max)
        .collect();
    batches.push(max);
    batches
}

/// One random sequence prefilled to `context` tokens in blocks; its state copied to the host.
fn prefill(model: &Model, context: i64, chunk: i64) -> Result<ModelCache> {
    let device = model.device();
    let mut cache = model.new_cache(1)?;
    let ids = random_ids(model.config(), 1, context, device);
    let mut start = 0;
    while start < context {
        let len = chunk.min(context - start);
        let _ = model.hidden_states(&ids.narrow(1, start, len), Some(&mut cache))?;
        start += len;
    }
    synchronize(device);
    model.fork_cache(&cache, 1, 0, Device::Cpu)
}

/// What a decoding step of one model must move, and how fast the device moves it.
struct Traffic {
    /// Copy bandwidth, bytes read plus written per second.
    bandwidth: f64,
    weights: u64,
    /// The state is rewritten every step (a recurrent student), not only read (a KV cache).
    rewritten: bool,
}

/// One batch size's decoding run.
struct Run {
    batch: i64,
    /// Timed steps.
    tokens: i64,
    /// Replays of a captured CUDA graph instead of eager steps.
    graph: bool,
    /// Graph runs: steps compared with eager decoding first (0: none).
    check_steps: i64,
}

/// Greedy decoding of `run.tokens` steps (after untimed ones) for `run.batch` copies of the
/// prefilled sequence; an out-of-memory failure (a libtorch panic) comes back as an error.
fn decode(
    model: &Model,
    host: &ModelCache,
    run: &Run,
    probe: &MemoryProbe,
    baseline: u64,
    traffic: &Traffic,
) -> Result<Value> {
    let device = model.device();
    let batch = run.batch;
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<Value> {
        tch::no_grad(|| {
            let reserve = WARMUP_STEPS + run.check_steps + run.tokens;
            let mut cache = model.fork_cache(host, batch, reserve, device)?;
            let state_bytes = model.cache_bytes(&cache)?;
            let mut next = random_ids(model.config(), batch, 1, device);
            for _ in 0..WARMUP_STEPS {
                eager_step(model, &mut cache, &mut next)?;
            }
            let mut check = Value::Null;
            if run.graph && run.check_steps > 0 {
                check = json!(graph_logit_diff(model, &cache, &next, run.check_steps)?);
            }
            let mut step: Box<dyn FnMut() -> Result<()>> = if run.graph {
                let mut graph = GraphDecoder::new(model, cache, &next)?;
                Box::new(move || graph.step())
            } else {
                Box::new(move || eager_step(model, &mut cache, &mut next))
            };
            synchronize(device);
            let started = Instant::now();
            for _ in 0..run.tokens {
                step()?;
            }
            synchronize(device);
            let seconds = started.elapsed().as_secs_f64();
            let tokens_per_s = (batch * run.tokens) as f64 / seconds;
            let bytes_per_step = traffic.weights + state_traffic(state_bytes, traffic.rewritten);
            let roofline = roofline_tokens_per_s(batch, bytes_per_step, traffic.bandwidth);
            Ok(json!({
                "batch": batch,
                "status": "ok",
                "tokens_per_s": tokens_per_s,
                "bytes_per_step": bytes_per_step,
                "roofline_tokens_per_s": roofline,
                "roofline_fraction": tokens_per_s / roofline,
                "ms_per_step": seconds * 1e3 / run.tokens as f64,
                "state_bytes_per_seq": state_bytes as f64 / batch as f64,
                "peak_bytes": probe.peak_since(baseline)?,
                "graph_max_logit_diff": check,
            }))
        })
    }));
    std::panic::set_hook(quiet);
    match outcome {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(anyhow::anyhow!("{message}"))
        }
    }
}

/// One eager greedy step: `next` (b, 1) goes through the model and is replaced by its picks.
fn eager_step(model: &Model, cache: &mut ModelCache, next: &mut Tensor) -> Result<()> {
    let logits = model.forward(next, Some(cache))?; // (b, 1, V)
    *next = logits.argmax(-1, false).to_kind(Kind::Int64);
    Ok(())
}

/// The largest difference between the logits of `steps` greedy steps decoded eagerly and by
/// graph replays, each from a copy of `cache` starting at `next`; both follow the eager picks,
/// so one differing pick does not send the two runs apart.
fn graph_logit_diff(model: &Model, cache: &ModelCache, next: &Tensor, steps: i64) -> Result<f64> {
    let device = model.device();
    let mut eager_cache = model.fork_cache(cache, 1, steps, device)?;
    let mut ids = next.copy();
    let mut eager = Vec::with_capacity(steps as usize);
    for _ in 0..steps {
        let logits = model.forward(&ids, Some(&mut eager_cache))?; // (b, 1, V)
        eager.push((ids.copy(), logits.copy()));
        ids = logits.argmax(-1, false).to_kind(Kind::Int64);
    }
    drop(eager_cache);
    let mut graph = GraphDecoder::new(model, model.fork_cache(cache, 1, steps, device)?, next)?;
    let mut worst = 0f64;
    for (input, logits) in &eager {
        graph.step_with(input)?;
        let diff = (graph.logits() - logits).abs().max().double_value(&[]);
        worst = worst.max(diff);
    }
    let position = graph.position().int64_value(&[]);
    ensure!(
        position == graph.seen(),
        "after {steps} replays the graph's position is {position}, the host count {}",
        graph.seen()
    );
    Ok(worst)
}

fn is_out_of_memory(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("out of memory") || text.contains("CUDA error: out of memory")
}

fn table(results: &[Value]) -> String {
    let mut table = MarkdownTable::new().left("model");
    for name in [
        "context",
        "batch",
        "tokens/s",
        "ms/step",
        "roofline tok/s",
        "of roofline",
        "state MiB/seq",
        "peak GiB",
        "graph vs eager max logit diff",
    ] {
        table = table.right(name);
    }
    let mut table = table.left("note");
    for r in results {
        table.row([
            r["model"].as_str().unwrap_or("").to_string(),
            r["context"].to_string(),
            r["batch"].to_string(),
            cell(&r["tokens_per_s"], 1.0, 1),
            cell(&r["ms_per_step"], 1.0, 1),
            cell(&r["roofline_tokens_per_s"], 1.0, 1),
            percent(&r["roofline_fraction"]),
            cell(&r["state_bytes_per_seq"], MIB, 1),
            cell(&r["peak_bytes"], GIB, 2),
            r["graph_max_logit_diff"]
                .as_f64()
                .map_or(String::new(), |d| format!("{d:.2e}")),
            r["note"].as_str().unwrap_or("").to_string(),
        ]);
    }
    table.to_string()
}

fn best_table(best: &[Value]) -> String {
    let mut table = MarkdownTable::new();
    for name in [
        "context",
        "teacher tok/s (b=1)",
        "student tok/s (b=1)",
        "teacher best tok/s (batch)",
        "student best tok/s (batch)",
        "student / teacher",
        "student graph tok/s (b=1)",
        "student graph best tok/s (batch)",
        "of roofline: teacher b=1 / best",
        "student b=1 / best",
        "student graph b=1 / best",
    ] {
        table = table.right(name);
    }
    for b in best {
        table.row([
            b["context"].to_string(),
            cell(&b["teacher_batch1_tokens_per_s"], 1.0, 1),
            cell(&b["student_batch1_tokens_per_s"], 1.0, 1),
            with_batch(&b["teacher_best_tokens_per_s"], &b["teacher_best_batch"], 0),
            with_batch(&b["student_best_tokens_per_s"], &b["student_best_batch"], 0),
            cell(&b["student_over_teacher"], 1.0, 1),
            cell(&b["student_graph_batch1_tokens_per_s"], 1.0, 1),
            with_batch(
                &b["student_graph_best_tokens_per_s"],
                &b["student_graph_best_batch"],
                0,
            ),
            both(
                &b["teacher_batch1_roofline_fraction"],
                &b["teacher_best_roofline_fraction"],
            ),
            both(
                &b["student_batch1_roofline_fraction"],
                &b["student_best_roofline_fraction"],
            ),
            both(
                &b["student_graph_batch1_roofline_fraction"],
                &b["student_graph_best_roofline_fraction"],
            ),
        ]);
    }
    table.to_string()
}

/// A fraction as a percentage, "–" when not measured.
fn percent(fraction: &Value) -> String {
    fraction
        .as_f64()
        .map_or_else(|| "–".to_string(), |f| format!("{:.0}%", f * 100.0))
}

/// Batch 1's and the best batch's fractions, "47% / 18%".
fn both(batch1: &Value, best: &Value) -> String {
    format!("{} / {}", percent(batch1), percent(best))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_bound_divides_nine_tenths_of_the_headroom_by_the_bytes_per_sequence() {
        // The 8B student: 112 MiB states beside 16.1 GB of weights on an 80 GiB H100
        // leave room for about 500 sequences, where the old sweep stopped at 256.
        let gib = 1u64 << 30;
        let per_seq = 112 * (1 << 20);
        assert_eq!(memory_bound_batch(64 * gib, per_seq), 526);
        assert_eq!(memory_bound_batch(gib, 2 * gib), 1, "at least one sequence");
        assert_eq!(memory_bound_batch(10 * gib, gib), 9);
    }

    #[test]
    fn the_ladder_doubles_up_to_the_bound_and_ends_on_it() {
        assert_eq!(batch_ladder(1), vec![1]);
        assert_eq!(batch_ladder(8), vec![1, 2, 4, 8]);
        assert_eq!(
            batch_ladder(526),
            vec![1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 526]
        );
    }
}
