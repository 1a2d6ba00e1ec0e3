//! The LoRA adapters in PEFT's format, beside linearize's own `adapters.safetensors`:
//!
//! - `base/`: the converted model *without* the adapters merged (base weights, feature maps and
//!   window factors), written as `model/` is (its own `model_type`, modeling code and card): the
//!   model PEFT puts the adapters on;
//! - `adapter/`: `adapter_config.json` (LoRA, rank, alpha, target projections) and
//!   `adapter_model.safetensors` with PEFT's keys
//!   `base_model.model.<module>.lora_A.weight` / `lora_B.weight` (f32).
//!
//! `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("peft/base",
//! trust_remote_code=True), "peft/adapter")` then computes what `model/` computes.
use super::tensor_file::{self, HostTensor};
use super::{export_model, ExportInfo, ExportOptions};
use crate::convert::ConvertedLayers;
use crate::lora::LoraAdapters;
use anyhow::{Context, Result};
use linearize_models::atomic::{self, AtomicDir};
use linearize_models::llama::Model;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use tch::Kind;

/// The prefix PEFT gives the base model's parameter names in an adapter file.
pub const KEY_PREFIX: &str = "base_model.model.";

/// Writes `dir` (replacing it atomically): `base/` and `adapter/` as described in the module docs.
pub fn export_peft(
    dir: &Path,
    model: &Model,
    converted: &ConvertedLayers,
    lora: &LoraAdapters,
    info: &ExportInfo,
    options: &ExportOptions,
) -> Result<()> {
    tracing::info!(dir = %dir.display(), "exporting the PEFT adapters and their base");
    let out = AtomicDir::new(dir)?;
    export_model(
        &out.path().join("base"),
        model,
        converted,
        None,
        info,
        options,
    )?;
    let adapter = out.path().join("adapter");
    std::fs::create_dir_all(&adapter).with_context(|| format!("creating {}", adapter.display()))?;
    let tensors = lora
        .named_parameters()
        .iter()
        .map(|(name, t)| {
            let key = format!("{KEY_PREFIX}{name}");
            Ok((key.clone(), HostTensor::new(&key, t, Kind::Float)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = BTreeMap::from([("format".to_owned(), "pt".to_owned())]);
    tensor_file::write(
        &adapter.join("adapter_model.safetensors"),
        &tensors,
        metadata,
    )?;
    let settings = lora.settings();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        // PEFT loads the adapters onto the model it is given; this names the directory beside.
        "base_model_name_or_path": "../base",
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": settings.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    atomic::write_file(
        &adapter.join("adapter_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    out.commit()?;
    tracing::info!(dir = %dir.display(), "exported the adapters in PEFT's format");
    Ok(())
}
