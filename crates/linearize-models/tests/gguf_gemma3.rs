//! Import of a synthetic Gemma 3 GGUF that the test writes: tiny dims with the real file's
//! layout (llama.cpp's fixed pattern of five local layers and one global, q/k norms, norms on both
//! sides of attention and MLP stored as 1 + w, tied embeddings), tensors of the types the Q4_K_M
//! file holds (Q4_K and Q6_K where rows are multiples of 256, F16 and F32 elsewhere), and a tiny
//! SentencePiece vocabulary that becomes a Unigram tokenizer. The import must give the values
//! written (quantised ones as ggml decodes them, norms minus 1 as transformers' GGUF loader
//! stores them), a tokenizer that round-trips, and a model that runs; damaged files must fail
//! with one line naming what is wrong and leave no output behind.
mod gguf_writer;

use gguf_writer::{Writer, F32, I32, STRING};
use linearize_models::config::{Family, LayerType, ModelConfig};
use linearize_models::gguf::{dequantize, import, Dtype, GgmlType};
use linearize_models::llama::Model;
use linearize_models::tokenizer::Tokenizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const HIDDEN: usize = 64;
const N_HEAD: usize = 2;
const N_KV_HEAD: usize = 1;
/// Wider than HIDDEN / N_HEAD: the importer must read `key_length`.
const HEAD_DIM: usize = 128;
const FFN: usize = 256;
/// llama.cpp's Gemma 3: layers 0-4 local, layer 5 global.
const N_LAYER: usize = 6;
const WINDOW: u32 = 4;
const ROPE_THETA: f32 = 1_000_000.0;

/// The vocabulary: control tokens, the 256 byte pieces, then text pieces with their scores.
const SPECIALS: [&str; 6] = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
];
const PIECES: [(&str, f32); 12] = [
    ("\u{2581}", -3.0),
    ("hello", -1.0),
    ("world", -1.0),
    ("\u{2581}hello", -1.0),
    ("\u{2581}world", -1.0),
    ("h", -5.0),
    ("e", -5.0),
    ("l", -5.0),
    ("o", -5.0),
    ("w", -5.0),
    ("r", -5.0),
    ("d", -5.0),
];
const BYTES: u32 = SPECIALS.len() as u32;
const FIRST_PIECE: u32 = BYTES + 256;

fn tokens() -> Vec<String> {
    let mut t: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    t.extend((0..256).map(|b| format!("<0x{b:02X}>")));
    t.extend(PIECES.iter().map(|p| p.0.to_owned()));
    t
}

fn piece_id(piece: &str) -> u32 {
    FIRST_PIECE + PIECES.iter().position(|p| p.0 == piece).unwrap() as u32
}

fn oracle(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf/dequant")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tensor as written (GGUF dims, innermost first) and the f32 values transformers' loader
/// makes of it.
struct Written {
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
    values: Vec<f32>,
}

fn f32_tensor(dims: &[u64], values: Vec<f32>) -> Written {
    Written {
        dims: dims.to_vec(),
        ty: GgmlType::F32,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        values,
    }
}

fn f16_tensor(dims: &[u64], values: &[f32]) -> Written {
    let halves: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
    Written {
        dims: dims.to_vec(),
        ty: GgmlType::F16,
        data: halves.iter().flat_map(|h| h.to_le_bytes()).collect(),
        values: halves.iter().map(|h| h.to_f32()).collect(),
    }
}

/// A K-quant tensor of `rows` rows of 256: its first block is gguf-py's reference-quantised
/// block (checked against gguf-py's decoding), the others random bytes with a sane f16 scale at
/// `scale_at` (Q4_K: d and dmin at 0 and 2; Q6_K: d at 208).
fn k_quant_tensor(rng: &mut ChaCha8Rng, ty: GgmlType, rows: usize, scale_at: &[usize]) -> Written {
    let size = ty.type_size();
    let reference = oracle(&format!("{ty}.blocks"));
    let mut data = reference[..size].to_vec();
    for _ in 1..rows {
        let mut block: Vec<u8> = (0..size).map(|_| rng.random()).collect();
        for &at in scale_at {
            let scale = half::f16::from_f32(rng.random_range(0.0005..0.005));
            block[at..at + 2].copy_from_slice(&scale.to_le_bytes());
        }
        data.extend(block);
    }
    let mut values = vec![f32::NAN; rows * 256];
    dequantize(ty, &data, &mut values).unwrap();
    let expected: Vec<f32> = oracle(&format!("{ty}.f32"))
        .chunks_exact(4)
        .take(256)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    for (i, (got, want)) in values.iter().zip(&expected).enumerate() {
        assert_eq!(got.to_bits(), want.to_bits(), "{ty} value {i}");
    }
    Written {
        dims: vec![256, rows as u64],
        ty,
        data,
        values,
    }
}

/// The synthetic Gemma 3 file's metadata and tensors, by GGUF name.
struct Fixture {
    writer: Writer,
    tensors: BTreeMap<String, Written>,
}

impl Fixture {
    fn new() -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut normal = |n: usize, std: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-std..std)).collect()
        };
        let vocab = tokens().len();
        let (h, q_rows, kv_rows) = (
            HIDDEN as u64,
            (N_HEAD * HEAD_DIM) as u64,
            (N_KV_HEAD * HEAD_DIM) as u64,
        );
        let mut tensors = BTreeMap::new();
        // llama.cpp stores Gemma's norms as 1 + w.
        let mut norm = |dim: usize| {
            f32_tensor(
                &[dim as u64],
                normal(dim, 0.3).iter().map(|w| 1.0 + w).collect(),
            )
        };
        tensors.insert("output_norm.weight".to_owned(), norm(HIDDEN));
        for i in 0..N_LAYER {
            for name in [
                "attn_norm",
                "post_attention_norm",
                "ffn_norm",
                "post_ffw_norm",
            ] {
                tensors.insert(format!("blk.{i}.{name}.weight"), norm(HIDDEN));
            }
            for name in ["attn_q_norm", "attn_k_norm"] {
                tensors.insert(format!("blk.{i}.{name}.weight"), norm(HEAD_DIM));
            }
        }
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut normal = |n: usize, std: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-std..std)).collect()
        };
        tensors.insert(
            "token_embd.weight".to_owned(),
            f16_tensor(&[h, vocab as u64], &normal(vocab * HIDDEN, 0.5)),
        );
        let mut quant_rng = ChaCha8Rng::seed_from_u64(5);
        for i in 0..N_LAYER {
            let mut add =
                |name: &str, t: Written| tensors.insert(format!("blk.{i}.{name}.weight"), t);
            // Rows of HIDDEN (not a multiple of 256) fall back to F16 and F32, as in the real file.
            add(
                "attn_q",
                f16_tensor(&[h, q_rows], &normal(HIDDEN * N_HEAD * HEAD_DIM, 0.2)),
            );
            add(
                "attn_k",
                f16_tensor(&[h, kv_rows], &normal(HIDDEN * N_KV_HEAD * HEAD_DIM, 0.2)),
            );
            add(
                "attn_v",
                f32_tensor(&[h, kv_rows], normal(HIDDEN * N_KV_HEAD * HEAD_DIM, 0.2)),
            );
            add(
                "ffn_gate",
                f16_tensor(&[h, FFN as u64], &normal(HIDDEN * FFN, 0.2)),
            );
            add(
                "ffn_up",
                f16_tensor(&[h, FFN as u64], &normal(HIDDEN * FFN, 0.2)),
            );
            add(
                "attn_output",
                k_quant_tensor(&mut quant_rng, GgmlType::Q4_K, HIDDEN, &[0, 2]),
            );
            add(
                "ffn_down",
                k_quant_tensor(&mut quant_rng, GgmlType::Q6_K, HIDDEN, &[208]),
            );
        }

        let tokens = tokens();
        let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let scores: Vec<Vec<u8>> = (0..tokens.len())
            .map(|i| {
                let score = i
                    .checked_sub(FIRST_PIECE as usize)
                    .map_or(0.0, |p| PIECES[p].1);
                score.to_le_bytes().to_vec()
            })
            .collect();
        // llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte.
        let types: Vec<Vec<u8>> = (0..tokens.len() as u32)
            .map(|i| {
                let ty: i32 = match i {
                    3 => 2,
                    i if i < BYTES => 3,
                    i if i < FIRST_PIECE => 6,
                    _ => 1,
                };
                ty.to_le_bytes().to_vec()
            })
            .collect();
        let writer = Writer::new()
            .kv_str("general.architecture", "gemma3")
            .kv_str("general.name", "tiny gemma3")
            .kv_u32("gemma3.context_length", 64)
            .kv_u32("gemma3.embedding_length", HIDDEN as u32)
            .kv_u32("gemma3.block_count", N_LAYER as u32)
            .kv_u32("gemma3.feed_forward_length", FFN as u32)
            .kv_u32("gemma3.attention.head_count", N_HEAD as u32)
            .kv_u32("gemma3.attention.head_count_kv", N_KV_HEAD as u32)
            .kv_u32("gemma3.attention.key_length", HEAD_DIM as u32)
            .kv_u32("gemma3.attention.value_length", HEAD_DIM as u32)
            .kv_f32("gemma3.rope.freq_base", ROPE_THETA)
            .kv_f32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
            .kv_u32("gemma3.attention.sliding_window", WINDOW)
            .kv_str("tokenizer.ggml.model", "llama")
            .kv_strings("tokenizer.ggml.tokens", &token_refs)
            .kv_array("tokenizer.ggml.scores", F32, &scores)
            .kv_array("tokenizer.ggml.token_type", I32, &types)
            .kv_u32("tokenizer.ggml.bos_token_id", 2)
            .kv_u32("tokenizer.ggml.eos_token_id", 1)
            .kv_u32("tokenizer.ggml.unknown_token_id", 3)
            .kv_u32("tokenizer.ggml.padding_token_id", 0)
            .kv_bool("tokenizer.ggml.add_bos_token", true)
            .kv_bool("tokenizer.ggml.add_eos_token", false)
            .kv_bool("tokenizer.ggml.add_space_prefix", false);
        Self { writer, tensors }
    }

    fn write(&self, dir: &Path) -> PathBuf {
        let mut writer = Writer {
            kv: self.writer.kv.clone(),
            tensors: Vec::new(),
            alignment: self.writer.alignment,
        };
        for (name, t) in &self.tensors {
            writer = writer.tensor(name, &t.dims, t.ty.id(), t.data.clone());
        }
        writer.write(dir, "tiny-gemma3.gguf")
    }
}

/// transformers' name of a GGUF tensor of this fixture.
fn hf_name(gguf: &str) -> String {
    let layer = [
        ("attn_norm", "input_layernorm"),
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
        ("post_attention_norm", "post_attention_layernorm"),
        ("ffn_norm", "pre_feedforward_layernorm"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("post_ffw_norm", "post_feedforward_layernorm"),
    ];
    match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        _ => {
            let rest = gguf.strip_prefix("blk.").unwrap();
            let (i, rest) = rest.split_once('.').unwrap();
            let module = rest.strip_suffix(".weight").unwrap();
            let hf = layer.iter().find(|(g, _)| *g == module).unwrap().1;
            format!("model.layers.{i}.{hf}.weight")
        }
    }
}

#[test]
fn synthetic_gemma3_imports_with_its_values_tokenizer_and_layout() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Fixture::new();
    let file = fixture.write(dir.path());
    let out = dir.path().join("model");
    let summary = import(&file, &out, Dtype::F32).unwrap();
    assert_eq!(
        summary.source_types,
        BTreeMap::from([
            ("F16".to_owned(), 1 + 4 * N_LAYER),
            ("F32".to_owned(), 1 + 7 * N_LAYER),
            ("Q4_K".to_owned(), N_LAYER),
            ("Q6_K".to_owned(), N_LAYER),
        ])
    );

    // The config transformers' Gemma3ForCausalLM reads, as linearize reads it.
    let cfg = ModelConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(cfg.family, Family::Gemma3);
    assert_eq!(
        (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim),
        (HIDDEN as i64, FFN as i64, HEAD_DIM as i64)
    );
    assert_eq!(
        (cfg.num_attention_heads, cfg.num_key_value_heads),
        (N_HEAD as i64, N_KV_HEAD as i64)
    );
    let mut layer_types = vec![LayerType::Sliding; N_LAYER];
    layer_types[N_LAYER - 1] = LayerType::Full;
    assert_eq!(cfg.layer_types, layer_types);
    assert_eq!(cfg.sliding_window, Some(WINDOW as i64));
    assert_eq!(cfg.rope_theta, ROPE_THETA as f64);
    assert!(cfg.tie_word_embeddings, "no output.weight: tied");
    assert_eq!(cfg.vocab_size, tokens().len() as i64);
    let gemma = cfg.gemma.as_ref().unwrap();
    assert_eq!(gemma.query_pre_attn_scalar, HEAD_DIM as f64);
    assert_eq!(gemma.local_rope_theta, 10_000.0);
    assert_eq!(gemma.final_logit_softcapping, None);

    // Every tensor as written: quantised ones as ggml decodes them, norms less 1, no RoPE
    // permutation of Gemma's q and k rows, shapes in transformers' order.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.names().len(), fixture.tensors.len());
    for (name, t) in &fixture.tensors {
        let hf = hf_name(name);
        let view = st.tensor(&hf).unwrap_or_else(|e| panic!("{hf}: {e}"));
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        assert_eq!(view.shape(), shape, "{hf}");
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{hf}");
        let got: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let norm = name.ends_with("norm.weight");
        for (i, (g, w)) in got.iter().zip(&t.values).enumerate() {
            let want = if norm { w - 1.0 } else { *w };
            assert_eq!(g.to_bits(), want.to_bits(), "{hf}[{i}]: {g} != {want}");
        }
        if norm {
            assert!(
                got.iter().any(|v| v.abs() > 0.05),
                "{hf}: stored w, not 1 + w"
            );
        }
    }

    // The Unigram tokenizer: whole pieces where the scores prefer them, byte fallback for what
    // the vocabulary lacks, the tab piece, BOS prepended; decoding restores the text.
    let tok = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(
        tok.encode("hello world", true).unwrap(),
        [2, piece_id("hello"), piece_id("\u{2581}world")]
    );
    let e_acute = tok.encode("é", false).unwrap();
    assert_eq!(e_acute, [BYTES + 0xC3, BYTES + 0xA9], "byte fallback");
    for text in [
        "hello world",
        "world hello  hello",
        "héllo\twörld",
        "hello\n",
    ] {
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids[0], 2, "{text:?}: BOS first");
        assert!(
            !ids.contains(&3),
            "{text:?}: byte fallback, never <unk>: {ids:?}"
        );
        assert_eq!(tok.decode(&ids, true).unwrap(), text, "{ids:?}");
    }

    // The imported model runs: finite logits, and decoding token by token past the local
    // window gives the logits of the whole sequence.
    let model = Model::load(&out, Device::Cpu, Kind::Float).unwrap();
    let ids = tok.encode(&"hello world ".repeat(6), true).unwrap();
    assert!(ids.len() > 2 * WINDOW as usize, "{ids:?}");
    let ids = Tensor::from_slice(&ids.iter().map(|&i| i as i64).collect::<Vec<_>>()).view([1, -1]);
    let len = ids.size()[1];
    let full = tch::no_grad(|| model.forward(&ids, None)).unwrap();
    assert_eq!(full.size(), [1, len, tokens().len() as i64]);
    assert!(bool::try_from(full.isfinite().all()).unwrap());
    let mut cache = model.new_cache(1).unwrap();
    let prefill = 3;
    let mut steps =
        vec![tch::no_grad(|| model.forward(&ids.narrow(1, 0, prefill), Some(&mut cache))).unwrap()];
    for t in prefill..len {
        steps.push(tch::no_grad(|| model.forward(&ids.narrow(1, t, 1), Some(&mut cache))).unwrap());
    }
    let stepped = Tensor::cat(&steps, 1);
    let diff = (&stepped - &full).abs().max().double_value(&[]);
    let scale = full.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-4 * scale.max(1.0),
        "decoding differs by {diff} (logits up to {scale})"
    );
}

/// Imports `fixture` after `damage` and returns the error, checking that it is one line that
/// names the file and that no output was left.
fn import_error(damage: impl FnOnce(&mut Fixture)) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut fixture = Fixture::new();
    damage(&mut fixture);
    let file = fixture.write(dir.path());
    let out = dir.path().join("model");
    let err = match import(&file, &out, Dtype::F32) {
        Ok(_) => panic!("the damaged file imported"),
        Err(e) => format!("{e:#}"),
    };
    assert!(!err.contains('\n'), "not one line: {err}");
    assert!(
        err.contains("tiny-gemma3.gguf"),
        "the file is not named: {err}"
    );
    assert!(!out.exists(), "an output was left behind: {err}");
    err
}

fn remove_key(fixture: &mut Fixture, key: &str) {
    let before = fixture.writer.kv.len();
    fixture.writer.kv.retain(|(k, _, _)| k != key);
    assert_eq!(fixture.writer.kv.len(), before - 1, "{key}");
}

/// A change that breaks the fixture.
type Damage = Box<dyn FnOnce(&mut Fixture)>;

#[test]
fn damaged_gemma3_files_fail_with_one_line_naming_the_problem() {
    let cases: Vec<(&str, Damage)> = vec![
        (
            "missing metadata key gemma3.attention.sliding_window",
            Box::new(|f| remove_key(f, "gemma3.attention.sliding_window")),
        ),
        (
            "missing metadata key gemma3.block_count",
            Box::new(|f| remove_key(f, "gemma3.block_count")),
        ),
        (
            "missing tensors blk.3.post_ffw_norm.weight",
            Box::new(|f| {
                f.tensors.remove("blk.3.post_ffw_norm.weight").unwrap();
            }),
        ),
        (
            "missing tensors blk.0.attn_q_norm.weight",
            Box::new(|f| {
                f.tensors.remove("blk.0.attn_q_norm.weight").unwrap();
            }),
        ),
        (
            "tensor blk.2.attn_k_norm.weight has shape [64], expected [128] for model.layers.2.self_attn.k_norm.weight",
            Box::new(|f| {
                f.tensors
                    .insert("blk.2.attn_k_norm.weight".into(), f32_tensor(&[64], vec![1.0; 64]));
            }),
        ),
        (
            "tensor blk.1.ffn_down.weight has shape [32, 256], expected [64, 256] for model.layers.1.mlp.down_proj.weight",
            Box::new(|f| {
                let t = f.tensors.get_mut("blk.1.ffn_down.weight").unwrap();
                t.dims = vec![256, 32];
                t.data.truncate(32 * GgmlType::Q6_K.type_size());
            }),
        ),
        (
            "unexpected tensor blk.0.ffn_gate_inp.weight",
            Box::new(|f| {
                f.tensors.insert(
                    "blk.0.ffn_gate_inp.weight".into(),
                    f32_tensor(&[HIDDEN as u64], vec![0.0; HIDDEN]),
                );
            }),
        ),
        (
            "SentencePiece vocabulary without tokenizer.ggml.scores",
            Box::new(|f| remove_key(f, "tokenizer.ggml.scores")),
        ),
        (
            "tokenizer.ggml.token_type has",
            Box::new(|f| {
                let types = f
                    .writer
                    .kv
                    .iter_mut()
                    .find(|(k, _, _)| k == "tokenizer.ggml.token_type")
                    .unwrap();
                let mut short = I32.to_le_bytes().to_vec();
                short.extend(3u64.to_le_bytes());
                short.extend([1i32, 1, 1].iter().flat_map(|v| v.to_le_bytes()));
                types.2 = short;
            }),
        ),
        (
            "tokenizer.ggml.model \"bert\" is not supported",
            Box::new(|f| {
                let model = f
                    .writer
                    .kv
                    .iter_mut()
                    .find(|(k, _, _)| k == "tokenizer.ggml.model")
                    .unwrap();
                let mut v = Vec::new();
                Writer::string(&mut v, "bert");
                *model = (model.0.clone(), STRING, v);
            }),
        ),
    ];
    for (want, damage) in cases {
        let err = import_error(damage);
        assert!(err.contains(want), "expected {want:?} in: {err}");
    }
}
