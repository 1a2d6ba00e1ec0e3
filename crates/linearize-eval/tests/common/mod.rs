//! Tiny random Llama models, their linearized conversions and a fake copying model, shared by
//! the integration tests.
#![allow(dead_code)] // Each test binary uses its own subset of these helpers.

use anyhow::Result;
use linearize_attention::feature_map::{FeatureMapConfig, FeatureMapInit};
use linearize_attention::linearized::{AttentionConfig, LayerShape, LinearizedMixer, Method};
use linearize_models::config::ModelConfig;
use linearize_models::llama::Model;
use linearize_models::lm::CausalLm;
use linearize_models::tokenizer::Tokenizer;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Kind, Tensor};

/// Tests seed torch's global generator and expect its sequence: they must not interleave.
static TORCH_RNG: Mutex<()> = Mutex::new(());

pub fn rng_lock() -> MutexGuard<'static, ()> {
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A 425-token byte-level BPE tokenizer (llama3-style special tokens).
pub fn tokenizer() -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../linearize-models/tests/fixtures/tokenizer/llama3");
    Tokenizer::from_dir(&dir).unwrap()
}

/// A random 3-layer Llama over the fixture tokenizer's vocabulary; the same weights every call.
/// The caller holds [`rng_lock`].
pub fn tiny_model(max_context: i64) -> Model {
    let cfg = json!({
        "model_type": "llama", "vocab_size": tokenizer().vocab_size(), "hidden_size": 32,
        "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": max_context,
        "initializer_range": 0.2,
    });
    tch::manual_seed(7);
    let cfg = ModelConfig::from_json_str(&cfg.to_string()).unwrap();
    Model::new(&cfg, Device::Cpu, Kind::Float).unwrap()
}

/// LoLCATs with a 4-token window and 8-token chunks, so that short sequences cross both.
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

/// [`tiny_model`] with `layers` converted to `attention`; the returned store holds the new
/// parameters (random, seeded by `seed`). The caller holds [`rng_lock`].
pub fn converted(
    max_context: i64,
    attention: &AttentionConfig,
    layers: &[usize],
    seed: i64,
) -> (Model, nn::VarStore) {
    let mut model = tiny_model(max_context);
    let store = nn::VarStore::new(Device::Cpu);
    tch::manual_seed(seed);
    let shape = LayerShape::of(model.config());
    for &i in layers {
        let path = store
            .root()
            .sub("model")
            .sub("layers")
            .sub(i)
            .sub("self_attn");
        let mixer = LinearizedMixer::new(&path, &shape, attention).unwrap();
        model.set_mixer(i, Box::new(mixer)).unwrap();
    }
    (model, store)
}

/// A model that copies: after each prefix it predicts the token that followed the latest
/// earlier occurrence of the prefix's longest repeated suffix (an ideal induction head), so it
/// solves passkey and MQAR exactly; with no repeat it predicts token 0.
pub struct Copier {
    pub vocab: i64,
}

impl Copier {
    fn predict(history: &[i64]) -> i64 {
        let p = history.len() - 1;
        let (mut best, mut best_len) = (None, 0);
        for s in 0..p {
            let mut k = 0;
            while k <= s && history[s - k] == history[p - k] {
                k += 1;
            }
            if k >= best_len && k > 0 {
                best = Some(s);
                best_len = k;
            }
        }
        best.map_or(0, |s| history[s + 1])
    }
}

impl CausalLm for Copier {
    type Cache = Vec<i64>;

    fn new_cache(&self, _batch: i64) -> Result<Vec<i64>> {
        Ok(Vec::new())
    }

    fn forward_cached(&self, ids: &Tensor, cache: &mut Vec<i64>) -> Result<Tensor> {
        let new = Vec::<i64>::try_from(ids.squeeze_dim(0))?;
        let mut logits = Vec::with_capacity(new.len() * self.vocab as usize);
        for token in new.iter() {
            cache.push(*token);
            let mut row = vec![0f32; self.vocab as usize];
            row[Self::predict(cache) as usize] = 10.0;
            logits.extend(row);
        }
        Ok(Tensor::from_slice(&logits).view([1, new.len() as i64, self.vocab]))
    }

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn max_context(&self) -> Option<i64> {
        None
    }
}

/// Plain English text of a few thousand tokens.
pub fn text() -> String {
    let paragraph = "Call me Ishmael. Some years ago, never mind how long precisely, having \
        little or no money in my purse, and nothing particular to interest me on shore, I \
        thought I would sail about a little and see the watery part of the world. It is a way \
        I have of driving off the spleen and regulating the circulation. ";
    paragraph.repeat(12)
}
