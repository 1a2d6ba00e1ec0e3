//! `linearize inspect --model M [--json]`: what a model is, read from its config.json and the
//! checkpoint headers (no weights are loaded), and whether the checkpoint matches the config.
use anyhow::{bail, Result};
use linearize_attention::linearized::Method;
use linearize_models::config::ModelConfig;
use linearize_models::llama::{extra_tensor, parameter_shapes, Model};
use linearize_models::multimodal;
use linearize_models::weights;
use linearize_train::export::LinearizeSection;
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
    let config_path = dir.join("config.json");
    let cfg = ModelConfig::from_file(&config_path)?;
    let shapes = parameter_shapes(&cfg);
    let params: i64 = shapes.values().map(|s| s.iter().product::<i64>()).sum();
    // A linearize export: its `linearize` section says which layers run which attention; the
    // converted layers' trained tensors sit in the checkpoint beside the base weights.
    let origin = config_path.display().to_string();
    let num_layers = cfg.num_hidden_layers as usize;
    let plan = match LinearizeSection::of_config(&cfg, &origin)? {
        Some(section) => section
            .conversion(&cfg.layer_types, &origin)?
            .map(|c| c.plan(&cfg.layer_types))
            .transpose()?,
        None => None,
    };
    let converted_prefixes: Vec<String> = plan
        .iter()
        .flatten()
        .enumerate()
        .filter(|(_, a)| a.method != Method::Softmax)
        .map(|(i, _)| format!("{}.self_attn.", Model::layer_prefix(i)))
        .collect();
    let trained = |name: &str| {
        !shapes.contains_key(name) && converted_prefixes.iter().any(|p| name.starts_with(p))
    };
    let (checkpoint, problem) = match multimodal::open_checkpoint(dir, &cfg) {
        Ok(ckpt) => {
            let problem = weights::check(&ckpt, &shapes, &|name, shape| {
                Ok(trained(name) || extra_tensor(&cfg, name, shape)?)
            })
            .err()
            .map(|e| format!("{e:#}"));
            let trained_names: Vec<&str> = ckpt.names().filter(|n| trained(n)).collect();
            let trained_elements: i64 = trained_names
                .iter()
                .filter_map(|n| ckpt.info(n))
                .map(|t| t.shape.iter().product::<i64>())
                .sum();
            let summary = json!({
                "files": ckpt.files().len(),
                "bytes": ckpt.data_bytes(),
                "elements_by_dtype": ckpt.dtype_counts(),
                "matches_config": problem.is_none(),
                "trained_tensors": trained_names.len(),
                "trained_elements": trained_elements,
            });
            (summary, problem)
        }
        Err(e) => (Value::Null, Some(format!("{e:#}"))),
    };
    // Per token of context: softmax layers keep K and V (kv_heads x head_dim each, in the
    // config's dtype, bf16 if it names none); converted layers keep a state of fixed size.
    let dtype_bytes = match cfg.torch_dtype.as_deref() {
        Some("float32") => 4,
        _ => 2,
    };
    let methods: Vec<String> = match &plan {
        Some(plan) => plan.iter().map(|a| a.name()).collect(),
        None => vec!["softmax".into(); num_layers],
    };
    let softmax_layers = match &plan {
        Some(plan) => plan.iter().filter(|a| a.method == Method::Softmax).count(),
        None => num_layers,
    } as i64;
    let kv_bytes_per_token =
        softmax_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes;
    let rope_scaling = cfg.rope_scaling.map_or(Value::Null, |s| s.to_json());
    let summary = json!({
        "path": dir.display().to_string(),
        "model_type": cfg.family.model_type(),
        "multimodal": cfg.multimodal,
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
        "methods_per_layer": methods,
        "kv_cache_bytes_per_token": kv_bytes_per_token,
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
    let family = if s["multimodal"] == true {
        format!("{family} (the text model of a multimodal gemma3; its vision tower is skipped)")
    } else {
        arch.map_or(family.to_string(), |a| format!("{family} ({a})"))
    };
    lines.push(("family", family));
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
            // A multimodal checkpoint is read, and counted, as its text model's tensors.
            let part = if s["multimodal"] == true {
                " (the text model's tensors)"
            } else {
                ""
            };
            format!(
                "{}{part} on disk in {} file(s); {}; {}",
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
    let methods: Vec<&str> = s["methods_per_layer"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    lines.push(("methods", layer_runs(&methods)));
    lines.push((
        "KV cache",
        format!(
            "{} per token (softmax layers; converted layers keep a fixed-size state)",
            human(
                s["kv_cache_bytes_per_token"].as_f64().unwrap_or_default(),
                "B"
            )
        ),
    ));
    if let Some(n) = ckpt["trained_tensors"].as_i64().filter(|n| *n > 0) {
        lines.push((
            "trained",
            format!(
                "{n} tensors of the converted layers ({} values)",
                human(ckpt["trained_elements"].as_f64().unwrap_or_default(), "")
            ),
        ));
    }
    if let Some(linearize) = s["linearize"].as_object() {
        lines.push(("linearize", Value::Object(linearize.clone()).to_string()));
    }
    lines.iter().map(|(k, v)| format!("{k:<13}{v}\n")).collect()
}

/// Per-layer methods as runs: `layers 0-27 lolcats-sw64+hedgehog64, 28-29 softmax`.
fn layer_runs(methods: &[&str]) -> String {
    let mut runs: Vec<(usize, usize, &str)> = Vec::new();
    for (i, m) in methods.iter().enumerate() {
        match runs.last_mut() {
            Some((_, end, last)) if last == m => *end = i,
            _ => runs.push((i, i, m)),
        }
    }
    let parts: Vec<String> = runs
        .iter()
        .map(|(a, b, m)| {
            if a == b {
                format!("{a} {m}")
            } else {
                format!("{a}-{b} {m}")
            }
        })
        .collect();
    format!("layers {}", parts.join(", "))
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
    fn describes_the_text_model_of_a_multimodal_gemma3() {
        for name in ["gemma3_mm", "transformers5/gemma3_mm"] {
            let (s, problem) = describe(&fixture(name)).unwrap();
            assert_eq!(problem, None, "{name}");
            assert_eq!(
                (&s["model_type"], &s["multimodal"]),
                (&"gemma3_text".into(), &true.into())
            );
            // The checkpoint as read: the language model's tensors, the vision tower's left out.
            assert_eq!(
                s["checkpoint"]["elements_by_dtype"]["F32"], s["parameters"],
                "{name}"
            );
            let text = render(&s);
            assert!(text.contains("text model of a multimodal gemma3"), "{text}");
            assert!(
                text.contains("(the text model's tensors) on disk"),
                "{text}"
            );
        }
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
