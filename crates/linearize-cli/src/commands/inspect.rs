//! `linearize inspect --model M [--json]`: what a model is, read from its config.json and the
//! checkpoint headers (no weights are loaded), and whether the checkpoint matches the config.
use anyhow::{bail, Result};
use linearize_models::config::ModelConfig;
use linearize_models::llama::{extra_tensor, parameter_shapes};
use linearize_models::weights::{self, Checkpoint};
use serde_json::{json, Value};
use std::path::Path;

#[derive(clap::Args)]
pub struct Args {
    /// The model, as a recipe's `model.source`: a local Hugging Face-layout directory, a hub id
    /// `org/name[@revision]`, `offline:smollm2` or `random:DIR` (DIR's config).
    #[arg(long)]
    pub model: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let dir = crate::recipe::resolve_model(&args.model)?;
    let (summary, problem) = describe(&dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", render(&summary));
    }
    match problem {
        Some(problem) => bail!(
            "the checkpoint in {} does not match its config: {problem}",
            dir.display()
        ),
        None => Ok(()),
    }
}

/// The description of the model in `dir` as JSON, and what is wrong with its checkpoint, if
/// anything (the config alone still describes the model then).
fn describe(dir: &Path) -> Result<(Value, Option<String>)> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let shapes = parameter_shapes(&cfg);
    let params: i64 = shapes.values().map(|s| s.iter().product::<i64>()).sum();
    let (checkpoint, problem) = match Checkpoint::open(dir) {
        Ok(ckpt) => {
            let problem = weights::check(&ckpt, &shapes, &|name, shape| {
                extra_tensor(&cfg, name, shape)
            })
            .err()
            .map(|e| format!("{e:#}"));
            let summary = json!({
                "files": ckpt.files().len(),
                "bytes": ckpt.data_bytes(),
                "elements_by_dtype": ckpt.dtype_counts(),
                "matches_config": problem.is_none(),
            });
            (summary, problem)
        }
        Err(e) => (Value::Null, Some(format!("{e:#}"))),
    };
    let rope_scaling = cfg.rope_scaling.map_or(Value::Null, |s| s.to_json());
    let summary = json!({
        "path": dir.display().to_string(),
        "model_type": cfg.family.model_type(),
        "architectures": cfg.extra("architectures"),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rope": {
            "theta": cfg.rope_theta,
            "scaling": rope_scaling,
            "max_position_embeddings": cfg.max_position_embeddings,
        },
        "sliding_window": cfg.sliding_window,
        "qkv_bias": cfg.qkv_bias,
        "o_proj_bias": cfg.o_proj_bias,
        "mlp_bias": cfg.mlp_bias,
        "qk_norm": cfg.qk_norm,
        "tied_embeddings": cfg.tie_word_embeddings,
        "parameters": params,
        "config_dtype": cfg.torch_dtype,
        "memory_bytes": { "f32": params * 4, "bf16": params * 2, "f16": params * 2 },
        "checkpoint": checkpoint,
        "linearize": cfg.extra("linearize"),
    });
    Ok((summary, problem))
}

/// The text form of [`describe`]'s JSON.
fn render(s: &Value) -> String {
    let int = |key: &str| s[key].as_i64().unwrap_or_default();
    let mut lines = vec![("model", s["path"].as_str().unwrap_or_default().to_string())];
    let arch = s["architectures"]
        .as_array()
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    let family = s["model_type"].as_str().unwrap_or_default();
    lines.push((
        "family",
        arch.map_or(family.to_string(), |a| format!("{family} ({a})")),
    ));
    lines.push(("layers", int("layers").to_string()));
    lines.push((
        "hidden",
        format!("{} (mlp {})", int("hidden_size"), int("intermediate_size")),
    ));
    let (heads, kv) = (int("attention_heads"), int("kv_heads"));
    let gqa = if kv < heads {
        format!(", GQA groups of {}", heads / kv)
    } else {
        String::new()
    };
    lines.push((
        "heads",
        format!("{heads} query / {kv} kv{gqa}, head_dim {}", int("head_dim")),
    ));
    lines.push(("vocab", int("vocab_size").to_string()));
    let rope = &s["rope"];
    let scaling = match rope["scaling"].as_object() {
        None => "no scaling".to_string(),
        Some(sc) => {
            let params: Vec<String> = sc
                .iter()
                .filter(|(k, _)| *k != "rope_type")
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            format!(
                "{} scaling ({})",
                sc["rope_type"].as_str().unwrap_or_default(),
                params.join(", ")
            )
        }
    };
    lines.push((
        "rope",
        format!(
            "theta {}, {scaling}, max positions {}",
            rope["theta"], rope["max_position_embeddings"]
        ),
    ));
    let mut attention = match s["sliding_window"].as_i64() {
        Some(w) => format!("causal, sliding window {w}"),
        None => "causal, full".to_string(),
    };
    for (key, what) in [
        ("qkv_bias", "q/k/v bias"),
        ("o_proj_bias", "o_proj bias"),
        ("qk_norm", "q/k RMSNorm"),
    ] {
        if s[key].as_bool() == Some(true) {
            attention += &format!(", {what}");
        }
    }
    if s["mlp_bias"].as_bool() == Some(true) {
        attention += ", MLP bias";
    }
    lines.push(("attention", attention));
    let tied = s["tied_embeddings"].as_bool() == Some(true);
    lines.push((
        "embeddings",
        if tied {
            "tied (lm_head = embed_tokens)"
        } else {
            "untied"
        }
        .into(),
    ));
    let params = int("parameters");
    lines.push((
        "parameters",
        format!("{} ({params})", human(params as f64, "")),
    ));
    let mem = &s["memory_bytes"];
    let bytes = |k: &str| human(mem[k].as_i64().unwrap_or_default() as f64, "B");
    lines.push((
        "memory",
        format!("{} in f32, {} in bf16/f16", bytes("f32"), bytes("bf16")),
    ));
    lines.push((
        "config dtype",
        s["config_dtype"]
            .as_str()
            .unwrap_or("not given")
            .to_string(),
    ));
    let ckpt = &s["checkpoint"];
    let checkpoint = match ckpt.as_object() {
        None => "none found".to_string(),
        Some(c) => {
            let dtypes: Vec<String> = c["elements_by_dtype"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(dtype, n)| format!("{dtype} {}", human(n.as_f64().unwrap_or_default(), "")))
                .collect();
            format!(
                "{} on disk in {} file(s); {}; {}",
                human(c["bytes"].as_f64().unwrap_or_default(), "B"),
                c["files"],
                dtypes.join(", "),
                if c["matches_config"].as_bool() == Some(true) {
                    "matches the config"
                } else {
                    "DOES NOT match the config"
                }
            )
        }
    };
    lines.push(("checkpoint", checkpoint));
    if let Some(linearize) = s["linearize"].as_object() {
        lines.push(("linearize", Value::Object(linearize.clone()).to_string()));
    }
    lines.iter().map(|(k, v)| format!("{k:<13}{v}\n")).collect()
}

/// 134515008 -> "134.5M", with a unit: 269030016 B -> "269.0 MB".
fn human(x: f64, unit: &str) -> String {
    let (scaled, prefix) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(scale, _)| x >= *scale)
        .map_or((x, ""), |(scale, p)| (x / scale, p));
    let number = if prefix.is_empty() {
        format!("{scaled}")
    } else {
        format!("{scaled:.1}")
    };
    match unit {
        "" => format!("{number}{prefix}"),
        unit => format!("{number} {prefix}{unit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../linearize-models/tests/fixtures")
            .join(name)
    }

    #[test]
    fn describes_a_sharded_tied_llama3_model() {
        let (s, problem) = describe(&fixture("llama3_tied_sharded")).unwrap();
        assert_eq!(problem, None);
        assert_eq!(s["model_type"], "llama");
        assert_eq!(
            (
                s["layers"].as_i64(),
                s["kv_heads"].as_i64(),
                s["head_dim"].as_i64()
            ),
            (Some(2), Some(2), Some(8))
        );
        assert_eq!(s["rope"]["scaling"]["rope_type"], "llama3");
        assert_eq!(s["tied_embeddings"], true);
        // 128*32 embedding + 2 layers * (2*32 norms + 32*32*2 q/o + 32*16*2 k/v + 3*32*64 mlp) + 32
        let params = 128 * 32 + 2 * (64 + 2048 + 1024 + 6144) + 32;
        assert_eq!(s["parameters"], params);
        assert_eq!(s["memory_bytes"]["f32"], params * 4);
        assert_eq!(s["checkpoint"]["files"], 2);
        assert_eq!(s["checkpoint"]["bytes"], params * 4);
        assert_eq!(s["checkpoint"]["elements_by_dtype"]["F32"], params);
        let text = render(&s);
        assert!(
            text.contains("llama (LlamaForCausalLM)") && text.contains("llama3 scaling"),
            "{text}"
        );
        assert!(
            text.contains("4 query / 2 kv, GQA groups of 2") && text.contains("matches the config"),
            "{text}"
        );
    }

    #[test]
    fn reports_a_checkpoint_that_does_not_match() {
        // The CLI crate has no tempfile dependency: a scratch directory of this test's own.
        let dir =
            std::env::temp_dir().join(format!("linearize-inspect-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let cfg = std::fs::read_to_string(fixture("qwen3_bf16").join("config.json")).unwrap();
        std::fs::write(
            dir.as_path().join("config.json"),
            cfg.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 3"),
        )
        .unwrap();
        let (s, problem) = describe(dir.as_path()).unwrap();
        assert_eq!(s["checkpoint"], Value::Null);
        assert!(problem.unwrap().contains("no model.safetensors"));
        std::fs::copy(
            fixture("qwen3_bf16").join("model.safetensors"),
            dir.as_path().join("model.safetensors"),
        )
        .unwrap();
        let (s, problem) = describe(dir.as_path()).unwrap();
        assert_eq!(
            (s["layers"].as_i64(), s["qk_norm"].as_bool()),
            (Some(3), Some(true))
        );
        assert_eq!(s["checkpoint"]["matches_config"], false);
        assert!(problem.unwrap().contains("missing tensor model.layers.2."));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn human_numbers() {
        assert_eq!(human(134_515_008.0, ""), "134.5M");
        assert_eq!(human(269_030_016.0, "B"), "269.0 MB");
        assert_eq!(human(512.0, "B"), "512 B");
    }
}
