//! The RoPE keys of a `config.json` in both formats transformers writes:
//! - transformers 4: top-level `rope_theta` and `rope_scaling` (`{"rope_type": ..., ...}` or null);
//! - transformers 5: one `rope_parameters` object holding `rope_theta` and `rope_type` (and the
//!   scaling keys), with no top-level `rope_theta`.
//!
//! Every `rope_type` the supported families use is read with transformers' own rules
//! (modeling_rope_utils.py of 4.57 and 5.x); anything else is refused with the key named.
use super::{Defaults, Keys};
use anyhow::Result;
use serde_json::{json, Map, Value};

/// RoPE frequency scaling; `None` in [`super::ModelConfig`] is the plain RoPE (`default`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `linear` (position interpolation): every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// `dynamic` NTK scaling. transformers raises the base only once a sequence grows past
    /// `max_position_embeddings`, which this crate refuses, so every position it runs sees the
    /// plain frequencies; `factor` is kept to write the config back.
    Dynamic { factor: f64 },
    /// `yarn`: frequencies blended between interpolated (low) and kept (high) by a linear ramp
    /// over the dims, and cos/sin multiplied by `attention_factor` (resolved from `factor`,
    /// `mscale` and `mscale_all_dim` when the config does not give it).
    Yarn {
        factor: f64,
        original_max_position_embeddings: i64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
        attention_factor: f64,
    },
    /// Llama 3.1's band-wise scaling of the inverse frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: i64,
    },
}

impl RopeScaling {
    /// transformers' `rope_type` name.
    pub fn rope_type(&self) -> &'static str {
        match self {
            RopeScaling::Linear { .. } => "linear",
            RopeScaling::Dynamic { .. } => "dynamic",
            RopeScaling::Yarn { .. } => "yarn",
            RopeScaling::Llama3 { .. } => "llama3",
        }
    }

    /// The factor cos and sin are multiplied by (transformers' `attention_scaling`).
    pub fn attention_factor(&self) -> f64 {
        match self {
            RopeScaling::Yarn {
                attention_factor, ..
            } => *attention_factor,
            _ => 1.0,
        }
    }

    /// The scaling as transformers writes it (`rope_type` and its keys, every value explicit).
    pub fn to_json(&self) -> Value {
        match *self {
            RopeScaling::Linear { factor } | RopeScaling::Dynamic { factor } => {
                json!({"rope_type": self.rope_type(), "factor": factor})
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                truncate,
                attention_factor,
            } => json!({
                "rope_type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": original_max_position_embeddings,
                "beta_fast": beta_fast,
                "beta_slow": beta_slow,
                "truncate": truncate,
                "attention_factor": attention_factor,
            }),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        }
    }
}

/// The keys of transformers' `RopeParameters` (plus the old spelling `type`). A key outside this
/// list is refused: transformers would ignore it, and a key nobody reads is most likely a newer
/// feature or a typo that the user expects to matter.
const KNOWN_KEYS: [&str; 17] = [
    "rope_theta",
    "rope_type",
    "type",
    "partial_rotary_factor",
    "factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "short_factor",
    "long_factor",
    "low_freq_factor",
    "high_freq_factor",
    "mscale",
    "mscale_all_dim",
    "truncate",
    "mrope_section",
];

/// (`rope_theta`, scaling) of a config, its RoPE read from either format.
pub(super) fn parse(
    keys: &Keys,
    d: &Defaults,
    max_positions: i64,
) -> Result<(f64, Option<RopeScaling>)> {
    let section = |key: &str| -> Result<Option<&Map<String, Value>>> {
        match keys.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(obj)) => Ok(Some(obj)),
            Some(v) => Err(keys.err(key, v, "is not an object or null")),
        }
    };
    // transformers 5 reads `rope_scaling or rope_parameters`; 4 never reads `rope_parameters`.
    let (name, obj) = match (section("rope_scaling")?, section("rope_parameters")?) {
        (Some(a), Some(b)) if a != b => {
            return Err(keys.err(
                "rope_parameters",
                &Value::Object(b.clone()),
                "differs from `rope_scaling` (transformers 5 reads `rope_scaling` first, 4 never reads `rope_parameters`; keep one)",
            ))
        }
        (Some(a), _) => ("rope_scaling", Some(a)),
        (None, Some(b)) => ("rope_parameters", Some(b)),
        (None, None) => ("rope_scaling", None),
    };
    let empty = Map::new();
    let sub = keys.sub(name, obj.unwrap_or(&empty));

    check_keys(&sub)?;
    for k in [&sub, keys] {
        if let Some(p) = k.opt::<f64>("partial_rotary_factor", "a number")? {
            if p != 1.0 {
                return Err(k.err(
                    "partial_rotary_factor",
                    &Value::from(p),
                    "is not supported (RoPE on part of the head is not implemented)",
                ));
            }
        }
    }
    let theta = match (sub.opt::<f64>("rope_theta", "a number")?, name) {
        // transformers 4 reads only the top-level key; 5 prefers the section's.
        (Some(inner), "rope_scaling") if keys.map.get("rope_theta") != sub.map.get("rope_theta") => {
            return Err(sub.err(
                "rope_theta",
                &Value::from(inner),
                "is read by transformers 5 only (4 reads the top-level `rope_theta`); give it once, at the top level or in `rope_parameters`",
            ))
        }
        (Some(inner), _) => {
            if let Some(top) = keys.opt::<f64>("rope_theta", "a number")? {
                if top != inner {
                    return Err(keys.err(
                        "rope_theta",
                        &Value::from(top),
                        &format!("differs from `{name}.rope_theta` = {inner}"),
                    ));
                }
            }
            inner
        }
        (None, _) => keys.not_null("rope_theta", "a number")?.unwrap_or(d.rope_theta),
    };
    if theta <= 0.0 {
        return Err(keys.err("rope_theta", &Value::from(theta), "is not positive"));
    }

    if obj.is_none() {
        return Ok((theta, None));
    }
    Ok((theta, scaling(keys, &sub, max_positions)?))
}

/// (`rope_theta`, scaling) of one layer type's section of transformers 5's per-layer-type
/// `rope_parameters` (Gemma 3), with `default_theta` where the section gives none.
pub(super) fn parse_section(
    keys: &Keys,
    sub: &Keys,
    default_theta: f64,
    max_positions: i64,
) -> Result<(f64, Option<RopeScaling>)> {
    check_keys(sub)?;
    if let Some(p) = sub.opt::<f64>("partial_rotary_factor", "a number")? {
        if p != 1.0 {
            return Err(sub.err(
                "partial_rotary_factor",
                &Value::from(p),
                "is not supported (RoPE on part of the head is not implemented)",
            ));
        }
    }
    let theta = sub
        .not_null::<f64>("rope_theta", "a number")?
        .unwrap_or(default_theta);
    if theta <= 0.0 {
        return Err(sub.err("rope_theta", &Value::from(theta), "is not positive"));
    }
    Ok((theta, scaling(keys, sub, max_positions)?))
}

/// Refuses a key of a RoPE section that transformers does not know, and multimodal RoPE.
fn check_keys(sub: &Keys) -> Result<()> {
    for key in sub.map.keys() {
        if !KNOWN_KEYS.contains(&key.as_str()) {
            return Err(sub.err(
                key,
                &sub.map[key],
                "is not a RoPE parameter transformers knows",
            ));
        }
    }
    if let Some(v) = sub.map.get("mrope_section") {
        return Err(sub.err("mrope_section", v, "is not supported (multimodal RoPE)"));
    }
    Ok(())
}

/// The frequency scaling of a RoPE section `sub` by its `rope_type` (none for `default`).
fn scaling(keys: &Keys, sub: &Keys, max_positions: i64) -> Result<Option<RopeScaling>> {
    let obj = sub.map;
    let name = sub.prefix.trim_end_matches('.');
    let (type_key, rope_type) = match (obj.get("rope_type"), obj.get("type")) {
        (Some(v), _) => ("rope_type", v),
        (None, Some(v)) => ("type", v),
        (None, None) => ("rope_type", &Value::Null),
    };
    let factor = || -> Result<f64> {
        let f: f64 = sub.required("factor", "a number")?;
        if f <= 0.0 {
            return Err(sub.err("factor", &Value::from(f), "is not positive"));
        }
        Ok(f)
    };
    // llama3 and yarn fall back to max_position_embeddings for the pretraining length (transformers
    // 5; 4 requires it for llama3), and 5 lets a top-level key of the same name win.
    let original = || -> Result<i64> {
        let inner = sub.positive("original_max_position_embeddings", Some(max_positions))?;
        if let Some(top) = keys.opt::<i64>("original_max_position_embeddings", "an integer")? {
            if top != inner {
                return Err(keys.err(
                    "original_max_position_embeddings",
                    &Value::from(top),
                    &format!("differs from `{name}.original_max_position_embeddings` = {inner} (transformers 4 and 5 disagree on which one counts)"),
                ));
            }
        }
        Ok(inner)
    };
    Ok(match rope_type.as_str() {
        None if rope_type.is_null() => None,
        Some("default") => None,
        Some("linear") => Some(RopeScaling::Linear { factor: factor()? }),
        Some("dynamic") => Some(RopeScaling::Dynamic { factor: factor()? }),
        Some("llama3") => {
            let low_freq_factor: f64 = sub.required("low_freq_factor", "a number")?;
            let high_freq_factor: f64 = sub.required("high_freq_factor", "a number")?;
            if high_freq_factor <= low_freq_factor {
                return Err(sub.err(
                    "high_freq_factor",
                    &Value::from(high_freq_factor),
                    &format!("is not above low_freq_factor = {low_freq_factor}"),
                ));
            }
            Some(RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original()?,
            })
        }
        Some("yarn") => Some(yarn(sub, max_positions, original()?)?),
        Some("longrope") => {
            return Err(sub.err(
                type_key,
                rope_type,
                "is not supported (its frequencies switch with the length of the whole sequence)",
            ))
        }
        _ => {
            return Err(sub.err(
                type_key,
                rope_type,
                "is not supported (expected \"default\", \"linear\", \"dynamic\", \"yarn\" or \"llama3\")",
            ))
        }
    })
}

/// transformers' `_compute_yarn_parameters` inputs, defaults resolved as it resolves them.
fn yarn(sub: &Keys, max_positions: i64, original: i64) -> Result<RopeScaling> {
    // transformers 5 derives a missing factor from the context lengths (4 requires it).
    let factor = match sub.opt::<f64>("factor", "a number")? {
        Some(f) if f > 0.0 => f,
        Some(f) => return Err(sub.err("factor", &Value::from(f), "is not positive")),
        None => max_positions as f64 / original as f64,
    };
    let get_mscale = |scale: f64, mscale: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * mscale * scale.ln() + 1.0
        }
    };
    let attention_factor = match sub.opt::<f64>("attention_factor", "a number")? {
        Some(a) if a >= 0.0 => a,
        Some(a) => return Err(sub.err("attention_factor", &Value::from(a), "is negative")),
        None => {
            let mscale = sub.opt::<f64>("mscale", "a number")?.unwrap_or(0.0);
            let mscale_all_dim = sub.opt::<f64>("mscale_all_dim", "a number")?.unwrap_or(0.0);
            // transformers tests truthiness: a zero counts as absent.
            if mscale != 0.0 && mscale_all_dim != 0.0 {
                get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            } else {
                get_mscale(factor, 1.0)
            }
        }
    };
    // `get("beta_fast") or 32`: null and zero both mean the default.
    let beta = |key: &str, default: f64| -> Result<f64> {
        Ok(sub
            .opt::<f64>(key, "a number")?
            .filter(|b| *b != 0.0)
            .unwrap_or(default))
    };
    let (beta_fast, beta_slow) = (beta("beta_fast", 32.0)?, beta("beta_slow", 1.0)?);
    Ok(RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast,
        beta_slow,
        truncate: sub.opt("truncate", "a boolean")?.unwrap_or(true),
        attention_factor,
    })
}

/// Writes theta and scaling into `out` in the format of the file they came from: a config read
/// from `rope_parameters` is written back that way (transformers 5), any other as `rope_theta` and
/// `rope_scaling` (transformers 4, which 5 also reads).
pub(super) fn write(out: &mut Map<String, Value>, theta: f64, scaling: Option<&RopeScaling>) {
    let scaling_json = scaling.map(RopeScaling::to_json);
    let v5 = matches!(out.get("rope_parameters"), Some(Value::Object(_)));
    if v5 && !out.contains_key("rope_scaling") {
        let mut params = match scaling_json {
            Some(Value::Object(m)) => m,
            _ => {
                let mut m = Map::new();
                m.insert("rope_type".into(), "default".into());
                m
            }
        };
        params.insert("rope_theta".into(), theta.into());
        out.remove("rope_theta");
        out.insert("rope_parameters".into(), Value::Object(params));
    } else {
        out.remove("rope_parameters");
        out.insert("rope_theta".into(), theta.into());
        out.insert("rope_scaling".into(), scaling_json.unwrap_or(Value::Null));
    }
}
