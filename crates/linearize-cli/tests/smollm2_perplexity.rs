//! Perplexity parity of the imported SmolLM2 with Hugging Face transformers loading the same
//! GGUF: `linearize eval --perplexity` on the test split (ctx 512, first 64 windows) against the
//! numbers `scripts/ref_smollm2_ppl.py` recorded in `fixtures/smollm2_ppl_reference.json`.
use linearize_models::offline::{ensure_smollm2, ensure_text, Split};
use serde_json::Value;
use std::process::Command;

fn reference(tokenizer: &str) -> Value {
    let text = include_str!("fixtures/smollm2_ppl_reference.json");
    let doc: Value = serde_json::from_str(text).unwrap();
    doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["tokenizer"] == tokenizer)
        .unwrap()
        .clone()
}

#[test]
fn imported_smollm2_perplexity_equals_transformers_within_0_1_percent() {
    let model = ensure_smollm2(None).unwrap();
    let corpus = ensure_text().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_linearize"))
        .args([
            "eval",
            "--device",
            "cpu",
            "--ctx",
            "512",
            "--max-windows",
            "64",
            "--batch-size",
            "4",
        ])
        .arg("--model")
        .arg(&model)
        .arg("--perplexity")
        .arg(corpus.split_path(Split::Test))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got: Value = serde_json::from_slice(&output.stdout).unwrap();
    let ppl = got["perplexity"].as_f64().unwrap();

    // Same token ids as the reference (the GGUF's own pre-tokenizer): same windows, same count.
    let same_ids = reference("gguf-pre");
    assert_eq!(got["total_tokens"], same_ids["tokens"]);
    assert_eq!(got["scored_tokens"], same_ids["scored_tokens"]);
    let want = same_ids["ppl"].as_f64().unwrap();
    assert!(
        (ppl - want).abs() / want < 1e-3,
        "perplexity {ppl}, transformers {want}"
    );
    // transformers' GGUF tokenizer ignores the file's pre-tokenizer (docs/data.md): its ids
    // differ in one place, and its perplexity is still within 0.1%.
    let hf_tokens = reference("transformers")["ppl"].as_f64().unwrap();
    assert!(
        (ppl - hf_tokens).abs() / hf_tokens < 1e-3,
        "perplexity {ppl}, transformers with its own tokenizer {hf_tokens}"
    );
}
