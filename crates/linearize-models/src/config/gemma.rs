//! The keys of a `gemma3_text` config.json that the Llama families do not have: which layers are
//! local (sliding-window) and which global, their two RoPEs, the query scale and the soft caps.
//! Read as transformers 4.57 (`Gemma3TextConfig`) and 5.x read them; what the decoder does not
//! implement is refused. A multimodal `gemma3` config holds such a config as its `text_config`.
use super::{rope, Defaults, Keys, LayerType, RopeScaling};
use anyhow::{anyhow, Result};
use serde_json::{json, Map, Value};

/// transformers' `sliding_window_pattern` when neither it nor `layer_types` is given: every
/// sixth layer global.
const DEFAULT_PATTERN: i64 = 6;
/// `rope_local_base_freq` (4.x) and the local `default_theta` (5.x).
const DEFAULT_LOCAL_THETA: f64 = 10_000.0;
/// `query_pre_attn_scalar`.
const DEFAULT_QUERY_PRE_ATTN_SCALAR: f64 = 256.0;

/// The `model_type` of a multimodal Gemma 3 config (`Gemma3ForConditionalGeneration`).
pub(super) const MULTIMODAL_MODEL_TYPE: &str = "gemma3";

/// `Gemma3TextConfig`'s values of the keys a gemma3_text config.json must otherwise give: a
/// multimodal config saves its `text_config` as the difference from these (google/gemma-3-4b-it's
/// sets five keys), so a key left out there means this value. (tests/gemma3_multimodal.rs checks
/// them against what the fixture script recorded from both transformers.)
pub const GEMMA3_TEXT_DEFAULTS: [(&str, i64); 7] = [
    ("vocab_size", 262_208),
    ("hidden_size", 2304),
    ("intermediate_size", 9216),
    ("num_hidden_layers", 26),
    ("num_attention_heads", 8),
    ("bos_token_id", 2),
    ("eos_token_id", 1),
];

/// Keys of the text model. At the top level of a multimodal config transformers does not read
/// them (the model is built from `text_config`): one there that says something else than
/// `text_config` is refused rather than silently ignored.
const TEXT_KEYS: [&str; 24] = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "hidden_activation",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "rope_local_base_freq",
    "partial_rotary_factor",
    "max_position_embeddings",
    "attention_bias",
    "sliding_window",
    "sliding_window_pattern",
    "layer_types",
    "query_pre_attn_scalar",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "use_bidirectional_attention",
];

/// The text model's config of a multimodal `gemma3` config (`keys` at its top level), as a
/// gemma3_text config: `text_config` with [`GEMMA3_TEXT_DEFAULTS`] for the keys it leaves out,
/// and the top level's dtype and token ids, which transformers' generation reads first.
/// The vision keys do not change the text model and are dropped.
pub(super) fn text_config_of_multimodal(keys: &Keys) -> Result<Map<String, Value>> {
    let inner_map = match keys.map.get("text_config") {
        Some(Value::Object(m)) => m,
        None | Some(Value::Null) => {
            return Err(anyhow!(
                "{}: missing key `text_config` (the text model's config of a multimodal gemma3 \
                 model; transformers would build a default-sized one that matches no checkpoint)",
                keys.origin
            ))
        }
        Some(v) => return Err(keys.err("text_config", v, "is not an object")),
    };
    let inner = keys.sub("text_config", inner_map);
    let mut text = inner_map.clone();
    match text.get("model_type") {
        None => {}
        Some(Value::String(t)) if t == "gemma3_text" => {}
        Some(v) => return Err(inner.err("model_type", v, "is not \"gemma3_text\"")),
    }
    text.insert("model_type".into(), "gemma3_text".into());
    // Gemma3ForConditionalGeneration does not soft-cap its logits, whatever its text config
    // says; the text model alone would.
    if let Some(cap) = text.get("final_logit_softcapping").filter(|v| !v.is_null()) {
        return Err(inner.err(
            "final_logit_softcapping",
            cap,
            "is not applied by the multimodal model (Gemma3ForConditionalGeneration) but would \
             be by its text model: set it to null to load the checkpoint as transformers runs it",
        ));
    }
    // transformers 4 ties the LM head by the text config's key, 5 by the top level's.
    let tie = |k: &Keys| k.opt::<bool>("tie_word_embeddings", "a boolean");
    let (outer_tie, inner_tie) = (tie(keys)?.unwrap_or(true), tie(&inner)?.unwrap_or(true));
    if outer_tie != inner_tie {
        return Err(keys.err(
            "tie_word_embeddings",
            &Value::Bool(outer_tie),
            &format!(
                "disagrees with `text_config.tie_word_embeddings` = {inner_tie} (transformers 5 \
                 reads the first, 4 the second)"
            ),
        ));
    }
    if ["torch_dtype", "dtype"]
        .iter()
        .any(|k| keys.map.contains_key(*k))
    {
        text.remove("torch_dtype");
        text.remove("dtype");
    }
    for key in [
        "torch_dtype",
        "dtype",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ] {
        if let Some(v) = keys.map.get(key).filter(|v| !v.is_null()) {
            text.insert(key.into(), v.clone());
        }
    }
    for (key, default) in GEMMA3_TEXT_DEFAULTS {
        text.entry(key).or_insert(default.into());
    }
    for key in TEXT_KEYS {
        if let Some(v) = keys.map.get(key) {
            if text.get(key) != Some(v) {
                return Err(keys.err(
                    key,
                    v,
                    &format!(
                        "at the top level of a multimodal gemma3 config, which transformers \
                         ignores (it reads `text_config.{key}`, here {})",
                        text.get(key).map_or("left out".into(), Value::to_string)
                    ),
                ));
            }
        }
    }
    Ok(text)
}

/// What Gemma 3 adds to the Llama decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct GemmaParams {
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2`, not by `head_dim^-1/2`.
    pub query_pre_attn_scalar: f64,
    /// `final_logit_softcapping`: logits become `c * tanh(logits / c)`.
    pub final_logit_softcapping: Option<f64>,
    /// The RoPE of the sliding-window layers (the global layers use the config's `rope_theta`
    /// and `rope_scaling`).
    pub local_rope_theta: f64,
    pub local_rope_scaling: Option<RopeScaling>,
    /// Whether the file gave RoPE per layer type (transformers 5's `rope_parameters`), so that
    /// it is written back that way.
    rope_per_layer_type: bool,
}

/// Everything Gemma-specific of a config: the layer types, the global (theta, scaling) and the
/// Gemma parameters.
pub(super) struct Parsed {
    pub layer_types: Vec<LayerType>,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub params: GemmaParams,
}

pub(super) fn parse(
    keys: &Keys,
    num_layers: i64,
    d: &Defaults,
    max_positions: i64,
) -> Result<Parsed> {
    let activation: String = keys
        .not_null("hidden_activation", "a string")?
        .unwrap_or("gelu_pytorch_tanh".into());
    if activation != "gelu_pytorch_tanh" {
        return Err(keys.err(
            "hidden_activation",
            &Value::from(activation),
            "is not supported (expected \"gelu_pytorch_tanh\")",
        ));
    }
    if keys
        .opt("use_bidirectional_attention", "a boolean")?
        .unwrap_or(false)
    {
        return Err(keys.err(
            "use_bidirectional_attention",
            &Value::Bool(true),
            "is not supported (the decoder is causal)",
        ));
    }
    if let Some(cap) = keys.opt::<f64>("attn_logit_softcapping", "a number")? {
        return Err(keys.err(
            "attn_logit_softcapping",
            &Value::from(cap),
            "is not supported (soft-capped attention scores are not implemented; Gemma 3 sets none)",
        ));
    }
    let final_logit_softcapping = keys.opt::<f64>("final_logit_softcapping", "a number")?;
    if let Some(cap) = final_logit_softcapping.filter(|c| *c <= 0.0) {
        return Err(keys.err(
            "final_logit_softcapping",
            &Value::from(cap),
            "is not positive",
        ));
    }
    let query_pre_attn_scalar = keys
        .not_null::<f64>("query_pre_attn_scalar", "a number")?
        .unwrap_or(DEFAULT_QUERY_PRE_ATTN_SCALAR);
    if query_pre_attn_scalar <= 0.0 {
        return Err(keys.err(
            "query_pre_attn_scalar",
            &Value::from(query_pre_attn_scalar),
            "is not positive",
        ));
    }

    let layer_types = layer_types(keys, num_layers)?;

    let per_type = match keys.map.get("rope_parameters") {
        Some(Value::Object(obj))
            if obj.contains_key("full_attention") || obj.contains_key("sliding_attention") =>
        {
            Some(obj)
        }
        Some(Value::Object(obj)) => {
            return Err(keys.err(
                "rope_parameters",
                &Value::Object(obj.clone()),
                "is not per layer type (Gemma 3 expects `full_attention` and `sliding_attention` sections)",
            ))
        }
        _ => None,
    };
    let (global, local, rope_per_layer_type) = match per_type {
        None => {
            // transformers 4: the global RoPE at the top level, the local one a plain theta.
            if let Some(Value::Object(scaling)) = keys.map.get("rope_scaling") {
                if !scaling.contains_key("rope_type") && scaling.contains_key("type") {
                    return Err(keys.sub("rope_scaling", scaling).err(
                        "type",
                        &scaling["type"],
                        "is the old spelling, which transformers 5 ignores for Gemma 3 and 4 reads; write `rope_type`",
                    ));
                }
            }
            let global = rope::parse(keys, d, max_positions)?;
            let local_theta = keys
                .not_null::<f64>("rope_local_base_freq", "a number")?
                .unwrap_or(DEFAULT_LOCAL_THETA);
            if local_theta <= 0.0 {
                return Err(keys.err(
                    "rope_local_base_freq",
                    &Value::from(local_theta),
                    "is not positive",
                ));
            }
            (global, (local_theta, None), false)
        }
        Some(obj) => {
            if let Some(v) = keys.map.get("rope_scaling").filter(|v| !v.is_null()) {
                return Err(keys.err(
                    "rope_scaling",
                    v,
                    "is given beside a per-layer-type `rope_parameters` (transformers 4 reads only the first, 5 merges them); keep one",
                ));
            }
            let outer = keys.sub("rope_parameters", obj);
            let empty = Map::new();
            let section = |name: &str, default: f64| -> Result<(f64, Option<RopeScaling>)> {
                let map = match obj.get(name) {
                    None | Some(Value::Null) => &empty,
                    Some(Value::Object(m)) => m,
                    Some(v) => return Err(outer.err(name, v, "is not an object")),
                };
                rope::parse_section(keys, &outer.sub(name, map), default, max_positions)
            };
            // transformers 5 takes the old top-level keys as the sections' defaults.
            let global_default = keys
                .not_null::<f64>("rope_theta", "a number")?
                .unwrap_or(d.rope_theta);
            let local_default = keys
                .not_null::<f64>("rope_local_base_freq", "a number")?
                .unwrap_or(DEFAULT_LOCAL_THETA);
            (
                section("full_attention", global_default)?,
                section("sliding_attention", local_default)?,
                true,
            )
        }
    };
    for (key, scaling) in [("global", &global.1), ("local", &local.1)] {
        if let Some(RopeScaling::Yarn {
            truncate: false, ..
        }) = scaling
        {
            return Err(keys.err(
                "rope_scaling",
                &Value::from(key),
                "(yarn of the layers given) has `truncate: false`, which transformers 5 ignores for Gemma 3 and 4 reads",
            ));
        }
    }
    Ok(Parsed {
        layer_types,
        rope_theta: global.0,
        rope_scaling: global.1,
        params: GemmaParams {
            query_pre_attn_scalar,
            final_logit_softcapping,
            local_rope_theta: local.0,
            local_rope_scaling: local.1,
            rope_per_layer_type,
        },
    })
}

/// `layer_types`, or the older `sliding_window_pattern` (every p-th layer global).
fn layer_types(keys: &Keys, num_layers: i64) -> Result<Vec<LayerType>> {
    if let Some(names) = keys.opt::<Vec<String>>("layer_types", "a list of strings")? {
        if names.len() as i64 != num_layers {
            return Err(keys.err(
                "layer_types",
                &json!(names),
                &format!(
                    "has {} entries for num_hidden_layers = {num_layers}",
                    names.len()
                ),
            ));
        }
        return names
            .iter()
            .map(|n| match n.as_str() {
                "sliding_attention" => Ok(LayerType::Sliding),
                "full_attention" => Ok(LayerType::Full),
                _ => Err(keys.err(
                    "layer_types",
                    &json!(names),
                    &format!("holds {n:?} (expected \"sliding_attention\" or \"full_attention\")"),
                )),
            })
            .collect();
    }
    let pattern = keys.positive("sliding_window_pattern", Some(DEFAULT_PATTERN))?;
    Ok((0..num_layers)
        .map(|i| {
            if (i + 1) % pattern == 0 {
                LayerType::Full
            } else {
                LayerType::Sliding
            }
        })
        .collect())
}

/// Writes the Gemma keys into `out` (the global RoPE's keys are written here too when the file
/// gave RoPE per layer type).
pub(super) fn write(
    out: &mut Map<String, Value>,
    params: &GemmaParams,
    layer_types: &[LayerType],
    global: (f64, Option<&RopeScaling>),
) {
    out.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
    out.insert(
        "query_pre_attn_scalar".into(),
        params.query_pre_attn_scalar.into(),
    );
    out.insert(
        "final_logit_softcapping".into(),
        params.final_logit_softcapping.into(),
    );
    out.insert(
        "layer_types".into(),
        layer_types.iter().map(|t| t.name()).collect(),
    );
    out.remove("sliding_window_pattern");
    let section = |theta: f64, scaling: Option<&RopeScaling>| {
        let mut m = match scaling.map(RopeScaling::to_json) {
            Some(Value::Object(m)) => m,
            _ => Map::from_iter([("rope_type".to_string(), Value::from("default"))]),
        };
        m.insert("rope_theta".into(), theta.into());
        Value::Object(m)
    };
    if params.rope_per_layer_type {
        out.remove("rope_theta");
        out.remove("rope_scaling");
        out.remove("rope_local_base_freq");
        out.insert(
            "rope_parameters".into(),
            json!({
                "full_attention": section(global.0, global.1),
                "sliding_attention": section(params.local_rope_theta, params.local_rope_scaling.as_ref()),
            }),
        );
    } else {
        rope::write(out, global.0, global.1);
        out.insert(
            "rope_local_base_freq".into(),
            params.local_rope_theta.into(),
        );
    }
}
