//! Exports run in the Hugging Face ecosystem: for every attention method (and a hybrid of
//! several, and Gemma 3 with its global or all layers converted, also as the text model of a
//! multimodal config), a tiny random model converted and exported by linearize is loaded by transformers
//! with the modeling code the export carries, and must give linearize's logits (f32, CPU, 40
//! tokens past a window of 8) and greedy tokens; a stock load must fail; PEFT must reproduce the
//! merged model from the adapters in its format. The checks run in `.venv`'s python
//! (python/tests/check_exports.py) twice: with its transformers 4 and PEFT, and with the
//! transformers 5 and PEFT that scripts/setup.sh installs into `.venv/hf5`.
mod common;

use common::rng_lock;
use linearize_attention::feature_map::{FeatureMapConfig, FeatureMapInit};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_attention::ops::gated_deltanet::QkActivation;
use linearize_attention::ops::window::WindowShape;
use linearize_models::config::ModelConfig;
use linearize_models::generate::{generate, GenerateConfig, SamplingConfig};
use linearize_models::llama::Model;
use linearize_train::convert::{convert, ConversionConfig, LayerSelection, LayerTypes};
use linearize_train::export::{export_model, export_peft, load_model, ExportInfo, ExportOptions};
use linearize_train::lora::{LoraAdapters, LoraSettings};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};

const VOCAB: i64 = 61;
const WINDOW: i64 = 8;
/// Tokens scored: five windows.
const LEN: i64 = 40;
const NEW_TOKENS: usize = 8;
/// Sink tokens of the `+sinks` cases: fewer than a window, so that queries see them both inside
/// their window and, later, beside it.
const SINKS: i64 = 3;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `.venv`'s python, which scripts/setup.sh provides with transformers, safetensors and peft.
fn python() -> PathBuf {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup.sh (it installs the Python packages these tests need)",
        python.display()
    );
    python
}

/// A tiny decoder of `family` (4 query heads, 2 key/value heads, 3 layers) with `extra` keys.
fn tiny_config(family: &str, extra: Value) -> ModelConfig {
    let mut cfg = json!({
        "model_type": family, "vocab_size": VOCAB, "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.2,
    });
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    ModelConfig::from_json_str(&cfg.to_string()).unwrap()
}

/// A tiny Gemma 3 (4 layers, 2 of them global) with every option its decoder reads away from its
/// neutral value: heads wider than hidden / heads, a query scale that is not head_dim, local
/// layers (window 5) with their own RoPE base beside the global layers' scaled one, soft-capped
/// logits. `extra`: the two RoPEs in transformers 4's or 5's format, and whether the embeddings
/// are tied.
fn tiny_gemma3(extra: Value) -> ModelConfig {
    let mut keys = json!({
        "num_hidden_layers": 4, "head_dim": 16, "query_pre_attn_scalar": 24,
        "sliding_window": 5, "final_logit_softcapping": 5.0,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    });
    keys.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    tiny_config("gemma3_text", keys)
}

/// [`tiny_gemma3`] as the text model of a multimodal `gemma3` config (whose model does not
/// soft-cap its logits): its export is the text model's, a gemma3_text-based one.
fn tiny_gemma3_multimodal() -> ModelConfig {
    let mut text = tiny_gemma3(
        json!({"rope_theta": 1000000.0, "rope_local_base_freq": 10.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    )
    .to_json();
    text["final_logit_softcapping"] = Value::Null;
    let cfg = json!({"model_type": "gemma3", "text_config": text, "mm_tokens_per_image": 4,
        "vision_config": {"hidden_size": 16, "num_hidden_layers": 1}});
    let cfg = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
    assert!(cfg.multimodal);
    cfg
}

fn hedgehog() -> FeatureMapConfig {
    FeatureMapConfig::Hedgehog {
        feature_dim: 4,
        half_space: false,
        bias: true,
        init: FeatureMapInit::Kaiming,
    }
}

fn lolcats(shape: WindowShape) -> AttentionConfig {
    AttentionConfig {
        feature_map: Some(hedgehog()),
        window_shape: Some(shape),
        window_size: Some(WINDOW),
        chunk_size: Some(16),
        ..AttentionConfig::new(Method::Lolcats)
    }
}

/// Lizard with strong gates (normaliser 1; the biases are set near 0 in [`export_case`]), so
/// that their decays show within the test's 40 tokens.
fn lizard(shape: WindowShape) -> AttentionConfig {
    AttentionConfig {
        feature_map: Some(hedgehog()),
        window_shape: Some(shape),
        window_size: Some(WINDOW),
        chunk_size: Some(16),
        gate_normalizer: Some(1.0),
        ..AttentionConfig::new(Method::Lizard)
    }
}

fn linear(feature_map: FeatureMapConfig) -> AttentionConfig {
    AttentionConfig {
        feature_map: Some(feature_map),
        chunk_size: Some(16),
        ..AttentionConfig::new(Method::Linear)
    }
}

fn windowed(method: Method) -> AttentionConfig {
    AttentionConfig {
        window_size: Some(WINDOW),
        chunk_size: Some(16),
        ..AttentionConfig::new(method)
    }
}

/// `attention` with the first [`SINKS`] tokens kept as softmax keys.
fn with_sinks(attention: AttentionConfig) -> AttentionConfig {
    AttentionConfig {
        sinks: Some(SINKS),
        ..attention
    }
}

/// Gated DeltaNet with `rope` and `qk_activation` as given, or their defaults.
fn gated_deltanet(rope: Option<bool>, qk_activation: Option<QkActivation>) -> AttentionConfig {
    AttentionConfig {
        rope,
        qk_activation,
        chunk_size: Some(16),
        ..AttentionConfig::new(Method::GatedDeltanet)
    }
}

/// Gated DeltaNet behind a window of [`WINDOW`] tokens, with `rope` and `qk_activation` as given,
/// or their defaults.
fn gdn_window(rope: Option<bool>, qk_activation: Option<QkActivation>) -> AttentionConfig {
    AttentionConfig {
        window_size: Some(WINDOW),
        rope,
        qk_activation,
        chunk_size: Some(16),
        ..AttentionConfig::new(Method::GdnWindow)
    }
}

fn softmax_heads(attention: AttentionConfig, heads: &[usize]) -> AttentionConfig {
    AttentionConfig {
        softmax_heads: Some(heads.to_vec()),
        ..attention
    }
}

fn liger_gla() -> AttentionConfig {
    AttentionConfig {
        chunk_size: Some(16),
        ..AttentionConfig::new(Method::LigerGla)
    }
}

/// One exported model: its config, conversion and whether it carries trained LoRA adapters.
struct Case {
    name: &'static str,
    config: ModelConfig,
    conversion: ConversionConfig,
    lora: bool,
}

/// Layer 1 stays softmax in every case (each is a hybrid); `attention` converts layers 0 and 2.
fn hybrid(attention: AttentionConfig) -> ConversionConfig {
    ConversionConfig {
        softmax_layers: vec![1],
        ..ConversionConfig::all(attention)
    }
}

fn cases() -> Vec<Case> {
    let llama = || tiny_config("llama", json!({}));
    let case = |name, config, conversion| Case {
        name,
        config,
        conversion,
        lora: false,
    };
    let t2r = FeatureMapConfig::T2r {
        feature_dim: 8,
        bias: true,
        init: FeatureMapInit::Kaiming,
    };
    vec![
        Case {
            lora: true,
            ..case("lolcats_sw", llama(), hybrid(lolcats(WindowShape::Sw)))
        },
        case(
            "lolcats_tk_qwen3",
            tiny_config("qwen3", json!({"head_dim": 8, "attention_bias": true})),
            hybrid(lolcats(WindowShape::Tk)),
        ),
        case(
            "liger_qwen2",
            tiny_config("qwen2", json!({"tie_word_embeddings": true})),
            hybrid(windowed(Method::Liger)),
        ),
        case("liger_gla", llama(), hybrid(liger_gla())),
        case("hedgehog", llama(), hybrid(linear(hedgehog()))),
        // RoPE in transformers 5's `rope_parameters`, with a base far from the default.
        case(
            "t2r",
            tiny_config(
                "llama",
                json!({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}),
            ),
            hybrid(linear(t2r)),
        ),
        case("elu", llama(), hybrid(linear(FeatureMapConfig::Elu))),
        case("based", llama(), hybrid(linear(FeatureMapConfig::Based))),
        case(
            "sliding_window_llama31",
            tiny_config(
                "llama",
                json!({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3",
                "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}}),
            ),
            hybrid(windowed(Method::SlidingWindow)),
        ),
        case(
            "lolcats_sw_sinks",
            llama(),
            hybrid(with_sinks(lolcats(WindowShape::Sw))),
        ),
        case(
            "lolcats_tk_sinks",
            llama(),
            hybrid(with_sinks(lolcats(WindowShape::Tk))),
        ),
        case(
            "sliding_window_sinks",
            llama(),
            hybrid(with_sinks(windowed(Method::SlidingWindow))),
        ),
        case(
            "liger_sinks",
            llama(),
            hybrid(with_sinks(windowed(Method::Liger))),
        ),
        case(
            "gated_deltanet",
            llama(),
            hybrid(gated_deltanet(None, None)),
        ),
        case("lizard_sw", llama(), hybrid(lizard(WindowShape::Sw))),
        case(
            "lizard_tk_sinks_qwen3",
            tiny_config("qwen3", json!({"head_dim": 8, "attention_bias": true})),
            hybrid(with_sinks(lizard(WindowShape::Tk))),
        ),
        case(
            "gated_deltanet_rope_silu",
            llama(),
            hybrid(gated_deltanet(Some(true), Some(QkActivation::Silu))),
        ),
        case(
            "gdn_window_sinks",
            llama(),
            hybrid(with_sinks(gdn_window(None, None))),
        ),
        case(
            "gdn_window_rope_silu_qwen3",
            tiny_config("qwen3", json!({"head_dim": 8, "attention_bias": true})),
            hybrid(gdn_window(Some(true), Some(QkActivation::Silu))),
        ),
        // Gemma 3: the global layers converted (the local ones keep their softmax window), tied
        // embeddings, RoPE in transformers 4's format; and every layer converted, an LM head of
        // its own, RoPE in 5's format.
        case(
            "gemma3_global",
            tiny_gemma3(
                json!({"rope_theta": 1000000.0, "rope_local_base_freq": 10.0,
                "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                "tie_word_embeddings": true}),
            ),
            ConversionConfig {
                layers: LayerSelection::Type(LayerTypes::Global),
                ..ConversionConfig::all(with_sinks(lolcats(WindowShape::Tk)))
            },
        ),
        case(
            "gemma3_all",
            tiny_gemma3(json!({"rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}},
                "tie_word_embeddings": false})),
            ConversionConfig::all(with_sinks(lolcats(WindowShape::Tk))),
        ),
        case(
            "gemma3_multimodal_global",
            tiny_gemma3_multimodal(),
            ConversionConfig {
                layers: LayerSelection::Type(LayerTypes::Global),
                ..ConversionConfig::all(lolcats(WindowShape::Tk))
            },
        ),
        // Head-level hybrids: some query heads of converted layers keep the teacher's softmax
        // (heads 0 and 3 read different key/value heads; on mistral, within its window).
        case(
            "head_hybrid",
            llama(),
            hybrid(softmax_heads(with_sinks(lolcats(WindowShape::Tk)), &[0, 3])),
        ),
        case(
            "head_hybrid_mistral",
            tiny_config("mistral", json!({"sliding_window": 6})),
            ConversionConfig {
                overrides: BTreeMap::from([
                    (0, softmax_heads(gated_deltanet(None, None), &[1])),
                    (2, softmax_heads(windowed(Method::Liger), &[1, 2])),
                ]),
                ..hybrid(lolcats(WindowShape::Sw))
            },
        ),
        // Every method in one model, and the teacher's own window on its softmax layer.
        case(
            "hybrid_mistral",
            tiny_config(
                "mistral",
                json!({"sliding_window": 6, "num_hidden_layers": 8}),
            ),
            ConversionConfig {
                softmax_layers: vec![3],
                overrides: BTreeMap::from([
                    (1, lolcats(WindowShape::Tk)),
                    (2, windowed(Method::Liger)),
                    (4, linear(t2r)),
                    (5, with_sinks(windowed(Method::SlidingWindow))),
                    (6, gated_deltanet(None, None)),
                    (7, with_sinks(lizard(WindowShape::Sw))),
                ]),
                ..ConversionConfig::all(lolcats(WindowShape::Sw))
            },
        ),
    ]
}

fn info(base_dir: &Path) -> ExportInfo {
    ExportInfo {
        base_model: "test/tiny".into(),
        base_revision: None,
        base_dir: base_dir.to_owned(),
        recipe_hash: "test-recipe".into(),
        data: "none".into(),
        tokens: Vec::new(),
        eval: None,
    }
}

fn ids(batch: i64, len: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randint(VOCAB, [batch, len], (Kind::Int64, Device::Cpu))
}

/// Converts and exports `case` into `dir` (`model/`, and `peft/` with LoRA), with linearize's
/// logits and greedy continuation in `reference.safetensors`.
fn export_case(case: &Case, dir: &Path) {
    tch::manual_seed(7);
    let mut model = Model::new(&case.config, Device::Cpu, Kind::Float).unwrap();
    let student = nn::VarStore::new(Device::Cpu);
    let layers = convert(&mut model, &case.conversion, &student).unwrap();
    let lora = case.lora.then(|| {
        let settings = LoraSettings {
            targets: ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
                .map(String::from)
                .to_vec(),
            ..LoraSettings::default()
        };
        LoraAdapters::install(&mut model, &settings, 3).unwrap()
    });
    // Trained-looking tensors: window factors that differ by head, adapters that matter, norms
    // away from their initial value (so that Gemma's 1 + weight shows).
    tch::manual_seed(11);
    tch::no_grad(|| {
        for (name, t) in model.named_parameters() {
            if name.contains("norm") {
                let _ = t.shallow_clone().g_add_(&(Tensor::randn_like(&t) * 0.3));
            }
        }
        let lora_params = lora
            .as_ref()
            .map(|l| l.named_parameters())
            .unwrap_or_default();
        for (name, t) in layers.named_parameters().iter().chain(&lora_params) {
            let noise = Tensor::randn_like(t) * 0.1;
            let _ = t.shallow_clone().g_add_(&noise);
            // Lizard's untrained gates (about 1 − 4e-4 per token) would hide their decay.
            if name.ends_with("gate_proj.bias") {
                t.shallow_clone().copy_(&Tensor::randn_like(t));
            }
            if name.ends_with("gate_proj.weight") {
                t.shallow_clone().copy_(&(Tensor::randn_like(t) * 2.0));
            }
            // gdn_window's untrained delta scale (0.1) would hide its memory.
            if name.ends_with("delta_scale") {
                t.shallow_clone().copy_(&Tensor::randn_like(t));
            }
        }
    });

    let options = ExportOptions {
        dtype: Kind::Float,
        ..ExportOptions::default()
    };
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let info = info(&base);
    export_model(
        &dir.join("model"),
        &model,
        &layers,
        lora.as_ref(),
        &info,
        &options,
    )
    .unwrap();
    if let Some(lora) = &lora {
        export_peft(&dir.join("peft"), &model, &layers, lora, &info, &options).unwrap();
    }

    let ids = ids(2, LEN, 5);
    let logits = tch::no_grad(|| model.forward(&ids, None)).unwrap();
    let prompt = ids.narrow(0, 0, 1);
    let prompt_tokens: Vec<u32> = Vec::<i64>::try_from(prompt.view([-1]))
        .unwrap()
        .into_iter()
        .map(|t| t as u32)
        .collect();
    let config = GenerateConfig {
        max_new_tokens: NEW_TOKENS,
        sampling: SamplingConfig::greedy(),
        stop_ids: Vec::new(),
        cuda_graphs: false,
    };
    let generated = generate(&model, &prompt_tokens, &config, |_| Ok(())).unwrap();
    assert_eq!(generated.tokens.len(), NEW_TOKENS, "{}", case.name);
    let generated: Vec<i64> = generated.tokens.iter().map(|&t| t as i64).collect();
    let reference = [
        ("ids", ids.shallow_clone()),
        ("logits", logits),
        ("prompt", prompt),
        ("generated", Tensor::from_slice(&generated).view([1, -1])),
    ];
    Tensor::write_safetensors(&reference, dir.join("reference.safetensors")).unwrap();

    // linearize itself reads the export back as the same model.
    let loaded = load_model(&dir.join("model"), None, Device::Cpu, Kind::Float).unwrap();
    let again = tch::no_grad(|| loaded.model.forward(&ids, None)).unwrap();
    let diff = (&again - &reference[1].1).abs().max().double_value(&[]);
    assert!(
        diff <= 1e-5,
        "{}: reloaded export differs by {diff}",
        case.name
    );
}

/// `.venv/hf5`: transformers 5 and a PEFT for it (scripts/requirements-hf5.txt), put first on
/// PYTHONPATH to run the same checks under transformers 5.
fn transformers5_site() -> PathBuf {
    let site = repo_root().join(".venv/hf5");
    assert!(
        site.join("transformers").is_dir(),
        "{} lacks transformers 5: run scripts/setup.sh",
        site.display()
    );
    site
}

/// Runs `.venv`'s python on `args`, with `pythonpath` first on its module path if given.
fn run_python(args: &[&Path], pythonpath: Option<&Path>) -> String {
    let home = tempfile::tempdir().unwrap();
    let mut command = Command::new(python());
    if let Some(path) = pythonpath {
        command.env("PYTHONPATH", path);
    }
    let out = command
        .args(args)
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}", text);
    text
}

#[test]
fn exports_run_in_transformers_and_peft_as_in_linearize() {
    let _rng = rng_lock();
    let root = tempfile::tempdir().unwrap();
    for case in cases() {
        export_case(&case, &root.path().join(case.name));
    }

    // What a stock loader sees: our own type, architecture, auto_map and code.
    let model_dir = root.path().join("lolcats_sw/model");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["model_type"], "linearize");
    assert_eq!(cfg["base_model_type"], "llama");
    assert_eq!(cfg["architectures"], json!(["LinearizeForCausalLM"]));
    assert_eq!(
        cfg["auto_map"]["AutoModelForCausalLM"],
        "modeling_linearize.LinearizeForCausalLM"
    );
    assert_eq!(
        cfg["linearize"]["layers"][0]["attention"]["window_size"],
        WINDOW
    );
    let package = repo_root().join("python/linearize_hf");
    for file in ["modeling_linearize.py", "configuration_linearize.py"] {
        assert_eq!(
            std::fs::read_to_string(model_dir.join(file)).unwrap(),
            std::fs::read_to_string(package.join(file)).unwrap(),
            "{file} is not the package's copy"
        );
    }
    let card = std::fs::read_to_string(model_dir.join("README.md")).unwrap();
    for needle in ["trust_remote_code=True", "PeftModel", "lm_eval", "vLLM"] {
        assert!(card.contains(needle), "card lacks {needle:?}:\n{card}");
    }
    let adapter: Value = serde_json::from_str(
        &std::fs::read_to_string(
            root.path()
                .join("lolcats_sw/peft/adapter/adapter_config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (adapter["peft_type"].as_str(), adapter["r"].as_i64()),
        (Some("LORA"), Some(8))
    );

    let script = repo_root().join("python/tests/check_exports.py");
    let site5 = transformers5_site();
    for (major, pythonpath) in [("4", None), ("5", Some(site5.as_path()))] {
        let report = run_python(&[&script, root.path()], pythonpath);
        println!("{report}");
        assert!(
            report.contains(&format!("transformers {major}.")),
            "not transformers {major}:\n{report}"
        );
        assert!(
            report.contains(&format!("{} cases, 0 failed checks", cases().len())),
            "{report}"
        );
    }
}
