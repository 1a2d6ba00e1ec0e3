//! `linearize --recipe FILE`: runs the stages a recipe lists into its run directory (layout in
//! docs/clusters.md), resuming whatever an earlier attempt left.
//!
//! Resumption works stage by stage: a finished stage leaves its trained tensors in
//! `stages/<stage>.safetensors` and is not run again; the stage in progress continues from the
//! newest valid state in `state/` (a damaged one is skipped for the one before it).
//!
//! Under a data-parallel launch (`linearize launch`, torchrun, `srun`; see docs/clusters.md) every
//! rank runs this same job: rank 0 prepares the run directory and alone writes states, metrics,
//! stage outputs, the report and exports; the others train their share of each batch, resume
//! from the state rank 0 picked (the run directory must be on a filesystem every node sees), and
//! end after the last training stage.
mod evaluate;
mod plan;
mod run_dir;
mod select;
mod stage_output;
mod teacher_data;

use crate::recipe::{resolve_data_paths, ExportSection, LoadedRecipe, PlannedRecipe};
use crate::runtime::{job_device, parse_dtype};
use anyhow::{ensure, Context, Result};
use linearize_dist::{Launch, Options, ProcessGroup};
use linearize_models::llama::Model;
use linearize_train::convert::{convert, ConvertedLayers};
use linearize_train::data::{build_datasets, Batcher, Budget, Datasets, ModelEncoder};
use linearize_train::export::{
    export_adapters, export_model, export_peft, ExportInfo, ExportOptions,
};
use linearize_train::lora::LoraAdapters;
use linearize_train::metrics::MetricsWriter;
use linearize_train::stage::{StageData, StageJob, StageShape};
use linearize_train::stage1::{run_stage1, Stage1Config, Stage1Summary};
use linearize_train::stage2::{run_stage2, Stage2Summary};
use linearize_train::state::{
    latest_fitting_state, latest_valid_state, load_state_dir, states_dir, LoadedState, Preempted,
    Preemption, EXIT_PREEMPTED,
};
use stage_output::{StageOutput, StageRecord};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

pub use run_dir::RESOLVED_RECIPE;

/// The options of a recipe run.
#[derive(clap::Args, Debug, Clone)]
pub struct JobArgs {
    /// The recipe to run (YAML; see docs/recipes.md).
    #[arg(long, value_name = "FILE")]
    pub recipe: Option<PathBuf>,
    /// Override a recipe value: `--set attention_transfer.max_steps=50` (the value is YAML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the resolved plan (model, layers and methods, trainable parameters, token
    /// budget, estimated memory, output paths) and exit. Fetches no weights (a hub model's
    /// config.json and tokenizer only) and needs no GPU: it plans for the recipe's device, and
    /// lists what it could not check on this machine.
    #[arg(long)]
    pub dry_run: bool,
    /// Run directory (default: `<output>/<name>` of the recipe).
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// Start over even if the run directory holds an earlier attempt (which is kept, renamed).
    #[arg(long)]
    pub restart: bool,
    /// Set by `linearize resume`: the recipe is the run directory's resolved one.
    #[arg(skip)]
    pub resumed: bool,
}

/// Runs the job; a preempted job (SIGTERM/SIGINT) saves a state and exits with
/// [`EXIT_PREEMPTED`].
pub fn run(recipe: &Path, args: &JobArgs) -> Result<()> {
    if args.dry_run {
        let planned = PlannedRecipe::load(recipe, &args.sets)?;
        let run_dir = args
            .output
            .clone()
            .unwrap_or_else(|| planned.recipe.output.join(&planned.recipe.name));
        print!("{}", plan::describe(&planned, &run_dir)?);
        return Ok(());
    }
    let loaded = LoadedRecipe::load(recipe, &args.sets, args.resumed)?;
    let run_dir = args
        .output
        .clone()
        .unwrap_or_else(|| loaded.recipe.output.join(&loaded.recipe.name));
    let launch = Launch::from_env().context("reading the launch environment")?;
    let device = job_device(&loaded.recipe.model.device, &launch)
        .with_context(|| format!("rank {}: model.device", launch.rank))?;
    let group = ProcessGroup::init(&launch, device, &Options::from_env(&loaded.hash)?)?;
    // Rank 0, the one writer of the run directory, holds it locked until the process ends.
    let mut held_lock = None;
    let result = (|| {
        if group.is_main() {
            let lock = held_lock.insert(run_dir::RunLock::acquire(&run_dir)?);
            let start = run_dir::prepare(&run_dir, &loaded, args.restart, lock)?;
            lock.clean_partial_files()?;
            crate::logging::open_run_log(&run_dir)?;
            tracing::info!(run = %run_dir.display(), ?start, hash = %loaded.hash, "job");
        }
        group.barrier("waiting for rank 0 to prepare the run directory")?;
        let preemption = Preemption::install()?;
        execute(&loaded, &run_dir, device, &preemption, &group)
    })();
    let rank = |e: anyhow::Error| {
        if group.is_distributed() && !format!("{e}").starts_with("rank ") {
            e.context(format!("rank {} of {}", group.rank(), group.world_size()))
        } else {
            e
        }
    };
    match result {
        Err(e) if e.downcast_ref::<Preempted>().is_some() => {
            // Every rank stopped at the same step and rank 0 saved the state before the ranks
            // passed the barrier that ended the stage.
            group.close();
            if group.is_main() {
                eprintln!(
                    "{e:#}; state saved in {}: `linearize resume {}` continues it",
                    run_dir.display(),
                    run_dir.display()
                );
            }
            std::process::exit(EXIT_PREEMPTED);
        }
        Err(e) => {
            group.abort(&format!("{e:#}"));
            Err(rank(e))
        }
        Ok(()) => Ok(()),
    }
}

/// `linearize resume RUN_DIR`: the job of the run's own resolved recipe, in that directory.
pub fn resume(run_dir: &Path, restart: bool) -> Result<()> {
    let recipe = run_dir.join(RESOLVED_RECIPE);
    anyhow::ensure!(
        recipe.is_file(),
        "{}: not a run directory (no {RESOLVED_RECIPE})",
        run_dir.display()
    );
    let args = JobArgs {
        recipe: Some(recipe.clone()),
        sets: Vec::new(),
        dry_run: false,
        output: Some(run_dir.to_path_buf()),
        restart,
        resumed: true,
    };
    run(&recipe, &args)
}

fn execute(
    loaded: &LoadedRecipe,
    run_dir: &Path,
    device: Device,
    preemption: &Preemption,
    group: &ProcessGroup,
) -> Result<()> {
    let recipe = &loaded.recipe;
    let kind = parse_dtype(&recipe.model.dtype)?;
    let mut model: Model = loaded.load_model(device, kind)?;
    let encoder = ModelEncoder::new(&loaded.model_dir, recipe.data.template.as_ref())?;
    tracing::info!(
        format = %encoder.tokenizer().describe_prompt_format(),
        "instructions and conversations render in this prompt format"
    );
    let data = resolve_data_paths(&recipe.data, run_dir)?;
    let datasets = build_datasets(&data, &encoder).context("data");
    let mut datasets = end_phase(datasets, preemption, group)?;
    // Both need the original model: they run before any layer is converted.
    let teacher = (|| -> Result<()> {
        teacher_data::add_teacher_samples(
            &model,
            encoder.tokenizer(),
            &recipe.data,
            &loaded.model_dir,
            run_dir,
            &mut datasets,
        )?;
        if let Some(stage) = &recipe.lora {
            teacher_data::write_teacher_val(
                &model,
                datasets.val.as_ref(),
                stage.eval_batch_size,
                stage.max_eval_batches,
                run_dir,
            )
            .context("the teacher's validation loss")?;
        }
        Ok(())
    })();
    end_phase(teacher, preemption, group)?;
    tracing::info!(
        train_sequences = datasets.train.len(),
        val_sequences = datasets.val.as_ref().map_or(0, |v| v.len()),
        seq_len = recipe.data.seq_len,
        "data ready"
    );
    // Retrieval heads are scored on the teacher, before any layer is converted.
    let retrieval = select::retrieval_scores(
        &mut model,
        encoder.tokenizer(),
        &recipe.conversion,
        recipe.seed,
        run_dir,
        group,
    )?;
    stop_if_preempted(preemption, group)?;
    // The student's initial values come from the recipe's seed; a resumed job overwrites them.
    tch::manual_seed(recipe.seed as i64);
    let student = nn::VarStore::new(device);
    let mut converted = convert(&mut model, &recipe.conversion, &student)?;
    select::heads_by_retrieval(
        &mut model,
        &mut converted,
        &recipe.conversion,
        retrieval,
        run_dir,
        group,
    )?;
    let mut metrics = if group.is_main() {
        let mut metrics = open_metrics(run_dir, loaded)?;
        metrics.set_sinks(tracking_sinks(run_dir, loaded)?);
        metrics
    } else {
        MetricsWriter::disabled()
    };
    let mut tokens = Vec::new();
    let mut run_steps = 0;

    if let Some(stage) = &recipe.attention_transfer {
        let output = StageOutput::new(run_dir, &stage.name);
        let (record, summary) = match output.finished()? {
            Some(record) => {
                output.load_into(converted.named_parameters())?;
                tracing::info!(stage = %stage.name, "already complete: trained tensors loaded");
                (record, None)
            }
            None => {
                let fit = Fit {
                    stage: &stage.name,
                    params: converted.named_parameters(),
                    run_step_offset: run_steps,
                    max_steps: stage.max_steps,
                };
                let resume = resume_state(run_dir, &fit, group)?;
                continue_metrics(&mut metrics, run_dir, resume.as_ref(), group)?;
                let job = StageJob {
                    run_dir,
                    metrics: &mut metrics,
                    recipe_hash: &loaded.hash,
                    seed: recipe.seed,
                    run_step_offset: run_steps,
                    resume: resume.as_ref(),
                    preemption: Some(preemption),
                    group: Some(group),
                };
                let data = stage_data(&datasets, loaded, stage.shape(&recipe.data))?;
                let summary = run_stage1(&mut model, &converted, data, stage, job)?;
                let record = StageRecord {
                    steps: summary.steps,
                    tokens: summary.tokens,
                };
                if group.is_main() {
                    output.save(&converted.named_parameters(), record)?;
                    print_stage1(&summary);
                }
                (record, Some(summary))
            }
        };
        run_steps += record.steps;
        tokens.push((stage.name.clone(), record.tokens));
        select::after_stage1(
            &mut model,
            &mut converted,
            &recipe.conversion,
            || final_errors(run_dir, stage, summary.as_ref()),
            datasets.val.as_ref(),
            stage.eval_batch_size,
            run_dir,
            group,
        )?;
    }

    stop_if_preempted(preemption, group)?;
    let lora = match &recipe.lora {
        None => None,
        Some(stage) => {
            let adapters = LoraAdapters::install(&mut model, &stage.lora, recipe.seed)?;
            let output = StageOutput::new(run_dir, &stage.name);
            let trained = |adapters: &LoraAdapters| {
                let mut params = adapters.named_parameters();
                if stage.train_attention {
                    params.extend(converted.named_parameters());
                }
                params
            };
            let record = match output.finished()? {
                Some(record) => {
                    output.load_into(trained(&adapters))?;
                    tracing::info!(stage = %stage.name, "already complete: trained tensors loaded");
                    record
                }
                None => {
                    let fit = Fit {
                        stage: &stage.name,
                        params: trained(&adapters),
                        run_step_offset: run_steps,
                        max_steps: stage.max_steps,
                    };
                    let resume = resume_state(run_dir, &fit, group)?;
                    continue_metrics(&mut metrics, run_dir, resume.as_ref(), group)?;
                    let job = StageJob {
                        run_dir,
                        metrics: &mut metrics,
                        recipe_hash: &loaded.hash,
                        seed: recipe.seed,
                        run_step_offset: run_steps,
                        resume: resume.as_ref(),
                        preemption: Some(preemption),
                        group: Some(group),
                    };
                    let data = stage_data(&datasets, loaded, stage.shape(&recipe.data))?;
                    let summary = run_stage2(&mut model, &converted, &adapters, data, stage, job)?;
                    let record = StageRecord {
                        steps: summary.steps,
                        tokens: summary.tokens,
                    };
                    if group.is_main() {
                        output.save(&trained(&adapters), record)?;
                        print_stage2(&summary);
                    }
                    record
                }
            };
            run_steps += record.steps;
            tokens.push((stage.name.clone(), record.tokens));
            Some(adapters)
        }
    };

    stop_if_preempted(preemption, group)?;
    // Training is over: the ranks part. Rank 0 alone evaluates and exports; the stage outputs it
    // wrote hold everything the others trained.
    group.barrier("the end of training")?;
    group.close();
    if !group.is_main() {
        tracing::info!(
            rank = group.rank(),
            "training done; rank 0 writes the report and exports"
        );
        return Ok(());
    }
    let table = match &recipe.eval {
        Some(eval) => evaluate::evaluate(
            eval,
            &mut model,
            Some(&converted),
            encoder.tokenizer(),
            loaded,
            run_dir,
        )?,
        None => None,
    };
    stop_after_training(preemption)?;
    if let Some(export) = &recipe.export {
        let info = ExportInfo {
            base_model: recipe.model.source.clone(),
            base_revision: None,
            base_dir: loaded.model_dir.clone(),
            recipe_hash: loaded.hash.clone(),
            data: describe_data(&recipe.data),
            tokens,
            eval: table,
        };
        write_exports(
            export,
            run_dir,
            &model,
            &converted,
            lora.as_ref(),
            &info,
            preemption,
        )?;
    }
    metrics.finish();
    tracing::info!(run_steps, "job finished");
    println!("{}", converted.table());
    println!("run directory: {}", run_dir.display());
    Ok(())
}

/// Between stages a signal stops the job at once: every finished stage is already saved. All
/// ranks agree (a signal may have reached only some of them).
fn stop_if_preempted(preemption: &Preemption, group: &ProcessGroup) -> Result<()> {
    let local = preemption.requested();
    match group.any(local.is_some())? {
        true => Err(Preempted {
            signal: local.unwrap_or(libc::SIGTERM),
        }
        .into()),
        false => Ok(()),
    }
}

/// Ends a phase that polls the stop flag (data preparation, teacher sampling) alike on every
/// rank. A rank that a signal stopped inside the phase still meets the others at the agreement,
/// so that every rank exits 75 there, rather than the others failing on a rank that left; the
/// others finish the phase first (they got no signal), then stop with it.
fn end_phase<T>(result: Result<T>, preemption: &Preemption, group: &ProcessGroup) -> Result<T> {
    if result
        .as_ref()
        .is_err_and(|e| e.downcast_ref::<Preempted>().is_some())
    {
        group.any(true)?;
        return result;
    }
    let value = result?;
    stop_if_preempted(preemption, group)?;
    Ok(value)
}

/// After training, rank 0 alone works on (the ranks have parted): a signal stops the job after
/// evaluation and after each export (inside them, their own polling stops it), and a resumed job
/// writes them again (every trained tensor is saved).
fn stop_after_training(preemption: &Preemption) -> Result<()> {
    match preemption.requested() {
        Some(signal) => Err(Preempted { signal }.into()),
        None => Ok(()),
    }
}

/// What a state of a stage must hold to resume it.
struct Fit<'a> {
    stage: &'a str,
    /// The tensors the stage trains, by name.
    params: Vec<(String, Tensor)>,
    /// Updates of the stages before it.
    run_step_offset: u64,
    max_steps: Option<u64>,
}

impl Fit<'_> {
    /// Fails for a state of this stage with other tensors or shapes, or a step it cannot have
    /// reached; states of other stages pass (they are not resumed from, see [`resume_state`]).
    fn check(&self, loaded: &LoadedState) -> Result<()> {
        let state = &loaded.state;
        if state.stage != self.stage {
            return Ok(());
        }
        anyhow::ensure!(
            state.run_step == self.run_step_offset + state.step,
            "run step {} does not follow {} updates of earlier stages plus {} of this one",
            state.run_step,
            self.run_step_offset,
            state.step
        );
        if let Some(max) = self.max_steps {
            anyhow::ensure!(
                state.step <= max,
                "step {} is past the stage's max_steps = {max}",
                state.step
            );
        }
        let shapes = |named: &[(String, Tensor)]| -> BTreeMap<String, Vec<i64>> {
            named.iter().map(|(n, t)| (n.clone(), t.size())).collect()
        };
        let (want, saved) = (shapes(&self.params), shapes(&loaded.tensors.params));
        for (name, shape) in &want {
            match saved.get(name) {
                None => anyhow::bail!("no tensor {name} in its parameters"),
                Some(s) if s != shape => {
                    anyhow::bail!("tensor {name} has shape {s:?}, the stage trains {shape:?}")
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = saved.keys().find(|n| !want.contains_key(*n)) {
            anyhow::bail!("tensor {extra} in its parameters is not trained by the stage");
        }
        Ok(())
    }
}

/// The state a stage resumes from: the newest one that verifies and fits it, as rank 0 finds it
/// (rank 0 alone scans, which may also clean up leftovers of interrupted saves); the other ranks
/// load the very same directory.
fn resume_state(run_dir: &Path, fit: &Fit, group: &ProcessGroup) -> Result<Option<LoadedState>> {
    let found = if group.is_main() {
        latest_fitting_state(run_dir, &|s| fit.check(s))?.filter(|s| s.state.stage == fit.stage)
    } else {
        None
    };
    if !group.is_distributed() {
        return Ok(found);
    }
    let name = found
        .as_ref()
        .and_then(|s| s.dir.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = String::from_utf8(group.broadcast_bytes(name.as_bytes())?)
        .context("the state directory name from rank 0")?;
    if group.is_main() || name.is_empty() {
        return Ok(found);
    }
    let dir = states_dir(run_dir).join(&name);
    load_state_dir(&dir).map(Some).with_context(|| {
        format!(
            "rank {}: loading the state rank 0 resumes from; the run directory must be on a \
             filesystem that every node sees",
            group.rank()
        )
    })
}

/// Drops the metrics written after the state a stage resumes from: the newest state overall,
/// which [`open_metrics`] continued after, may have been skipped as unfit for the stage.
fn continue_metrics(
    metrics: &mut MetricsWriter,
    run_dir: &Path,
    resume: Option<&LoadedState>,
    group: &ProcessGroup,
) -> Result<()> {
    if let (Some(state), true) = (resume, group.is_main()) {
        let sinks = metrics.take_sinks();
        *metrics = MetricsWriter::resume(
            &run_dir.join("metrics.jsonl"),
            &state.state.stage,
            state.state.step,
        )?;
        metrics.set_sinks(sinks);
    }
    Ok(())
}

/// `adapters.safetensors`, the merged `model/` and `peft/`.
fn write_exports(
    export: &ExportSection,
    run_dir: &Path,
    model: &Model,
    converted: &ConvertedLayers,
    lora: Option<&LoraAdapters>,
    info: &ExportInfo,
    preemption: &Preemption,
) -> Result<()> {
    if export.adapters {
        let path = run_dir.join("adapters.safetensors");
        export_adapters(&path, model, converted, lora, info)?;
        println!("trained tensors: {}", path.display());
        stop_after_training(preemption)?;
    }
    let options = ExportOptions {
        dtype: parse_dtype(&export.dtype)?,
        max_shard_bytes: export.max_shard_bytes,
    };
    if export.merged {
        let dir = run_dir.join("model");
        export_model(&dir, model, converted, lora, info, &options)?;
        println!("merged model: {}", dir.display());
        stop_after_training(preemption)?;
    }
    if let Some(lora) = lora.filter(|_| export.peft) {
        let dir = run_dir.join("peft");
        export_peft(&dir, model, converted, lora, info, &options)?;
        println!("PEFT adapters and their base: {}", dir.display());
    }
    // A signal during the last export stops the job too: SIGTERM always ends in exit 75, and the
    // resumed job writes the same files again.
    stop_after_training(preemption)
}

fn describe_data(data: &linearize_train::data::DataConfig) -> String {
    let sources: Vec<String> = data
        .sources
        .iter()
        .map(|s| format!("{} {}", s.kind.name(), s.describe()))
        .collect();
    format!(
        "{} (sequences of {} tokens)",
        if sources.is_empty() {
            "samples from the teacher".to_string()
        } else {
            sources.join(", ")
        },
        data.seq_len
    )
}

/// A stage's data: the recipe's training sequences served from the start (a resumed stage seeks
/// them to its saved cursor), and its validation sequences.
/// A stage's training batches: the packed sequences, re-cut when the stage has its own sequence
/// length (a long-context stage; recipe validation refuses it with teacher samples, which are
/// not one stream), in batches of the stage's size.
fn stage_data(datasets: &Datasets, loaded: &LoadedRecipe, shape: StageShape) -> Result<StageData> {
    let data = &loaded.recipe.data;
    let sequences = if shape.seq_len == datasets.train.seq_len() {
        datasets.train.clone()
    } else {
        let sequences = datasets.train.repacked(shape.seq_len)?;
        ensure!(
            !sequences.is_empty(),
            "the training text does not fill one sequence of {} tokens",
            shape.seq_len
        );
        tracing::info!(
            seq_len = shape.seq_len,
            sequences = sequences.len(),
            "training sequences re-cut for this stage"
        );
        sequences
    };
    let train = Batcher::new(sequences, shape.batch_size, data.seed)?
        .with_shuffle(data.shuffle)
        .with_budget(Budget {
            max_tokens: data.max_tokens,
            max_steps: None,
            max_epochs: data.max_epochs,
        });
    Ok(StageData {
        train,
        seq_len: shape.seq_len,
        val: datasets.val.clone(),
    })
}

/// The metrics file, continued after the newest valid state (records written after it are
/// dropped) or after the last finished stage, or started fresh.
fn open_metrics(run_dir: &Path, loaded: &LoadedRecipe) -> Result<MetricsWriter> {
    let path = run_dir.join("metrics.jsonl");
    if let Some(state) = latest_valid_state(run_dir)? {
        return MetricsWriter::resume(&path, &state.state.stage, state.state.step);
    }
    let recipe = &loaded.recipe;
    let stages = [
        recipe.lora.as_ref().map(|s| s.name.as_str()),
        recipe.attention_transfer.as_ref().map(|s| s.name.as_str()),
    ];
    for stage in stages.into_iter().flatten() {
        if StageOutput::new(run_dir, stage).finished()?.is_some() {
            return MetricsWriter::resume(&path, stage, u64::MAX);
        }
    }
    MetricsWriter::create(&path)
}

/// The tracking sinks of the recipe (TensorBoard, MLflow), with the resolved recipe as the run's
/// hyperparameters.
fn tracking_sinks(
    run_dir: &Path,
    loaded: &LoadedRecipe,
) -> Result<Vec<Box<dyn linearize_train::tracking::MetricSink>>> {
    let recipe = &loaded.recipe;
    let params = linearize_train::tracking::flatten_params(
        &serde_json::to_value(recipe).context("serialising the recipe")?,
    );
    Ok(recipe
        .tracking
        .open_sinks(run_dir, &recipe.name, &loaded.resolved, &params))
}

/// The final validation MSE per layer of stage 1, from this run or from its metrics file.
fn final_errors(
    run_dir: &Path,
    stage: &Stage1Config,
    summary: Option<&Stage1Summary>,
) -> Result<Vec<(usize, f64)>> {
    if let Some(val) = summary.and_then(|s| s.final_val.as_ref()) {
        return Ok(val.per_layer.clone());
    }
    let records = linearize_train::metrics::read_metrics(&run_dir.join("metrics.jsonl"))?;
    let last = records
        .iter()
        .rev()
        .find(|r| r.stage == stage.name && r.split == linearize_train::metrics::Split::Val)
        .context("softmax_by_error needs stage 1's validation errors: none in metrics.jsonl")?;
    let mut errors = Vec::new();
    for (key, value) in &last.values {
        if let Some(layer) = key.strip_prefix("attn_mse/layer_") {
            errors.push((layer.parse()?, *value));
        }
    }
    Ok(errors)
}

fn print_stage1(summary: &Stage1Summary) {
    let (Some(first), Some(last)) = (&summary.initial_val, &summary.final_val) else {
        return;
    };
    println!(
        "attention transfer: {} updates, {} tokens",
        summary.steps, summary.tokens
    );
    println!(
        "layer  val MSE step 0  val MSE step {:<5} factor",
        last.step
    );
    for ((layer, before), (_, after)) in first.per_layer.iter().zip(&last.per_layer) {
        println!(
            "{layer:>5}  {before:>14.4e}  {after:>16.4e}  {:>6.1}x",
            before / after
        );
    }
    println!(
        " mean  {:>14.4e}  {:>16.4e}  {:>6.1}x",
        first.attn_mse,
        last.attn_mse,
        first.attn_mse / last.attn_mse
    );
    if let (Some(before), Some(after)) = (first.kl, last.kl) {
        println!(
            "validation KL(teacher || student) per token {before:.4} (step {}) -> {after:.4} (step {})",
            first.step, last.step
        );
    }
}

fn print_stage2(summary: &Stage2Summary) {
    println!("LoRA: {} updates, {} tokens", summary.steps, summary.tokens);
    if let (Some(first), Some(last)) = (&summary.initial_val, &summary.final_val) {
        println!(
            "validation perplexity {:.3} (step {}) -> {:.3} (step {})",
            first.ppl, first.step, last.ppl, last.step
        );
    }
}
