//! Multimodal Gemma 3 checkpoints (`Gemma3ForConditionalGeneration`) loaded as their text model,
//! on the `gemma3_mm` fixtures of `scripts/make_model_fixtures.py` (saved by transformers 4.57
//! and 5): the other tensor layout, transformers' defaults for what `text_config` leaves out, and
//! damaged copies. tests/parity.rs compares the stored fixtures' logits with transformers'.
mod common;

use common::{fixture, max_diff, reference};
use linearize_models::config::{ModelConfig, GEMMA3_TEXT_DEFAULTS};
use linearize_models::llama::Model;
use serde_json::{json, Value};
use std::fs;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const FIXTURES: [&str; 2] = ["gemma3_mm", "transformers5/gemma3_mm"];

/// Every tensor of a fixture's (sharded) checkpoint.
fn tensors(name: &str) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap();
        if file.starts_with("model-") && file.ends_with(".safetensors") {
            out.extend(Tensor::read_safetensors(&path).unwrap());
        }
    }
    out
}

/// A directory with the fixture's config (edited by `config`) and `tensors` in one file.
fn model_dir(
    name: &str,
    tensors: &[(String, Tensor)],
    config: impl FnOnce(&mut Value),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg: Value =
        serde_json::from_str(&fs::read_to_string(fixture(name).join("config.json")).unwrap())
            .unwrap();
    config(&mut cfg);
    fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    let err = match Model::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    };
    assert!(!err.contains('\n'), "not one line: {err}");
    err
}

/// Checkpoints that hold the language model as transformers 4.52+ keeps it in memory
/// (`model.language_model.`, `model.vision_tower.`, a top-level `lm_head`) load as well, to the
/// same logits; a saved LM head of the tied model is accepted.
#[test]
fn the_in_memory_layout_loads_to_the_same_logits() {
    for name in FIXTURES {
        let renamed: Vec<(String, Tensor)> = tensors(name)
            .into_iter()
            .map(|(n, t)| {
                let n = match n.strip_prefix("language_model.model.") {
                    Some(rest) => format!("model.language_model.{rest}"),
                    None => format!("model.{n}"),
                };
                (n, t)
            })
            .collect();
        let embed = renamed
            .iter()
            .find(|(n, _)| n == "model.language_model.embed_tokens.weight")
            .unwrap()
            .1
            .copy();
        let mut with_head = renamed;
        with_head.push(("lm_head.weight".into(), embed));
        let dir = model_dir(name, &with_head, |_| {});
        let model = Model::load(dir.path(), Device::Cpu, Kind::Float)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let (ids, want) = reference(name);
        let got = tch::no_grad(|| model.forward(&ids, None)).unwrap();
        let diff = max_diff(&got, &want);
        assert!(diff <= 1e-4, "{name}: max |logit diff| = {diff}");
    }
}

/// A multimodal config saves its text model as the difference from Gemma3TextConfig's defaults:
/// ours are the ones transformers 4.57 and 5 recorded, and a `text_config` that leaves the keys
/// out gets them.
#[test]
fn left_out_text_config_keys_take_transformers_defaults() {
    for name in FIXTURES {
        let recorded: Value = serde_json::from_str(
            &fs::read_to_string(fixture(name).join("text_config_defaults.json")).unwrap(),
        )
        .unwrap();
        for (key, value) in GEMMA3_TEXT_DEFAULTS {
            assert_eq!(recorded[key], json!(value), "{name}: {key}");
        }
        assert_eq!(recorded["tie_word_embeddings"], json!(true), "{name}");
    }
    let cfg = ModelConfig::from_json_str(
        &json!({"model_type": "gemma3", "text_config": {"hidden_size": 2560,
                "intermediate_size": 10240, "model_type": "gemma3_text", "num_hidden_layers": 34,
                "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
                "eos_token_id": [1, 106], "torch_dtype": "bfloat16", "vision_config": {},
                // At the top level, where transformers ignores it, but what text_config means.
                "vocab_size": 262_208})
        .to_string(),
    )
    .unwrap();
    assert!(cfg.multimodal && cfg.tie_word_embeddings);
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads
        ),
        (262_208, 8, 4)
    );
    assert_eq!((cfg.head_dim, cfg.sliding_window), (256, Some(1024)));
    assert_eq!(cfg.layer_window(5), None);
    // The top level's token ids and dtype, as transformers' generation reads them.
    assert_eq!(
        (cfg.eos_token_ids.as_slice(), cfg.bos_token_id),
        (&[1, 106][..], Some(2))
    );
    assert_eq!(cfg.torch_dtype.as_deref(), Some("bfloat16"));
}

#[test]
fn a_config_without_text_config_is_refused_by_key() {
    let name = FIXTURES[0];
    let dir = model_dir(name, &tensors(name), |c| {
        c.as_object_mut().unwrap().remove("text_config");
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("missing key `text_config`"),
        "{err}"
    );
}

#[test]
fn text_config_keys_that_change_the_math_are_read_or_refused() {
    let name = FIXTURES[1];
    let all = tensors(name);
    // Read from text_config, named with it: a wrong width no longer matches the checkpoint.
    let dir = model_dir(name, &all, |c| {
        c["text_config"]["intermediate_size"] = json!(48)
    });
    let err = load_err(dir.path());
    assert!(err.contains("text_config.intermediate_size = 48"), "{err}");
    let dir = model_dir(name, &all, |c| {
        c["text_config"]["hidden_activation"] = json!("gelu")
    });
    let err = load_err(dir.path());
    assert!(err.contains("key `text_config.hidden_activation`"), "{err}");
    // Applied by the text model, not by Gemma3ForConditionalGeneration.
    let dir = model_dir(name, &all, |c| {
        c["text_config"]["final_logit_softcapping"] = json!(30.0)
    });
    let err = load_err(dir.path());
    assert!(
        err.contains("`text_config.final_logit_softcapping`"),
        "{err}"
    );
    // transformers 4 ties by text_config's key, 5 by the top level's.
    let dir = model_dir(name, &all, |c| c["tie_word_embeddings"] = json!(false));
    let err = load_err(dir.path());
    assert!(
        err.contains("`tie_word_embeddings`") && err.contains("text_config.tie_word_embeddings"),
        "{err}"
    );
    // A text key at the top level, which transformers ignores, saying something else.
    let dir = model_dir(name, &all, |c| c["sliding_window"] = json!(4096));
    let err = load_err(dir.path());
    assert!(
        err.contains("key `sliding_window` = 4096") && err.contains("text_config.sliding_window"),
        "{err}"
    );
    let dir = model_dir(name, &all, |c| {
        c["text_config"]["model_type"] = json!("gemma2")
    });
    let err = load_err(dir.path());
    assert!(err.contains("text_config.model_type"), "{err}");
}

#[test]
fn a_missing_or_stray_tensor_is_named() {
    let name = FIXTURES[0];
    let missing = "language_model.model.layers.1.mlp.down_proj.weight";
    let mut all = tensors(name);
    all.retain(|(n, _)| n != missing);
    let dir = model_dir(name, &all, |_| {});
    let err = load_err(dir.path());
    assert!(
        err.contains("missing tensor model.layers.1.mlp.down_proj.weight")
            && err.contains("language_model.model.")
            && err.contains("model.safetensors"),
        "{err}"
    );

    let mut all = tensors(name);
    all.push((
        "audio_tower.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    let dir = model_dir(name, &all, |_| {});
    let err = load_err(dir.path());
    assert!(
        err.contains("audio_tower.weight") && err.contains("model.safetensors"),
        "{err}"
    );
}
