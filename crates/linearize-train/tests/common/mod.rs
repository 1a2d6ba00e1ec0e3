//! Tiny models and data shared by the stage-2 and export tests.
// Each test binary that includes this module uses only part of it.
#![allow(dead_code)]
use linearize_attention::feature_map::{FeatureMapConfig, FeatureMapInit};
use linearize_attention::linearized::{AttentionConfig, Method};
use linearize_models::config::ModelConfig;
use linearize_models::llama::Model;
use linearize_train::convert::{convert, ConversionConfig, ConvertedLayers};
use linearize_train::data::PackedSequences;
use serde_json::json;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

pub const VOCAB: i64 = 61;
pub const SEQ_LEN: usize = 24;

/// Tests seed torch's global generator and expect its sequence: they must not interleave.
static TORCH_RNG: Mutex<()> = Mutex::new(());

pub fn rng_lock() -> MutexGuard<'static, ()> {
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn tiny_config(hidden: i64) -> ModelConfig {
    let cfg = json!({
        "model_type": "llama", "vocab_size": VOCAB, "hidden_size": hidden,
        "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.2,
    });
    ModelConfig::from_json_str(&cfg.to_string()).unwrap()
}

pub fn tiny_model() -> Model {
    tch::manual_seed(7);
    Model::new(&tiny_config(32), Device::Cpu, Kind::Float).unwrap()
}

pub fn lolcats() -> AttentionConfig {
    AttentionConfig {
        feature_map: Some(FeatureMapConfig::Hedgehog {
            feature_dim: 4,
            half_space: false,
            bias: false,
            init: FeatureMapInit::Kaiming,
        }),
        window_size: Some(4),
        chunk_size: Some(8),
        ..AttentionConfig::new(Method::Lolcats)
    }
}

/// Layers 0 and 2 converted to LoLCATs, layer 1 kept softmax (a hybrid, so both kinds of layer
/// are exercised); the student store is seeded by `student_seed`.
pub fn converted(student_seed: i64) -> (Model, ConvertedLayers) {
    let mut model = tiny_model();
    let student = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(student_seed);
    let cfg = ConversionConfig {
        softmax_layers: vec![1],
        ..ConversionConfig::all(lolcats())
    };
    let layers = convert(&mut model, &cfg, &student).unwrap();
    (model, layers)
}

/// `count` sequences of `SEQ_LEN + 1` tokens (with next-token targets) that count up in steps
/// of 7 modulo the vocabulary from a random start: learnable, unlike uniform noise.
pub fn sequences(count: usize, seed: i64) -> PackedSequences {
    tch::manual_seed(seed);
    let starts = Vec::<i64>::try_from(Tensor::randint(
        VOCAB,
        [count as i64],
        (Kind::Int64, Device::Cpu),
    ))
    .unwrap();
    let tokens = starts
        .iter()
        .flat_map(|&s| (0..=SEQ_LEN as i64).map(move |i| ((s + 7 * i) % VOCAB) as u32))
        .collect();
    PackedSequences::from_tokens(SEQ_LEN, true, tokens).unwrap()
}

/// A few token ids to compare logits on.
pub fn probe_ids() -> Tensor {
    Tensor::from_slice(&[3i64, 10, 17, 24, 31, 38, 45, 52, 59, 5, 12, 19]).view([2, 6])
}

/// The model's logits on [`probe_ids`], without autograd.
pub fn probe_logits(model: &Model) -> Tensor {
    tch::no_grad(|| model.forward(&probe_ids(), None)).unwrap()
}

/// Saves `model`'s weights and config as a Hugging Face directory (the base model of an export).
pub fn save_hf_dir(model: &Model, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let named: Vec<(String, Tensor)> = model.named_parameters().into_iter().collect();
    Tensor::write_safetensors(&named, dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&model.config().to_json()).unwrap(),
    )
    .unwrap();
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}
