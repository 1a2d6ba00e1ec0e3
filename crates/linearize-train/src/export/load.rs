//! Loading a model in any of the forms a run leaves: a plain Hugging Face directory (the
//! teacher), an exported `model/` directory (its `linearize` section rebuilds the converted
//! layers), or a base directory plus `adapters.safetensors` (the file's metadata rebuilds them).
use super::section::{LinearizeSection, ModelShape, SECTION_KEY};
use super::tensor_file::TensorFile;
use super::{META_LAYERS, META_LORA, META_MODEL_SHAPE};
use crate::convert::{convert, ConvertedLayers};
use crate::lora::{LoraAdapters, LoraSettings};
use anyhow::{bail, Context, Result};
use linearize_attention::linearized::Method;
use linearize_models::config::ModelConfig;
use linearize_models::llama::{extra_tensor, parameter_shapes, Model};
use linearize_models::weights::{self, Checkpoint};
use std::path::Path;
use tch::{nn, Device, Kind};

/// A loaded model and what was rebuilt on it.
pub struct LoadedModel {
    /// Ready for inference: converted mixers and adapters installed.
    pub model: Model,
    /// The converted layers, when the model has any.
    pub converted: Option<ConvertedLayers>,
    /// Unmerged LoRA adapters (base + adapters form only; `model/` has them merged).
    pub lora: Option<LoraAdapters>,
    /// The `linearize` section (`model/`) or its equivalent rebuilt from the adapters' metadata.
    pub section: Option<LinearizeSection>,
}

/// Loads `dir` (see the module docs) on `device` in `kind`; with `adapters`, `dir` must be the
/// plain base model the adapters were trained on. Student parameters take `kind` too.
pub fn load_model(
    dir: &Path,
    adapters: Option<&Path>,
    device: Device,
    kind: Kind,
) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let cfg = ModelConfig::from_file(&config_path)?;
    let origin = config_path.display().to_string();
    let section = LinearizeSection::of_config(&cfg, &origin)?;
    match (section, adapters) {
        (None, None) => Ok(LoadedModel {
            model: Model::load(dir, device, kind)?,
            converted: None,
            lora: None,
            section: None,
        }),
        (Some(section), None) => load_exported(dir, &cfg, section, device, kind),
        (None, Some(adapters)) => load_with_adapters(dir, adapters, device, kind),
        (Some(_), Some(adapters)) => bail!(
            "{origin} is already a converted model (it has a `{SECTION_KEY}` section); apply {} \
             to the base model it was made from",
            adapters.display()
        ),
    }
}

/// `model/`: the base weights (LoRA merged) plus the student tensors in one checkpoint.
fn load_exported(
    dir: &Path,
    cfg: &ModelConfig,
    section: LinearizeSection,
    device: Device,
    kind: Kind,
) -> Result<LoadedModel> {
    let origin = dir.join("config.json").display().to_string();
    let Some(conversion) = section.conversion(&cfg.layer_types, &origin)? else {
        let model = Model::load(dir, device, kind)?;
        return Ok(LoadedModel {
            model,
            converted: None,
            lora: None,
            section: Some(section),
        });
    };
    let ckpt = Checkpoint::open(dir)?;
    // The converted layers' tensors are not model parameters: the model skips them under the
    // converted layers' attention, and the student store below must then take every one.
    let prefixes: Vec<String> = conversion
        .plan(&cfg.layer_types)?
        .iter()
        .enumerate()
        .filter(|(_, a)| a.method != Method::Softmax)
        .map(|(i, _)| format!("{}.self_attn.", Model::layer_prefix(i)))
        .collect();
    let mut model = Model::from_checkpoint_with_extras(cfg, &ckpt, device, kind, &|name, _| {
        Ok(prefixes.iter().any(|p| name.starts_with(p.as_str())))
    })
    .with_context(|| format!("loading the model in {}", dir.display()))?;
    let mut student = nn::VarStore::new(device);
    student.set_kind(kind);
    let converted = convert(&mut model, &conversion, &student)?;
    let base = parameter_shapes(cfg);
    weights::fill_var_store(&student, &ckpt, &|name, shape| {
        Ok(base.get(name).is_some_and(|s| s == shape) || extra_tensor(cfg, name, shape)?)
    })
    .with_context(|| {
        format!(
            "loading the converted layers' parameters from {}",
            dir.display()
        )
    })?;
    Ok(LoadedModel {
        model,
        converted: Some(converted),
        lora: None,
        section: Some(section),
    })
}

/// A base model directory plus `adapters.safetensors`.
fn load_with_adapters(dir: &Path, path: &Path, device: Device, kind: Kind) -> Result<LoadedModel> {
    let file = TensorFile::read(path)?;
    let base_config = dir.join("config.json");
    let mut model = Model::load(dir, device, kind)?;
    let want: ModelShape = file.meta_json(META_MODEL_SHAPE)?;
    let differences = want.differences(&ModelShape::of(model.config()));
    if !differences.is_empty() {
        let list = |pick: fn(&(String, String, String)) -> String| {
            differences.iter().map(pick).collect::<Vec<_>>().join(", ")
        };
        bail!(
            "{}: the adapters were trained on a model with {}, but {} has {}",
            path.display(),
            list(|(key, theirs, _)| format!("{key} = {theirs}")),
            base_config.display(),
            list(|(key, _, ours)| format!("{key} = {ours}"))
        );
    }
    let section = LinearizeSection {
        format: super::SECTION_FORMAT,
        tool_version: file.meta(super::META_TOOL_VERSION)?.to_owned(),
        base_model: file.meta(super::META_BASE_MODEL)?.to_owned(),
        base_revision: file.metadata.get(super::META_BASE_REVISION).cloned(),
        recipe_hash: file.meta(super::META_RECIPE_HASH)?.to_owned(),
        layers: file.meta_json(META_LAYERS)?,
        lora: file
            .metadata
            .contains_key(META_LORA)
            .then(|| file.meta_json::<LoraSettings>(META_LORA))
            .transpose()?,
    };
    let origin = format!("{} (metadata `{META_LAYERS}`)", path.display());
    let layer_types = model.config().layer_types.clone();
    let converted = match section.conversion(&layer_types, &origin)? {
        Some(conversion) => {
            let mut student = nn::VarStore::new(device);
            student.set_kind(kind);
            Some(convert(&mut model, &conversion, &student)?)
        }
        None => None,
    };
    let mut used = Vec::new();
    if let Some(converted) = &converted {
        let named = converted.named_parameters();
        file.fill(&named)?;
        used.extend(named.into_iter().map(|(n, _)| n));
    }
    let lora = match &section.lora {
        Some(settings) => {
            let lora = LoraAdapters::install(&mut model, settings, 0)
                .with_context(|| format!("{}: metadata `{META_LORA}`", path.display()))?;
            let named = lora.named_parameters();
            file.fill(&named)?;
            used.extend(named.into_iter().map(|(n, _)| n));
            Some(lora)
        }
        None => None,
    };
    file.ensure_all_used(used.iter().map(String::as_str))?;
    Ok(LoadedModel {
        model,
        converted,
        lora,
        section: Some(section),
    })
}
