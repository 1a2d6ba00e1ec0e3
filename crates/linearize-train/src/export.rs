//! The results of a run as files people can use (docs/recipes.md, `export`):
//!
//! - `adapters.safetensors`: only the trained tensors (feature maps, window factors, LoRA A/B)
//!   in f32, with string metadata: `linearize.layers` (JSON, method and settings per layer),
//!   `linearize.lora` (JSON, when there are adapters), `linearize.model_shape` (JSON),
//!   `linearize.recipe_hash`, `linearize.base_model`, `linearize.base_revision`,
//!   `linearize.tool_version`.
//! - `model/`: the merged model (LoRA folded into the base weights) with the feature maps and
//!   window factors, `config.json` with a `linearize` section, safetensors sharded above
//!   `max_shard_bytes` with an index, the base model's tokenizer files and a `README.md` card.
//!   Its `model_type` is `linearize` (the decoder family in `base_model_type`), with
//!   `architectures: [LinearizeForCausalLM]`, an `auto_map` and the transformers modeling code
//!   beside the weights ([`hf_code`]): `trust_remote_code=True` runs the converted model and a
//!   stock loader refuses it.
//! - `peft/`: the LoRA adapters in PEFT's format on the converted model without them ([`peft`]).
//!
//! [`load_model`] reads `model/`, `peft/base/` and base + `adapters.safetensors` back.
mod card;
pub mod hf_code;
mod load;
pub mod peft;
mod section;
mod shards;
mod tensor_file;

pub use load::{load_model, LoadedModel};
pub use peft::export_peft;
pub use section::{LinearizeSection, ModelShape, SECTION_FORMAT, SECTION_KEY};

use crate::convert::ConvertedLayers;
use crate::lora::LoraAdapters;
use anyhow::{bail, Context, Result};
use linearize_models::atomic::{self, AtomicDir};
use linearize_models::llama::Model;
use linearize_models::markdown_table::MarkdownTable;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};
use tensor_file::HostTensor;

/// The tool version recorded in exports.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Files of the base model directory copied into `model/` when present.
pub const TOKENIZER_FILES: [&str; 9] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Metadata keys of `adapters.safetensors`.
pub const META_LAYERS: &str = "linearize.layers";
pub const META_LORA: &str = "linearize.lora";
pub const META_MODEL_SHAPE: &str = "linearize.model_shape";
pub const META_RECIPE_HASH: &str = "linearize.recipe_hash";
pub const META_BASE_MODEL: &str = "linearize.base_model";
pub const META_BASE_REVISION: &str = "linearize.base_revision";
pub const META_TOOL_VERSION: &str = "linearize.tool_version";

/// Where the model came from and how it was made, for the metadata and the model card.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportInfo {
    /// The base model as the recipe named it (hub id or path).
    pub base_model: String,
    /// Hub revision or other version of the base model, when known.
    pub base_revision: Option<String>,
    /// The base model's directory: its tokenizer files are copied into `model/`.
    pub base_dir: PathBuf,
    pub recipe_hash: String,
    /// The training data, in words.
    pub data: String,
    /// Training tokens per stage, in order.
    pub tokens: Vec<(String, u64)>,
    /// Evaluation results for the card.
    pub eval: Option<EvalTable>,
}

/// A table of evaluation results: one row per model (teacher, converted, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct EvalTable {
    pub columns: Vec<String>,
    pub rows: Vec<EvalRow>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    pub model: String,
    /// One per column; `None` prints as `-`.
    pub values: Vec<Option<f64>>,
}

impl EvalTable {
    /// The table in markdown, as the model card and `evaluate` show it.
    pub fn markdown(&self) -> String {
        let mut table = MarkdownTable::new().left("model");
        for column in &self.columns {
            table = table.left(column);
        }
        for row in &self.rows {
            let cells = row
                .values
                .iter()
                .map(|v| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}")));
            table.row(std::iter::once(row.model.clone()).chain(cells));
        }
        table.to_string()
    }
}

/// How `model/` is written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExportOptions {
    /// dtype of every stored tensor: bf16 (default), f16 or f32.
    pub dtype: Kind,
    /// Shard the weights above this many bytes (default 5 GB, as transformers does).
    pub max_shard_bytes: u64,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            dtype: Kind::BFloat16,
            max_shard_bytes: 5_000_000_000,
        }
    }
}

fn section(
    converted: &ConvertedLayers,
    lora: Option<&LoraAdapters>,
    info: &ExportInfo,
) -> LinearizeSection {
    LinearizeSection {
        format: SECTION_FORMAT,
        tool_version: TOOL_VERSION.to_owned(),
        base_model: info.base_model.clone(),
        base_revision: info.base_revision.clone(),
        recipe_hash: info.recipe_hash.clone(),
        layers: converted.methods(),
        lora: lora.map(|l| l.settings().clone()),
    }
}

/// Writes `adapters.safetensors` to `path` (atomically): the converted layers' parameters and
/// the LoRA tensors in f32, with the metadata described in the module docs. A conversion without
/// parameters or adapters (Liger, untrained) gives a file of metadata only: the methods per
/// layer are what base + adapters needs to rebuild it.
pub fn export_adapters(
    path: &Path,
    model: &Model,
    converted: &ConvertedLayers,
    lora: Option<&LoraAdapters>,
    info: &ExportInfo,
) -> Result<()> {
    let mut named = converted.named_parameters();
    named.extend(lora.map(LoraAdapters::named_parameters).unwrap_or_default());
    let tensors = named
        .iter()
        .map(|(name, t)| Ok((name.clone(), HostTensor::new(name, t, Kind::Float)?)))
        .collect::<Result<Vec<_>>>()?;
    let section = section(converted, lora, info);
    let mut metadata = BTreeMap::from([
        ("format".to_owned(), "pt".to_owned()),
        (
            META_LAYERS.to_owned(),
            serde_json::to_string(&section.layers)?,
        ),
        (
            META_MODEL_SHAPE.to_owned(),
            serde_json::to_string(&ModelShape::of(model.config()))?,
        ),
        (META_RECIPE_HASH.to_owned(), section.recipe_hash),
        (META_BASE_MODEL.to_owned(), section.base_model),
        (META_TOOL_VERSION.to_owned(), section.tool_version),
    ]);
    if let Some(lora) = &section.lora {
        metadata.insert(META_LORA.to_owned(), serde_json::to_string(lora)?);
    }
    if let Some(revision) = section.base_revision {
        metadata.insert(META_BASE_REVISION.to_owned(), revision);
    }
    tensor_file::write(path, &tensors, metadata)
        .with_context(|| format!("exporting adapters to {}", path.display()))
}

/// Writes the merged model to `dir` (replacing it atomically): see the module docs. The
/// in-memory model is not changed: the LoRA deltas are added (in f32) to copies of the weights.
pub fn export_model(
    dir: &Path,
    model: &Model,
    converted: &ConvertedLayers,
    lora: Option<&LoraAdapters>,
    info: &ExportInfo,
    options: &ExportOptions,
) -> Result<()> {
    let dtype_name = match options.dtype {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Float => "float32",
        other => bail!("export dtype {other:?}: expected bf16, f16 or f32"),
    };
    tracing::info!(dir = %dir.display(), "exporting the merged model");
    let out = AtomicDir::new(dir)?;
    let mut entries = Vec::new();
    for (name, weight) in model.named_parameters() {
        let shape = weight.size();
        let delta = name
            .strip_suffix(".weight")
            .and_then(|module| lora.and_then(|l| l.weight_delta(module)));
        let value: Box<dyn Fn() -> Result<Tensor>> = match delta {
            Some(delta) => Box::new(move || {
                Ok(tch::no_grad(|| {
                    weight.to_kind(Kind::Float) + delta.to_device(weight.device())
                }))
            }),
            None => Box::new(move || Ok(weight.shallow_clone())),
        };
        entries.push(shards::Entry { name, shape, value });
    }
    for (name, param) in converted.named_parameters() {
        entries.push(shards::Entry {
            name,
            shape: param.size(),
            value: Box::new(move || Ok(param.shallow_clone())),
        });
    }
    let files = shards::write_shards(out.path(), &entries, options.dtype, options.max_shard_bytes)?;

    let section = section(converted, lora, info);
    let mut cfg = model.config().clone();
    // The model holds the text part of a multimodal checkpoint; so does the export.
    let text_only = cfg.multimodal;
    if text_only {
        tracing::info!(
            "the base model is multimodal: the export is its text model alone (vision tower \
             dropped)"
        );
    }
    cfg.torch_dtype = Some(dtype_name.to_owned());
    cfg.exported = true;
    cfg.set_extra("architectures", hf_code::architectures());
    cfg.set_extra("auto_map", hf_code::auto_map());
    cfg.set_extra(SECTION_KEY, serde_json::to_value(&section)?);
    atomic::write_file(
        &out.path().join("config.json"),
        serde_json::to_string_pretty(&cfg.to_json())?.as_bytes(),
    )?;
    for (file, code) in hf_code::FILES {
        atomic::write_file(&out.path().join(file), code.as_bytes())?;
    }
    for file in TOKENIZER_FILES {
        let src = info.base_dir.join(file);
        if src.is_file() {
            std::fs::copy(&src, out.path().join(file))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    atomic::write_file(
        &out.path().join("README.md"),
        card::model_card(info, &section, dtype_name, text_only).as_bytes(),
    )?;
    out.commit()?;
    tracing::info!(dir = %dir.display(), files, dtype = dtype_name, "exported the merged model");
    Ok(())
}
