//! What an export records about the conversion, shared by the `linearize` section of
//! `model/config.json` and the metadata of `adapters.safetensors`: the method and settings of
//! every layer, the LoRA settings, where the base model came from, and the base model's shape.
use crate::convert::{ConversionConfig, LayerMethod, LayerSelection};
use crate::lora::LoraSettings;
use anyhow::{ensure, Context, Result};
use linearize_attention::linearized::Method;
use linearize_models::config::{LayerType, ModelConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The version of the section's layout.
pub const SECTION_FORMAT: u32 = 1;
/// The key of the section in `config.json`.
pub const SECTION_KEY: &str = "linearize";

/// The `linearize` section of an exported `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearizeSection {
    pub format: u32,
    /// Version of the tool that wrote it.
    pub tool_version: String,
    /// The base model as the recipe named it (hub id or path).
    pub base_model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_revision: Option<String>,
    pub recipe_hash: String,
    /// The method and full attention settings of every layer, ascending.
    pub layers: Vec<LayerMethod>,
    /// The adapters that were trained; in `model/` they are merged into the weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSettings>,
}

impl LinearizeSection {
    /// The section of `cfg`, if it has one; the error names `origin` (the file).
    pub fn of_config(cfg: &ModelConfig, origin: &str) -> Result<Option<Self>> {
        cfg.extra(SECTION_KEY)
            .map(|value| {
                let section: Self = serde_json::from_value(value.clone())
                    .with_context(|| format!("{origin}: key `{SECTION_KEY}`"))?;
                ensure!(
                    section.format == SECTION_FORMAT,
                    "{origin}: `{SECTION_KEY}.format` is {}, this tool reads {SECTION_FORMAT}",
                    section.format
                );
                Ok(section)
            })
            .transpose()
    }

    /// The conversion that rebuilds the layers (none when every layer is softmax), checked
    /// against a model with these `layer_types`.
    pub fn conversion(
        &self,
        layer_types: &[LayerType],
        origin: &str,
    ) -> Result<Option<ConversionConfig>> {
        let num_layers = layer_types.len();
        let listed: Vec<usize> = self.layers.iter().map(|l| l.layer).collect();
        ensure!(
            listed == (0..num_layers).collect::<Vec<_>>(),
            "{origin}: `{SECTION_KEY}.layers` lists layers {listed:?}, the model has {num_layers} \
             (0..{})",
            num_layers.saturating_sub(1)
        );
        let converted: Vec<&LayerMethod> = self
            .layers
            .iter()
            .filter(|l| l.attention.method != Method::Softmax)
            .collect();
        let Some(first) = converted.first() else {
            return Ok(None);
        };
        let overrides: BTreeMap<usize, _> = converted
            .iter()
            .map(|l| (l.layer, l.attention.clone()))
            .collect();
        let conversion = ConversionConfig {
            attention: first.attention.clone(),
            layers: LayerSelection::List(converted.iter().map(|l| l.layer).collect()),
            softmax_layers: Vec::new(),
            overrides,
            softmax_by_error: None,
            softmax_layers_by: None,
            softmax_heads: None,
        };
        conversion
            .plan(layer_types)
            .with_context(|| format!("{origin}: `{SECTION_KEY}.layers`"))?;
        Ok(Some(conversion))
    }
}

/// The dimensions an adapter file depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelShape {
    pub model_type: String,
    pub num_hidden_layers: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub vocab_size: i64,
}

impl ModelShape {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            model_type: cfg.family.model_type().to_owned(),
            num_hidden_layers: cfg.num_hidden_layers,
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
        }
    }

    /// Every key whose value differs, as `(key, self's, other's)`.
    pub fn differences(&self, other: &Self) -> Vec<(String, String, String)> {
        let as_map = |shape: &Self| match serde_json::to_value(shape) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => unreachable!("a ModelShape serialises to an object"),
        };
        let (a, b) = (as_map(self), as_map(other));
        a.iter()
            .filter(|(key, value)| b.get(*key) != Some(value))
            .map(|(key, value)| {
                let theirs = b.get(key).map(ToString::to_string).unwrap_or_default();
                (key.clone(), value.to_string(), theirs)
            })
            .collect()
    }
}
