//! Import of the tiny fixture GGUFs compared with what transformers' GGUF loader makes of the
//! same files (tests/fixtures/gguf/*.expected.json, from scripts/gguf_make_fixtures.py), and
//! import failures that must leave nothing behind.
use linearize_models::gguf::{convert_tokenizer, import, Dtype, GgufFile};
use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f32s(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        safetensors::Dtype::BF16 => t
            .data()
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::F16 => t
            .data()
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

/// Compares a tensor with transformers' summary of it: shape, exact sampled rows, and sums
/// that change if any value or the row order differs.
fn assert_matches_summary(st: &SafeTensors, name: &str, want: &Value, round: impl Fn(f32) -> f32) {
    let t = st.tensor(name).unwrap();
    let shape: Vec<usize> = want["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(t.shape(), shape, "{name}");
    let values = f32s(st, name);
    let row_len = values.len() / shape[0];
    for (row, expected) in want["rows"].as_object().unwrap() {
        let row: usize = row.parse().unwrap();
        for (k, e) in expected.as_array().unwrap().iter().enumerate() {
            let e = round(e.as_f64().unwrap() as f32);
            assert_eq!(values[row * row_len + k], e, "{name}[{row}, {k}]");
        }
    }
    if round(1.1) == 1.1 {
        let rows: Vec<f64> = values
            .chunks(row_len)
            .map(|r| r.iter().map(|&v| v as f64).sum())
            .collect();
        let sum: f64 = rows.iter().sum();
        let weighted: f64 = rows
            .iter()
            .enumerate()
            .map(|(i, s)| (i + 1) as f64 * s)
            .sum();
        let abs: f64 = values.iter().map(|&v| (v as f64).abs()).sum();
        for (got, key) in [
            (sum, "sum"),
            (weighted, "row_weighted_sum"),
            (abs, "abs_sum"),
        ] {
            let e = want[key].as_f64().unwrap();
            assert!(
                (got - e).abs() <= 1e-9 * e.abs().max(1.0),
                "{name} {key}: {got} vs {e}"
            );
        }
    }
}

/// transformers reads f32 metadata as the exact binary value (1e-6 as 9.99999997e-7); we
/// write the decimal the converter was given, so floats agree to f32 precision.
fn assert_config_matches(config: &Value, expected: &Value) {
    for (key, want) in expected.as_object().unwrap() {
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
}

/// The oracle is transformers' tokenizer for the GGUF with the pre-tokenizer the file names
/// (`ids_gguf_pre`); transformers as is (`ids`) pre-tokenizes with GPT-2's regex whatever the
/// file says, so the two differ where splitting digits apart moves whitespace.
fn encode_all(tokenizer: &tokenizers::Tokenizer, expected: &Value) {
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    for case in expected["encodings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
        assert_eq!(
            got,
            ids(&case["ids_gguf_pre"]),
            "token ids of {text:?} (transformers as is: {:?})",
            ids(&case["ids"])
        );
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    let expected = json(&fixture("tiny-llama.expected.json"));
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("tiny");
    let summary = import(&fixture("tiny-llama.gguf"), &dir, Dtype::F32).unwrap();
    assert_eq!(summary.tensors, 20);

    let config = json(&dir.join("config.json"));
    assert_config_matches(&config, &expected["config"]);
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["torch_dtype"], "float32");
    assert_eq!(
        (
            config["bos_token_id"].as_u64(),
            config["eos_token_id"].as_u64()
        ),
        (Some(1), Some(2))
    );

    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = expected["tensors"].as_object().unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_owned).collect();
    names.sort();
    let mut want_names: Vec<String> = tensors.keys().cloned().collect();
    want_names.sort();
    assert_eq!(names, want_names, "tied embeddings: no lm_head.weight");
    for (name, want) in tensors {
        assert_matches_summary(&st, name, want, |v| v);
    }

    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    encode_all(&tokenizer, &expected);
    // The file says add_bos_token = false: encoding with special tokens adds nothing.
    assert_eq!(
        tokenizer.encode("Hello", true).unwrap().get_ids(),
        tokenizer.encode("Hello", false).unwrap().get_ids()
    );
    let text = "naïve café 👋🏽 12 345\n\n  x";
    let ids = tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);

    let tc = json(&dir.join("tokenizer_config.json"));
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(
        (tc["bos_token"].as_str(), tc["eos_token"].as_str()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
    assert!(tc["chat_template"]
        .as_str()
        .unwrap()
        .contains("add_generation_prompt"));
    assert_eq!(tc["added_tokens_decoder"]["2"]["special"], true);
    assert_eq!(json(&dir.join("generation_config.json"))["eos_token_id"], 2);
    let record = json(&dir.join("import.json"));
    assert_eq!(record["source"]["tensor_types"]["Q4_0"], 2);
}

#[test]
fn bf16_import_rounds_transformers_values() {
    let expected = json(&fixture("tiny-llama.expected.json"));
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("tiny-bf16");
    import(&fixture("tiny-llama.gguf"), &dir, Dtype::BF16).unwrap();
    assert_eq!(json(&dir.join("config.json"))["torch_dtype"], "bfloat16");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let name = "model.layers.0.self_attn.q_proj.weight";
    assert_eq!(st.tensor(name).unwrap().dtype(), safetensors::Dtype::BF16);
    assert_matches_summary(&st, name, &expected["tensors"][name], |v| {
        half::bf16::from_f32(v).to_f32()
    });
}

#[test]
fn spm_vocabulary_matches_transformers() {
    let expected = json(&fixture("tiny-spm.expected.json"));
    let gguf = GgufFile::open(&fixture("tiny-spm.gguf")).unwrap();
    let converted = convert_tokenizer(&gguf).unwrap();
    // Through tokenizer.json, as a loader sees it.
    let tokenizer: tokenizers::Tokenizer = converted.tokenizer_json().unwrap().parse().unwrap();
    encode_all(&tokenizer, &expected);
    // SentencePiece-style vocabularies prepend BOS unless the file says otherwise.
    let with_bos = tokenizer.encode("Hello", true).unwrap();
    assert_eq!(with_bos.get_ids()[0], converted.bos.unwrap().id);
    let ids = tokenizer
        .encode("Hello wörld 🙂", false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), "Hello wörld 🙂");
}

/// The tiny fixture with `edit` applied to its bytes.
fn patched(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(fixture("tiny-llama.gguf")).unwrap();
    edit(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn replace_all(bytes: &mut [u8], from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
}

/// The byte offset of a tensor's ggml type id in the tensor table.
fn type_field(bytes: &[u8], tensor: &str) -> usize {
    let mut needle = (tensor.len() as u64).to_le_bytes().to_vec();
    needle.extend(tensor.as_bytes());
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .unwrap()
        + needle.len();
    let n_dims = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    at + 4 + 8 * n_dims
}

fn import_err(path: &Path, out: &Path) -> String {
    let err = format!("{:#}", import(path, out, Dtype::F32).unwrap_err());
    assert!(!out.exists(), "a failed import left {}", out.display());
    if let Ok(entries) = std::fs::read_dir(out.parent().unwrap()) {
        let leftovers: Vec<_> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains("tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
    err
}

#[test]
fn unsupported_architecture_is_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let path = patched(tmp.path(), "qwen.gguf", |b| {
        replace_all(b, b"llama", b"qwen2")
    });
    let err = import_err(&path, &tmp.path().join("out/model"));
    assert!(
        err.contains("qwen.gguf") && err.contains("architecture \"qwen2\" is not supported"),
        "{err}"
    );
}

#[test]
fn undecodable_tensor_type_is_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    // IQ4_NL blocks are the size of Q4_0 blocks: a valid file whose embedding we cannot decode.
    let path = patched(tmp.path(), "iq4.gguf", |b| {
        let at = type_field(b, "token_embd.weight");
        b[at..at + 4].copy_from_slice(&20u32.to_le_bytes());
    });
    let err = import_err(&path, &tmp.path().join("model"));
    assert!(
        err.contains("iq4.gguf") && err.contains("token_embd.weight") && err.contains("IQ4_NL"),
        "{err}"
    );
}

#[test]
fn truncated_file_fails_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = patched(tmp.path(), "cut.gguf", |b| b.truncate(b.len() - 100));
    let err = import_err(&path, &tmp.path().join("model"));
    assert!(
        err.contains("cut.gguf") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = patched(tmp.path(), "renamed.gguf", |b| {
        replace_all(b, b"blk.1.ffn_up.weight", b"blk.1.ffn_xx.weight")
    });
    let err = import_err(&path, &tmp.path().join("model"));
    assert!(
        err.contains("unexpected tensor blk.1.ffn_xx.weight"),
        "{err}"
    );
    // Without head_count_kv the model reads as 4 key/value heads, twice the K rows present.
    let path = patched(tmp.path(), "heads.gguf", |b| {
        replace_all(
            b,
            b"llama.attention.head_count_kv",
            b"llama.attention.head_count_xx",
        )
    });
    let err = import_err(&path, &tmp.path().join("model"));
    assert!(
        err.contains("blk.0.attn_k.weight") && err.contains("expected [64, 64]"),
        "{err}"
    );
}

#[test]
fn refuses_to_replace_a_directory_it_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("precious.txt"), "keep").unwrap();
    let err = format!(
        "{:#}",
        import(&fixture("tiny-llama.gguf"), tmp.path(), Dtype::F32).unwrap_err()
    );
    assert!(err.contains("refusing to replace"), "{err}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("precious.txt")).unwrap(),
        "keep"
    );
    // A previous import is replaced.
    let dir = tmp.path().join("model");
    import(&fixture("tiny-llama.gguf"), &dir, Dtype::F32).unwrap();
    import(&fixture("tiny-llama.gguf"), &dir, Dtype::F16).unwrap();
    assert_eq!(json(&dir.join("config.json"))["torch_dtype"], "float16");
}

#[test]
fn an_offset_that_wraps_past_2_pow_64_fails_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    // 2^64 - 256 is a multiple of any alignment up to 256: data start + offset wraps to 256
    // bytes before the data, which an unchecked sum would accept and read header bytes as
    // the embedding.
    let path = patched(tmp.path(), "wrap.gguf", |b| {
        let at = type_field(b, "token_embd.weight") + 4;
        b[at..at + 8].copy_from_slice(&(u64::MAX - 255).to_le_bytes());
    });
    let err = import_err(&path, &tmp.path().join("model"));
    assert!(
        err.contains("wrap.gguf") && err.contains("token_embd.weight") && err.contains("overflows"),
        "{err}"
    );
}

#[test]
fn a_duplicated_tensor_name_is_named_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let path = patched(tmp.path(), "dup.gguf", |b| {
        replace_all(b, b"blk.1.attn_q.weight", b"blk.0.attn_q.weight")
    });
    let err = import_err(&path, &tmp.path().join("model"));
    assert!(
        err.contains("dup.gguf") && err.contains("tensor blk.0.attn_q.weight appears twice"),
        "{err}"
    );
}
