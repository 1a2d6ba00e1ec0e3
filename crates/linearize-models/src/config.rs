//! The Hugging Face `config.json` of a Llama-family model (llama, mistral, qwen2, qwen3, and
//! gemma3_text with its local and global layers, also as the `text_config` of a multimodal
//! `gemma3`), checked for what the decoder in `llama.rs` implements. Every key the decoder does
//! not read is kept in the raw JSON, so a config read and written back loses nothing.
use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::fmt;
use std::path::Path;

mod gemma;
mod rope;
pub use gemma::{GemmaParams, GEMMA3_TEXT_DEFAULTS};
pub use rope::RopeScaling;

/// The HF `model_type`s this crate runs; they differ only in the details recorded in
/// [`ModelConfig`] (biases, q/k norms, sliding window; Gemma 3's norms, MLP and scales).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Gemma 3's text model (`gemma3_text`).
    Gemma3,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma3 => "gemma3_text",
        }
    }

    fn from_model_type(s: &str) -> Option<Self> {
        Some(match s {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3_text" => Family::Gemma3,
            _ => return None,
        })
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.model_type())
    }
}

/// The `model_type` of a converted model exported by linearize: its own type, which no stock
/// loader accepts (the export carries the modeling code that runs it), with the decoder family
/// in `base_model_type`.
pub const EXPORT_MODEL_TYPE: &str = "linearize";

/// Whether a layer attends to every earlier key or only to the last `sliding_window` ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    Full,
    Sliding,
}

impl LayerType {
    /// transformers' name in `layer_types`.
    pub fn name(self) -> &'static str {
        match self {
            LayerType::Full => "full_attention",
            LayerType::Sliding => "sliding_attention",
        }
    }
}

/// A parsed and checked `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    /// Written as an export of linearize: `model_type` [`EXPORT_MODEL_TYPE`] and the family in
    /// `base_model_type`.
    pub exported: bool,
    /// Read from a multimodal `gemma3` config (`Gemma3ForConditionalGeneration`): the fields are
    /// its `text_config`'s, and the checkpoint holds this text model under the language model's
    /// names beside a vision tower that loading skips (see [`crate::multimodal`]). Written back
    /// as the text model alone (`gemma3_text`).
    pub multimodal: bool,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: i64,
    /// Bias on q/k/v_proj (`attention_bias`; always on for qwen2).
    pub qkv_bias: bool,
    /// Bias on o_proj (`attention_bias` for llama and qwen3; never for mistral and qwen2).
    pub o_proj_bias: bool,
    /// Bias on gate/up/down_proj (`mlp_bias`, llama only).
    pub mlp_bias: bool,
    /// RMSNorm of every q and k head before RoPE (qwen3).
    pub qk_norm: bool,
    /// Each query of a [`LayerType::Sliding`] layer sees only the last `w` keys, itself included
    /// (mistral's and gemma3's `sliding_window`).
    pub sliding_window: Option<i64>,
    /// One per layer: every layer of a mistral with a window is sliding, gemma3's follow
    /// `layer_types`, all others are full.
    pub layer_types: Vec<LayerType>,
    /// Gemma 3's query scale, soft cap and local RoPE; `None` in the other families.
    pub gemma: Option<GemmaParams>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    /// `torch_dtype` (or `dtype` in newer transformers): the dtype the checkpoint was saved in.
    pub torch_dtype: Option<String>,
    /// Std of the normal init of HF's `_init_weights`, used for randomly initialised models.
    pub initializer_range: f64,
    raw: Map<String, Value>,
}

/// The typed view of a raw JSON object (the file, or a section of it such as `rope_parameters`),
/// with the file and the full key named in every error.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    origin: &'a str,
    /// `""` for the file's top level, `"rope_parameters."` for a section.
    prefix: String,
}

impl<'a> Keys<'a> {
    fn sub(&self, key: &str, map: &'a Map<String, Value>) -> Keys<'a> {
        Keys {
            map,
            origin: self.origin,
            prefix: format!("{}{key}.", self.prefix),
        }
    }

    fn err(&self, key: &str, value: &Value, why: &str) -> anyhow::Error {
        anyhow!(
            "{}: key `{}{key}` = {value} {why}",
            self.origin,
            self.prefix
        )
    }

    /// The value at `key` (absent and `null` are both `None`).
    fn opt<T: DeserializeOwned>(&self, key: &str, expected: &str) -> Result<Option<T>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|_| self.err(key, v, &format!("is not {expected}"))),
        }
    }

    /// As [`Keys::opt`], but an explicit `null` is refused: transformers takes it as `None` and
    /// fails (or computes something else) where the key's default would have worked.
    fn not_null<T: DeserializeOwned>(&self, key: &str, expected: &str) -> Result<Option<T>> {
        if let Some(Value::Null) = self.map.get(key) {
            return Err(self.err(key, &Value::Null, &format!("is not {expected}")));
        }
        self.opt(key, expected)
    }

    fn required<T: DeserializeOwned>(&self, key: &str, expected: &str) -> Result<T> {
        self.opt(key, expected)?.ok_or_else(|| {
            anyhow!(
                "{}: missing key `{}{key}` ({expected})",
                self.origin,
                self.prefix
            )
        })
    }

    fn positive(&self, key: &str, default: Option<i64>) -> Result<i64> {
        let expected = "a positive integer";
        let v = match default {
            Some(d) => self.not_null(key, expected)?.unwrap_or(d),
            None => self.required(key, expected)?,
        };
        if v <= 0 {
            return Err(self.err(key, &Value::from(v), &format!("is not {expected}")));
        }
        Ok(v)
    }
}

/// transformers' value for every key that changes the math when a config leaves it out, per
/// family: the defaults of `LlamaConfig`, `MistralConfig`, `Qwen2Config` and `Qwen3Config`, the
/// same in transformers 4.57 and 5.x (tests/hf_configs.rs checks them against both). Keys that are
/// not here are required, or refused when set to what the decoder does not implement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    /// `None`: as many as `num_attention_heads` (plain multi-head attention). An explicit
    /// `null` means that in every family.
    pub num_key_value_heads: Option<i64>,
    /// `None`: `hidden_size / num_attention_heads`.
    pub head_dim: Option<i64>,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    /// Also transformers 5's `default_theta` for a `rope_parameters` without `rope_theta`.
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
    /// `attention_bias` (llama, qwen3) and `mlp_bias` (llama); the families without the key have
    /// fixed biases (qwen2: on q/k/v; mistral: none).
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Mistral's `sliding_window` when the key is absent (an explicit `null` means none).
    pub sliding_window: Option<i64>,
    /// Std of the normal init of HF's `_init_weights` (only random initialisation reads it).
    pub initializer_range: f64,
}

/// The table of [`Defaults`]; `hidden_act` is `silu` in every family but gemma3
/// (`hidden_activation` `gelu_pytorch_tanh`, see config/gemma.rs for its other keys).
pub const DEFAULTS: [(Family, Defaults); 5] = [
    (
        Family::Llama,
        Defaults {
            num_key_value_heads: None,
            head_dim: None,
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
            initializer_range: 0.02,
        },
    ),
    (
        Family::Mistral,
        Defaults {
            num_key_value_heads: Some(8),
            head_dim: None,
            max_position_embeddings: 4096 * 32,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: Some(4096),
            initializer_range: 0.02,
        },
    ),
    (
        Family::Qwen2,
        Defaults {
            num_key_value_heads: Some(32),
            head_dim: None,
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
            initializer_range: 0.02,
        },
    ),
    (
        Family::Qwen3,
        Defaults {
            num_key_value_heads: Some(32),
            // Not hidden_size / heads: Qwen3's heads are wider than that in every released size.
            head_dim: Some(128),
            max_position_embeddings: 32768,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: None,
            initializer_range: 0.02,
        },
    ),
    (
        Family::Gemma3,
        Defaults {
            num_key_value_heads: Some(4),
            head_dim: Some(256),
            max_position_embeddings: 131_072,
            rms_norm_eps: 1e-6,
            // The global layers' theta; the local one is config/gemma.rs's.
            rope_theta: 1_000_000.0,
            tie_word_embeddings: true,
            attention_bias: false,
            mlp_bias: false,
            sliding_window: Some(4096),
            initializer_range: 0.02,
        },
    ),
];

impl Family {
    /// transformers' defaults for this family (a row of [`DEFAULTS`]).
    pub fn defaults(self) -> &'static Defaults {
        &DEFAULTS
            .iter()
            .find(|(f, _)| *f == self)
            .expect("every family has a row")
            .1
    }
}

impl ModelConfig {
    /// Reads and checks a `config.json`; errors name the file and the offending key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses a `config.json` held in memory.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::parse(text, "config.json")
    }

    fn parse(text: &str, origin: &str) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).with_context(|| format!("{origin}: invalid JSON"))?;
        let Value::Object(raw) = value else {
            bail!("{origin}: expected a JSON object");
        };
        if raw.get("model_type").and_then(Value::as_str) == Some(gemma::MULTIMODAL_MODEL_TYPE) {
            let keys = Keys {
                map: &raw,
                origin,
                prefix: String::new(),
            };
            let text = gemma::text_config_of_multimodal(&keys)?;
            let mut cfg = Self::parse_object(text, origin, "text_config.")?;
            cfg.multimodal = true;
            return Ok(cfg);
        }
        Self::parse_object(raw, origin, "")
    }

    /// Parses the config object `raw`; `prefix` is where it sits in the file (`""` for the top
    /// level, `"text_config."` for a multimodal model's text model), for errors.
    fn parse_object(raw: Map<String, Value>, origin: &str, prefix: &str) -> Result<Self> {
        let keys = Keys {
            map: &raw,
            origin,
            prefix: prefix.to_owned(),
        };

        let model_type: String = keys.required("model_type", "a string")?;
        let exported = model_type == EXPORT_MODEL_TYPE;
        let (family_key, family_type) = if exported {
            let base: String = keys.required("base_model_type", "a string")?;
            ("base_model_type", base)
        } else {
            ("model_type", model_type)
        };
        let family = Family::from_model_type(&family_type).ok_or_else(|| {
            keys.err(
                family_key,
                &Value::from(family_type.clone()),
                "is not supported (expected llama, mistral, qwen2, qwen3, gemma3_text, or gemma3 \
                 read as its text model)",
            )
        })?;
        let d = family.defaults();

        let hidden_act: String = keys
            .not_null("hidden_act", "a string")?
            .unwrap_or("silu".into());
        // Gemma 3 reads `hidden_activation` (config/gemma.rs); its `hidden_act` is unused.
        if family != Family::Gemma3 && hidden_act != "silu" {
            return Err(keys.err(
                "hidden_act",
                &Value::from(hidden_act),
                "is not supported (expected \"silu\")",
            ));
        }

        let hidden_size = keys.positive("hidden_size", None)?;
        let num_attention_heads = keys.positive("num_attention_heads", None)?;
        let num_key_value_heads = match raw.get("num_key_value_heads") {
            // Every family's config but gemma's maps an explicit null to multi-head attention.
            Some(Value::Null) if family == Family::Gemma3 => {
                return Err(keys.err(
                    "num_key_value_heads",
                    &Value::Null,
                    "is not a positive integer",
                ));
            }
            Some(Value::Null) => num_attention_heads,
            _ => keys.positive(
                "num_key_value_heads",
                Some(d.num_key_value_heads.unwrap_or(num_attention_heads)),
            )?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(keys.err(
                "num_key_value_heads",
                &Value::from(num_key_value_heads),
                &format!("does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        let derived = || {
            if hidden_size % num_attention_heads != 0 {
                bail!(
                    "{origin}: no `head_dim` and hidden_size = {hidden_size} is not a multiple of num_attention_heads = {num_attention_heads}"
                );
            }
            Ok(hidden_size / num_attention_heads)
        };
        let head_dim = match raw.get("head_dim") {
            // qwen's and gemma's attention take a null as the width itself and fail; llama and
            // mistral derive it.
            Some(Value::Null)
                if matches!(family, Family::Qwen2 | Family::Qwen3 | Family::Gemma3) =>
            {
                return Err(keys.err("head_dim", &Value::Null, "is not a positive integer"));
            }
            Some(Value::Null) => derived()?,
            None => match d.head_dim {
                Some(default) => default,
                None => derived()?,
            },
            Some(_) => keys.positive("head_dim", None)?,
        };
        if head_dim % 2 != 0 {
            return Err(keys.err(
                "head_dim",
                &Value::from(head_dim),
                "is odd (RoPE needs pairs)",
            ));
        }

        let attention_bias: bool = keys
            .opt("attention_bias", "a boolean")?
            .unwrap_or(d.attention_bias);
        let (qkv_bias, o_proj_bias) = match family {
            Family::Llama | Family::Qwen3 | Family::Gemma3 => (attention_bias, attention_bias),
            Family::Mistral => (false, false),
            Family::Qwen2 => (true, false),
        };
        let mlp_bias =
            family == Family::Llama && keys.opt("mlp_bias", "a boolean")?.unwrap_or(d.mlp_bias);

        let sliding_window = match family {
            Family::Mistral | Family::Gemma3 => match raw.get("sliding_window") {
                None => d.sliding_window,
                Some(Value::Null) => None,
                Some(_) => Some(keys.positive("sliding_window", None)?),
            },
            Family::Qwen2 | Family::Qwen3 => {
                if keys
                    .opt("use_sliding_window", "a boolean")?
                    .unwrap_or(false)
                {
                    return Err(keys.err(
                        "use_sliding_window",
                        &Value::Bool(true),
                        "is not supported (per-layer sliding windows of qwen models are not implemented)",
                    ));
                }
                None
            }
            Family::Llama => None,
        };

        let max_position_embeddings =
            keys.positive("max_position_embeddings", Some(d.max_position_embeddings))?;
        let num_hidden_layers = keys.positive("num_hidden_layers", None)?;
        let (rope_theta, rope_scaling, layer_types, gemma) = if family == Family::Gemma3 {
            let g = gemma::parse(&keys, num_hidden_layers, d, max_position_embeddings)?;
            if sliding_window.is_none() && g.layer_types.contains(&LayerType::Sliding) {
                return Err(keys.err(
                    "sliding_window",
                    &Value::Null,
                    "is not a positive integer (layer_types has sliding_attention layers)",
                ));
            }
            (g.rope_theta, g.rope_scaling, g.layer_types, Some(g.params))
        } else {
            let (theta, scaling) = rope::parse(&keys, d, max_position_embeddings)?;
            let layer_type = match sliding_window {
                Some(_) => LayerType::Sliding,
                None => LayerType::Full,
            };
            let types = vec![layer_type; num_hidden_layers as usize];
            (theta, scaling, types, None)
        };
        let rms_norm_eps: f64 = keys
            .not_null("rms_norm_eps", "a number")?
            .unwrap_or(d.rms_norm_eps);
        if rms_norm_eps < 0.0 {
            return Err(keys.err("rms_norm_eps", &Value::from(rms_norm_eps), "is negative"));
        }

        let eos_token_ids = match raw.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(_)) => {
                keys.required("eos_token_id", "an integer or a list of integers")?
            }
            Some(_) => vec![keys.required("eos_token_id", "an integer or a list of integers")?],
        };
        let torch_dtype = match keys.opt::<String>("torch_dtype", "a string")? {
            Some(s) => Some(s),
            None => keys.opt("dtype", "a string")?,
        };

        Ok(Self {
            family,
            exported,
            multimodal: false,
            vocab_size: keys.positive("vocab_size", None)?,
            hidden_size,
            intermediate_size: keys.positive("intermediate_size", None)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            qkv_bias,
            o_proj_bias,
            mlp_bias,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            sliding_window,
            layer_types,
            gemma,
            tie_word_embeddings: keys
                .opt("tie_word_embeddings", "a boolean")?
                .unwrap_or(d.tie_word_embeddings),
            bos_token_id: keys.opt("bos_token_id", "an integer")?,
            eos_token_ids,
            torch_dtype,
            initializer_range: keys
                .opt("initializer_range", "a number")?
                .unwrap_or(d.initializer_range),
            raw,
        })
    }

    /// The config as JSON: every key of the file it was read from, with the typed fields above
    /// written over their keys (so edits to the fields are saved).
    pub fn to_json(&self) -> Value {
        let mut out = self.raw.clone();
        let family = Value::from(self.family.model_type());
        if self.exported {
            out.insert("model_type".into(), EXPORT_MODEL_TYPE.into());
            out.insert("base_model_type".into(), family);
        } else {
            out.insert("model_type".into(), family);
            out.remove("base_model_type");
        }
        let mut set = |k: &str, v: Value| {
            out.insert(k.to_string(), v);
        };
        set("vocab_size", self.vocab_size.into());
        set("hidden_size", self.hidden_size.into());
        set("intermediate_size", self.intermediate_size.into());
        set("num_hidden_layers", self.num_hidden_layers.into());
        set("num_attention_heads", self.num_attention_heads.into());
        set("num_key_value_heads", self.num_key_value_heads.into());
        set("head_dim", self.head_dim.into());
        if self.family != Family::Gemma3 {
            set("hidden_act", "silu".into());
        }
        set("rms_norm_eps", self.rms_norm_eps.into());
        set(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        set("tie_word_embeddings", self.tie_word_embeddings.into());
        set("initializer_range", self.initializer_range.into());
        match self.family {
            Family::Llama => {
                set("attention_bias", self.qkv_bias.into());
                set("mlp_bias", self.mlp_bias.into());
            }
            Family::Qwen3 | Family::Gemma3 => set("attention_bias", self.qkv_bias.into()),
            Family::Mistral => set("sliding_window", self.sliding_window.into()),
            Family::Qwen2 => {}
        }
        if self.family == Family::Gemma3 {
            set("sliding_window", self.sliding_window.into());
        }
        set("bos_token_id", self.bos_token_id.into());
        set(
            "eos_token_id",
            match self.eos_token_ids.as_slice() {
                [] => Value::Null,
                [one] => (*one).into(),
                many => many.into(),
            },
        );
        if let Some(dtype) = &self.torch_dtype {
            // Newer transformers write `dtype`, older ones `torch_dtype`: keep the file's spelling.
            let key = if self.raw.contains_key("dtype") {
                "dtype"
            } else {
                "torch_dtype"
            };
            set(key, dtype.clone().into());
        }
        match &self.gemma {
            Some(params) => gemma::write(
                &mut out,
                params,
                &self.layer_types,
                (self.rope_theta, self.rope_scaling.as_ref()),
            ),
            None => rope::write(&mut out, self.rope_theta, self.rope_scaling.as_ref()),
        }
        Value::Object(out)
    }

    /// A key of the file that the typed fields do not cover (e.g. a `linearize` section).
    pub fn extra(&self, key: &str) -> Option<&Value> {
        self.raw.get(key)
    }

    /// Sets a key written by [`ModelConfig::to_json`]; typed fields still win over their keys.
    pub fn set_extra(&mut self, key: &str, value: Value) {
        self.raw.insert(key.to_string(), value);
    }

    /// Query heads per KV head.
    pub fn gqa_groups(&self) -> i64 {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The window of layer `layer`'s attention: `sliding_window` for a sliding layer, `None`
    /// (every earlier key) for a full one.
    pub fn layer_window(&self, layer: usize) -> Option<i64> {
        match self.layer_types.get(layer) {
            Some(LayerType::Sliding) => self.sliding_window,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base(model_type: &str) -> Value {
        json!({
            "model_type": model_type,
            "vocab_size": 128256,
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "max_position_embeddings": 131072,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "torch_dtype": "bfloat16",
        })
    }

    fn with(mut v: Value, key: &str, value: Value) -> Value {
        v.as_object_mut().unwrap().insert(key.into(), value);
        v
    }

    fn parse(v: &Value) -> Result<ModelConfig> {
        ModelConfig::from_json_str(&v.to_string())
    }

    fn err(v: &Value) -> String {
        format!("{:#}", parse(v).unwrap_err())
    }

    #[test]
    fn llama32_with_llama3_rope_scaling() {
        let v = with(
            with(base("llama"), "tie_word_embeddings", json!(true)),
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        );
        let c = parse(&v).unwrap();
        assert_eq!(c.family, Family::Llama);
        assert_eq!(
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            (32, 8, 64)
        );
        assert_eq!(c.gqa_groups(), 4);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.bos_token_id, Some(128000));
        assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        assert!(!c.qkv_bias && !c.o_proj_bias && !c.mlp_bias && !c.qk_norm);
        assert_eq!(c.sliding_window, None);
    }

    #[test]
    fn llama2_defaults_and_old_style_rope_type() {
        let mut v = base("llama");
        let o = v.as_object_mut().unwrap();
        for k in [
            "num_key_value_heads",
            "rope_theta",
            "max_position_embeddings",
            "hidden_act",
        ] {
            o.remove(k);
        }
        o.insert("eos_token_id".into(), json!(2));
        o.insert("rope_scaling".into(), json!({"type": "default"}));
        o.insert("attention_bias".into(), json!(true));
        o.insert("mlp_bias".into(), json!(true));
        let c = parse(&v).unwrap();
        assert_eq!(c.num_key_value_heads, 32, "llama defaults to MHA");
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.max_position_embeddings, 2048);
        assert_eq!(c.rope_scaling, None);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert!(!c.tie_word_embeddings);
        assert!(c.qkv_bias && c.o_proj_bias && c.mlp_bias);
    }

    #[test]
    fn mistral_sliding_window_and_null_head_dim() {
        let v = with(
            with(base("mistral"), "sliding_window", json!(4096)),
            "head_dim",
            json!(null),
        );
        let c = parse(&v).unwrap();
        assert_eq!(c.family, Family::Mistral);
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.head_dim, 64);
        let c = parse(&with(base("mistral"), "sliding_window", json!(null))).unwrap();
        assert_eq!(c.sliding_window, None);
        // Mistral has no bias options: a stray key must not turn biases on.
        let c = parse(&with(base("mistral"), "attention_bias", json!(true))).unwrap();
        assert!(!c.qkv_bias && !c.o_proj_bias);
    }

    #[test]
    fn qwen2_has_qkv_bias_and_ignores_disabled_window() {
        let v = with(
            with(
                with(base("qwen2"), "use_sliding_window", json!(false)),
                "sliding_window",
                json!(32768),
            ),
            "eos_token_id",
            json!(151645),
        );
        let c = parse(&v).unwrap();
        assert_eq!(c.family, Family::Qwen2);
        assert!(c.qkv_bias && !c.o_proj_bias && !c.qk_norm);
        assert_eq!(c.sliding_window, None);
    }

    #[test]
    fn qwen3_has_qk_norm_and_explicit_head_dim() {
        let v = with(
            with(base("qwen3"), "head_dim", json!(128)),
            "attention_bias",
            json!(false),
        );
        let c = parse(&v).unwrap();
        assert_eq!(c.family, Family::Qwen3);
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!(c.head_dim, 128);
    }

    #[test]
    fn newer_dtype_key_is_read() {
        let mut v = base("qwen3");
        let o = v.as_object_mut().unwrap();
        o.remove("torch_dtype");
        o.insert("dtype".into(), json!("float32"));
        assert_eq!(parse(&v).unwrap().torch_dtype.as_deref(), Some("float32"));
    }

    #[test]
    fn round_trip_keeps_extra_keys_and_edits() {
        let v = with(
            base("llama"),
            "linearize",
            json!({"layers": ["lolcats-sw"]}),
        );
        let mut c = parse(&v).unwrap();
        assert_eq!(
            c.extra("linearize"),
            Some(&json!({"layers": ["lolcats-sw"]}))
        );
        c.torch_dtype = Some("float32".into());
        c.set_extra("architectures", json!(["LlamaForCausalLM"]));
        let back = ModelConfig::from_json_str(&c.to_json().to_string()).unwrap();
        assert_eq!(back.torch_dtype.as_deref(), Some("float32"));
        assert_eq!(
            back.extra("architectures"),
            Some(&json!(["LlamaForCausalLM"]))
        );
        let mut expected = c.clone();
        expected.raw = back.raw.clone();
        assert_eq!(back, expected);
    }

    #[test]
    fn exports_keep_their_model_type_and_name_the_family() {
        let v = with(
            with(base("qwen3"), "model_type", json!(EXPORT_MODEL_TYPE)),
            "base_model_type",
            json!("qwen3"),
        );
        let c = parse(&v).unwrap();
        assert!(c.exported && c.qk_norm);
        assert_eq!(c.family, Family::Qwen3);
        let back = c.to_json();
        assert_eq!(back["model_type"], json!("linearize"));
        assert_eq!(back["base_model_type"], json!("qwen3"));
        let mut plain = c.clone();
        plain.exported = false;
        let back = plain.to_json();
        assert_eq!(back["model_type"], json!("qwen3"));
        assert!(back.get("base_model_type").is_none());

        let e = err(&with(base("llama"), "model_type", json!("linearize")));
        assert!(e.contains("missing key `base_model_type`"), "{e}");
        let e = err(&with(
            with(base("llama"), "model_type", json!("linearize")),
            "base_model_type",
            json!("gpt2"),
        ));
        assert!(
            e.contains("base_model_type") && e.contains("\"gpt2\""),
            "{e}"
        );
    }

    #[test]
    fn unknown_model_type_is_named() {
        let e = err(&base("gpt2"));
        assert!(e.contains("model_type") && e.contains("\"gpt2\""), "{e}");
    }

    #[test]
    fn unsupported_activation_is_named() {
        let e = err(&with(base("llama"), "hidden_act", json!("gelu")));
        assert!(e.contains("hidden_act") && e.contains("\"gelu\""), "{e}");
    }

    #[test]
    fn unsupported_rope_scaling_is_named() {
        let e = err(&with(
            base("qwen2"),
            "rope_scaling",
            json!({"type": "su", "factor": 4.0}),
        ));
        assert!(
            e.contains("rope_scaling.type") && e.contains("\"su\""),
            "{e}"
        );
        let e = err(&with(
            base("llama"),
            "rope_parameters",
            json!({"rope_type": "longrope", "rope_theta": 500000.0, "short_factor": [1.0], "long_factor": [1.0]}),
        ));
        assert!(
            e.contains("rope_parameters.rope_type") && e.contains("\"longrope\""),
            "{e}"
        );
        let e = err(&with(
            base("llama"),
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": 8.0}),
        ));
        assert!(e.contains("rope_scaling.low_freq_factor"), "{e}");
        let e = err(&with(
            base("llama"),
            "rope_scaling",
            json!({"rope_type": "linear"}),
        ));
        assert!(e.contains("missing key `rope_scaling.factor`"), "{e}");
    }

    /// transformers 5 writes `rope_parameters` and no top-level `rope_theta`: the theta inside
    /// must be the one used (it used to fall back to 10000 in silence).
    #[test]
    fn transformers5_rope_parameters_are_read() {
        let mut v = base("llama");
        v.as_object_mut().unwrap().remove("rope_theta");
        let v = with(
            v,
            "rope_parameters",
            json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}),
        );
        let c = parse(&v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0)
        );
        // Written back in the same format.
        let back = c.to_json();
        assert_eq!(back["rope_parameters"]["rope_theta"], 500000.0);
        assert!(back.get("rope_theta").is_none() && back.get("rope_scaling").is_none());

        let mut v = base("qwen2");
        v.as_object_mut().unwrap().remove("rope_theta");
        let v = with(
            v,
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 1000000.0}),
        );
        let c = parse(&v).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (1000000.0, None));
    }

    #[test]
    fn ambiguous_rope_keys_are_refused() {
        // Two thetas that disagree.
        let v = with(
            base("llama"),
            "rope_parameters",
            json!({"rope_type": "default", "rope_theta": 10000.0}),
        );
        let e = err(&v);
        assert!(
            e.contains("`rope_theta`") && e.contains("rope_parameters.rope_theta"),
            "{e}"
        );
        // A theta inside `rope_scaling` that transformers 4 would not read.
        let mut v = base("llama");
        v.as_object_mut().unwrap().remove("rope_theta");
        let e = err(&with(
            v,
            "rope_scaling",
            json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}),
        ));
        assert!(e.contains("rope_scaling.rope_theta"), "{e}");
        // Both sections, different.
        let v = with(
            with(
                base("llama"),
                "rope_scaling",
                json!({"rope_type": "linear", "factor": 2.0}),
            ),
            "rope_parameters",
            json!({"rope_type": "linear", "factor": 4.0}),
        );
        assert!(err(&v).contains("rope_parameters"));
        // A key no transformers reads, and a partial rotary embedding.
        let e = err(&with(
            base("llama"),
            "rope_scaling",
            json!({"rope_type": "linear", "factr": 2.0}),
        ));
        assert!(e.contains("rope_scaling.factr"), "{e}");
        let e = err(&with(base("qwen3"), "partial_rotary_factor", json!(0.5)));
        assert!(e.contains("partial_rotary_factor"), "{e}");
        let e = err(&with(base("llama"), "rope_theta", json!(null)));
        assert!(e.contains("rope_theta"), "{e}");
    }

    #[test]
    fn family_defaults_for_left_out_keys() {
        let minimal = |model_type: &str| {
            json!({"model_type": model_type, "vocab_size": 16, "hidden_size": 512,
                   "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 32})
        };
        let c = parse(&minimal("mistral")).unwrap();
        assert_eq!(
            c.sliding_window,
            Some(4096),
            "mistral's window when the key is absent"
        );
        assert_eq!(c.num_key_value_heads, 8);
        let c = parse(&with(
            minimal("mistral"),
            "num_key_value_heads",
            json!(null),
        ))
        .unwrap();
        assert_eq!(c.num_key_value_heads, 32, "null is multi-head attention");
        let c = parse(&minimal("qwen3")).unwrap();
        assert_eq!(
            c.head_dim, 128,
            "qwen3's heads are not hidden_size / heads wide"
        );
        assert!(err(&with(minimal("qwen3"), "head_dim", json!(null))).contains("head_dim"));
        for (family, d) in DEFAULTS {
            let c = parse(&minimal(family.model_type())).unwrap();
            assert_eq!(
                (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings),
                (d.rope_theta, d.rms_norm_eps, d.max_position_embeddings),
                "{family}"
            );
        }
    }

    fn gemma3() -> Value {
        json!({"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640,
               "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
               "num_key_value_heads": 1, "head_dim": 256, "sliding_window": 512,
               "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
               "query_pre_attn_scalar": 256})
    }

    #[test]
    fn gemma3_layer_types_from_the_pattern_and_the_list() {
        let c = parse(&gemma3()).unwrap();
        assert_eq!(c.family, Family::Gemma3);
        // transformers' default pattern: every sixth layer global.
        let full: Vec<usize> = (0..18).filter(|&i| c.layer_window(i).is_none()).collect();
        assert_eq!(full, [5, 11, 17]);
        assert_eq!(c.layer_window(0), Some(512));
        assert!(c.tie_word_embeddings && c.qk_norm && !c.qkv_bias);
        let g = c.gemma.as_ref().unwrap();
        assert_eq!(
            (
                g.local_rope_theta,
                g.query_pre_attn_scalar,
                g.final_logit_softcapping
            ),
            (10000.0, 256.0, None)
        );
        let c = parse(&with(gemma3(), "sliding_window_pattern", json!(2))).unwrap();
        assert_eq!(
            c.layer_types[..3],
            [LayerType::Sliding, LayerType::Full, LayerType::Sliding]
        );
        let mut types = vec!["full_attention"; 18];
        types[3] = "sliding_attention";
        let c = parse(&with(gemma3(), "layer_types", json!(types))).unwrap();
        assert_eq!(c.layer_window(3), Some(512));
        assert_eq!(c.layer_window(5), None);
        assert_eq!(c.layer_window(0), None);
    }

    #[test]
    fn gemma3_keys_that_change_the_math_are_read_or_refused() {
        let e = err(&with(gemma3(), "attn_logit_softcapping", json!(50.0)));
        assert!(e.contains("attn_logit_softcapping"), "{e}");
        let e = err(&with(gemma3(), "hidden_activation", json!("gelu")));
        assert!(
            e.contains("hidden_activation") && e.contains("\"gelu\""),
            "{e}"
        );
        let e = err(&with(gemma3(), "use_bidirectional_attention", json!(true)));
        assert!(e.contains("use_bidirectional_attention"), "{e}");
        let e = err(&with(gemma3(), "layer_types", json!(["full_attention"])));
        assert!(e.contains("layer_types") && e.contains("1 entries"), "{e}");
        let e = err(&with(gemma3(), "layer_types", json!(vec!["chunked"; 18])));
        assert!(e.contains("\"chunked\""), "{e}");
        let e = err(&with(gemma3(), "sliding_window", json!(null)));
        assert!(e.contains("sliding_window"), "{e}");
        let e = err(&with(gemma3(), "query_pre_attn_scalar", json!(null)));
        assert!(e.contains("query_pre_attn_scalar"), "{e}");
        let c = parse(&with(gemma3(), "final_logit_softcapping", json!(30.0))).unwrap();
        assert_eq!(c.gemma.unwrap().final_logit_softcapping, Some(30.0));
        // transformers 5's per-layer-type RoPE beside a 4.x `rope_scaling`: ambiguous.
        let v5 = with(
            gemma3(),
            "rope_parameters",
            json!({"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        );
        let e = err(&with(
            v5.clone(),
            "rope_scaling",
            json!({"rope_type": "linear", "factor": 2.0}),
        ));
        assert!(e.contains("rope_scaling"), "{e}");
        let e = err(&with(
            v5.clone(),
            "rope_parameters",
            json!({"rope_type": "default"}),
        ));
        assert!(
            e.contains("rope_parameters") && e.contains("per layer type"),
            "{e}"
        );
        let e = err(&with(
            v5.clone(),
            "rope_parameters",
            json!({"full_attention": {"rope_type": "linear", "factr": 8.0}}),
        ));
        assert!(e.contains("rope_parameters.full_attention.factr"), "{e}");
        let c = parse(&v5).unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
    }

    #[test]
    fn gemma3_round_trips_in_both_rope_formats() {
        let v4 = with(
            gemma3(),
            "rope_scaling",
            json!({"rope_type": "linear", "factor": 8.0}),
        );
        let mut v5 = gemma3();
        for k in ["rope_theta", "rope_local_base_freq"] {
            v5.as_object_mut().unwrap().remove(k);
        }
        let v5 = with(
            v5,
            "rope_parameters",
            json!({"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        );
        let (a, b) = (parse(&v4).unwrap(), parse(&v5).unwrap());
        for c in [&a, &b] {
            let json = c.to_json();
            assert!(json.get("hidden_act").is_none());
            let back = ModelConfig::from_json_str(&json.to_string()).unwrap();
            assert_eq!(
                (
                    back.rope_theta,
                    back.rope_scaling,
                    &back.layer_types,
                    &back.gemma
                ),
                (c.rope_theta, c.rope_scaling, &c.layer_types, &c.gemma)
            );
        }
        assert_eq!(
            (a.rope_theta, a.rope_scaling),
            (b.rope_theta, b.rope_scaling)
        );
        assert_eq!(a.layer_types, b.layer_types);
        assert!(b.to_json()["rope_parameters"]["sliding_attention"].is_object());
        assert!(a.to_json().get("rope_parameters").is_none());
    }

    #[test]
    fn multimodal_gemma3_is_its_text_config_and_writes_back_the_text_model() {
        let v = json!({"model_type": "gemma3", "text_config": gemma3(), "torch_dtype": "bfloat16",
                       "vision_config": {"hidden_size": 1152}, "mm_tokens_per_image": 256});
        let c = parse(&v).unwrap();
        let text = parse(&gemma3()).unwrap();
        assert!(c.multimodal && !text.multimodal);
        assert_eq!(
            (&c.layer_types, &c.gemma, c.vocab_size, c.head_dim),
            (
                &text.layer_types,
                &text.gemma,
                text.vocab_size,
                text.head_dim
            )
        );
        let json = c.to_json();
        assert_eq!(json["model_type"], json!("gemma3_text"));
        assert!(json.get("vision_config").is_none() && json.get("text_config").is_none());
        let back = ModelConfig::from_json_str(&json.to_string()).unwrap();
        let mut expected = c.clone();
        expected.multimodal = false;
        expected.raw = back.raw.clone();
        assert_eq!(back, expected);
    }

    #[test]
    fn qwen_sliding_window_is_refused() {
        let e = err(&with(base("qwen2"), "use_sliding_window", json!(true)));
        assert!(e.contains("use_sliding_window"), "{e}");
    }

    #[test]
    fn bad_shapes_are_named() {
        let e = err(&with(base("llama"), "num_key_value_heads", json!(5)));
        assert!(e.contains("num_key_value_heads") && e.contains('5'), "{e}");
        let e = err(&with(base("llama"), "hidden_size", json!("big")));
        assert!(e.contains("hidden_size") && e.contains("\"big\""), "{e}");
        let e = err(&with(base("llama"), "vocab_size", json!(0)));
        assert!(e.contains("vocab_size"), "{e}");
        let mut v = base("llama");
        v.as_object_mut().unwrap().remove("intermediate_size");
        let e = err(&v);
        assert!(e.contains("missing key `intermediate_size`"), "{e}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let e = format!("{:#}", ModelConfig::from_file(&path).unwrap_err());
        assert!(e.contains("config.json"), "{e}");
        std::fs::write(
            &path,
            with(base("llama"), "hidden_act", json!("relu")).to_string(),
        )
        .unwrap();
        let e = format!("{:#}", ModelConfig::from_file(&path).unwrap_err());
        assert!(
            e.contains(&path.display().to_string()) && e.contains("hidden_act"),
            "{e}"
        );
    }
}
