//! The tiny random models of `scripts/make_model_fixtures.py` and the logits Hugging Face
//! transformers computed for them.
#![allow(dead_code)] // Each test binary uses its own subset of these helpers.
use std::path::PathBuf;
use tch::Tensor;

/// One fixture per supported family and option the loader branches on, saved by transformers
/// 4.57 (top-level `rope_theta` / `rope_scaling`) and again by transformers 5 (`rope_parameters`).
/// `gemma3_mm` is a multimodal Gemma 3 whose references are the full model's logits on text.
pub const FIXTURES: [&str; 16] = [
    "llama3_tied_sharded",
    "llama_untied_bias",
    "mistral_sliding",
    "qwen2",
    "qwen2_yarn",
    "qwen3_bf16",
    "gemma3",
    "gemma3_mm",
    "transformers5/llama3_tied_sharded",
    "transformers5/llama_untied_bias",
    "transformers5/mistral_sliding",
    "transformers5/qwen2",
    "transformers5/qwen2_yarn",
    "transformers5/qwen3_bf16",
    "transformers5/gemma3",
    "transformers5/gemma3_mm",
];

/// A fixture's directory. `LINEARIZE_MODEL_FIXTURES` overrides where the fixtures are: a test
/// binary carried to the GPU machine runs without the checkout it was built in.
pub fn fixture(name: &str) -> PathBuf {
    std::env::var_os("LINEARIZE_MODEL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join(name)
}

/// (input ids (b, L), HF logits (b, L, vocab) f32).
pub fn reference(name: &str) -> (Tensor, Tensor) {
    let path = fixture(name).join("reference.safetensors");
    let tensors = Tensor::read_safetensors(&path).unwrap();
    let get = |key: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", path.display()))
            .1
            .shallow_clone()
    };
    (get("input_ids"), get("logits"))
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}
