//! The Hugging Face transformers code every export carries: `configuration_linearize.py` and
//! `modeling_linearize.py` from the repository's `python/linearize_hf/` (the one source),
//! compiled into the binary, and the `config.json` keys that make transformers load them
//! (`architectures`, `auto_map`) while a stock loader refuses the export (`model_type`).
use serde_json::{json, Value};

/// The architecture name of every export.
pub const ARCHITECTURE: &str = "LinearizeForCausalLM";

/// `(file name, contents)` of the modeling code copied into an export.
pub const FILES: [(&str, &str); 2] = [
    (
        "configuration_linearize.py",
        include_str!("../../../../python/linearize_hf/configuration_linearize.py"),
    ),
    (
        "modeling_linearize.py",
        include_str!("../../../../python/linearize_hf/modeling_linearize.py"),
    ),
];

/// `architectures` of an export's config.json.
pub fn architectures() -> Value {
    json!([ARCHITECTURE])
}

/// `auto_map` of an export's config.json: the classes `trust_remote_code=True` loads.
pub fn auto_map() -> Value {
    json!({
        "AutoConfig": "configuration_linearize.LinearizeConfig",
        "AutoModel": "modeling_linearize.LinearizeModel",
        "AutoModelForCausalLM": "modeling_linearize.LinearizeForCausalLM",
    })
}
