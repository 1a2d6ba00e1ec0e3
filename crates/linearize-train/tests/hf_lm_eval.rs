//! lm-evaluation-harness runs an export: `lm_eval --model hf --model_args
//! pretrained=DIR,trust_remote_code=True` on a tiny converted model with a local multiple-choice
//! task (no network), and its per-choice log-likelihoods are linearize's own. The harness is
//! `.venv`'s (scripts/setup.sh installs it).
mod common;

use common::rng_lock;
use linearize_attention::feature_map::{FeatureMapConfig, FeatureMapInit};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_models::config::ModelConfig;
use linearize_models::llama::Model;
use linearize_train::convert::{convert, ConversionConfig, ConvertedLayers};
use linearize_train::export::{export_model, ExportInfo, ExportOptions};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};

const WORDS: &str = "the sky is blue green red grass sea fire color of a cat dog says meow woof \
                     moo what night day sun moon shines at and";

/// Questions: (context, choices, answer).
const TASK: [(&str, [&str; 3], usize); 4] = [
    ("the sky is", ["blue", "green", "red"], 0),
    ("the grass is", ["blue", "green", "red"], 1),
    ("a cat says", ["meow", "woof", "moo"], 0),
    (
        "at night the moon shines and at day the sun",
        ["shines", "is", "says"],
        0,
    ),
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `<unk>`, `</s>`, then the words, in order.
fn vocab() -> BTreeMap<String, i64> {
    let mut vocab = BTreeMap::from([("<unk>".to_owned(), 0), ("</s>".to_owned(), 1)]);
    for word in WORDS.split_whitespace() {
        let next = vocab.len() as i64;
        vocab.entry(word.to_owned()).or_insert(next);
    }
    vocab
}

/// A word-level tokenizer (split at whitespace) over [`vocab`], as Hugging Face files.
fn write_tokenizer(dir: &Path) {
    let special = |content: &str, id: i64| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special("<unk>", 0), special("</s>", 1)],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab(), "unk_token": "<unk>"},
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
                        "unk_token": "<unk>", "model_max_length": 64});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

fn write_task(dir: &Path) {
    let docs: Vec<String> = TASK
        .iter()
        .map(|(question, choices, answer)| {
            json!({"question": question, "choices": choices, "answer": answer}).to_string()
        })
        .collect();
    let data = dir.join("tiny_choice.jsonl");
    std::fs::write(&data, docs.join("\n") + "\n").unwrap();
    let yaml = format!(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\n\
         test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\n\
         doc_to_choice: \"{{{{choices}}}}\"\ndoc_to_target: \"{{{{answer}}}}\"\nmetric_list:\n  \
         - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        data.display()
    );
    std::fs::write(dir.join("tiny_choice.yaml"), yaml).unwrap();
}

/// A tiny Llama over [`vocab`]: layer 0 LoLCATs (window 2, shorter than the questions), layer 1
/// softmax.
fn converted_model() -> (Model, ConvertedLayers) {
    let cfg = json!({
        "model_type": "llama", "vocab_size": vocab().len(), "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.2,
        "eos_token_id": 1,
    });
    let cfg = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
    tch::manual_seed(3);
    let mut model = Model::new(&cfg, Device::Cpu, Kind::Float).unwrap();
    let attention = AttentionConfig {
        feature_map: Some(FeatureMapConfig::Hedgehog {
            feature_dim: 4,
            half_space: false,
            bias: false,
            init: FeatureMapInit::Kaiming,
        }),
        window_size: Some(2),
        ..AttentionConfig::new(Method::Lolcats)
    };
    let conversion = ConversionConfig {
        softmax_layers: vec![1],
        ..ConversionConfig::all(attention)
    };
    let student = nn::VarStore::new(Device::Cpu);
    let layers = convert(&mut model, &conversion, &student).unwrap();
    (model, layers)
}

/// log p(continuation | context) under `model`, words mapped through [`vocab`].
fn loglikelihood(model: &Model, context: &str, continuation: &str) -> f64 {
    let vocab = vocab();
    let ids = |text: &str| -> Vec<i64> { text.split_whitespace().map(|w| vocab[w]).collect() };
    let (ctx, cont) = (ids(context), ids(continuation));
    let all: Vec<i64> = ctx.iter().chain(&cont).copied().collect();
    let input = Tensor::from_slice(&all[..all.len() - 1]).view([1, -1]);
    let logprobs = tch::no_grad(|| model.forward(&input, None))
        .unwrap()
        .log_softmax(-1, Kind::Float);
    cont.iter()
        .enumerate()
        .map(|(i, &token)| logprobs.double_value(&[0, (ctx.len() - 1 + i) as i64, token]))
        .sum()
}

#[test]
fn lm_eval_scores_an_export_as_linearize_does() {
    let _rng = rng_lock();
    let lm_eval = repo_root().join(".venv/bin/lm_eval");
    assert!(
        lm_eval.is_file(),
        "{} is missing: run scripts/setup.sh (it installs lm-evaluation-harness)",
        lm_eval.display()
    );
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    write_tokenizer(&base);
    let (model, layers) = converted_model();
    let dir = root.path().join("model");
    let info = ExportInfo {
        base_model: "test/tiny".into(),
        base_revision: None,
        base_dir: base.clone(),
        recipe_hash: "test".into(),
        data: "none".into(),
        tokens: Vec::new(),
        eval: None,
    };
    let options = ExportOptions {
        dtype: Kind::Float,
        ..ExportOptions::default()
    };
    export_model(&dir, &model, &layers, None, &info, &options).unwrap();
    let tasks = root.path().join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    write_task(&tasks);

    let out = root.path().join("out");
    let home = root.path().join("hf-home");
    let run = Command::new(&lm_eval)
        .args(["--model", "hf", "--model_args"])
        .arg(format!(
            "pretrained={},trust_remote_code=True,dtype=float32",
            dir.display()
        ))
        .args(["--tasks", "tiny_choice", "--include_path"])
        .arg(&tasks)
        .args(["--device", "cpu", "--batch_size", "1", "--log_samples"])
        .arg("--output_path")
        .arg(&out)
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_DATASETS_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "lm_eval failed:\n{log}");

    let files: Vec<PathBuf> = walk(&out);
    let samples = files
        .iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("samples_tiny_choice")
        })
        .unwrap_or_else(|| panic!("no samples file in {files:?}\n{log}"));
    let mut correct = 0;
    let mut compared = 0;
    for line in std::fs::read_to_string(samples).unwrap().lines() {
        let sample: Value = serde_json::from_str(line).unwrap();
        let doc = sample["doc_id"].as_u64().unwrap() as usize;
        let (question, choices, answer) = TASK[doc];
        let mut best = (f64::NEG_INFINITY, 0);
        for (i, choice) in choices.iter().enumerate() {
            let theirs: f64 = sample["filtered_resps"][i][0]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            let ours = loglikelihood(&model, question, choice);
            assert!(
                (theirs - ours).abs() <= 1e-4,
                "doc {doc} choice {choice:?}: lm_eval {theirs}, linearize {ours}"
            );
            compared += 1;
            if ours > best.0 {
                best = (ours, i);
            }
        }
        correct += usize::from(best.1 == answer);
    }
    assert_eq!(compared, 3 * TASK.len(), "{log}");
    let results = files
        .iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("results_")
        })
        .unwrap();
    let results: Value = serde_json::from_str(&std::fs::read_to_string(results).unwrap()).unwrap();
    let acc = results["results"]["tiny_choice"]["acc,none"]
        .as_f64()
        .unwrap();
    assert_eq!(acc, correct as f64 / TASK.len() as f64);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
