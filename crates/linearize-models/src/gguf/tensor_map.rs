//! Which GGUF tensor becomes which transformers Llama parameter, with what shape, and which
//! ones llama.cpp stored with their rows permuted for its RoPE.
use super::hparams::LlamaHparams;
use super::reader::{GgufFile, TensorInfo};
use anyhow::{anyhow, bail, Result};
use std::collections::BTreeSet;

/// A tensor to write: its GGUF source, transformers name and shape.
#[derive(Clone, Debug)]
pub struct MappedTensor<'a> {
    pub source: &'a TensorInfo,
    pub name: String,
    pub shape: Vec<usize>,
    /// Q and K projections (and biases): llama.cpp interleaved each head's two RoPE halves;
    /// this many heads must be restored to transformers' half-split order.
    pub unpermute_heads: Option<usize>,
    /// A Gemma norm: llama.cpp stores `1 + weight` (convert_hf_to_gguf.py, Gemma3Model), so 1 is
    /// subtracted, in f32, as transformers' GGUF loader does.
    pub minus_one: bool,
}

/// The whole model's tensors, checked against the hyper-parameters.
#[derive(Debug)]
pub struct TensorMap<'a> {
    pub tensors: Vec<MappedTensor<'a>>,
    /// No `output.weight`: the LM head reuses the embedding.
    pub tied: bool,
    pub attention_bias: bool,
}

/// Per-layer GGUF tensor -> transformers parameter.
const LAYER: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];
/// Gemma 3's: no RoPE permutation, q/k norms, and norms on both sides of attention and MLP
/// (llama.cpp's `ffn_norm` is the MLP's input norm, as in Llama).
const GEMMA3_LAYER: &[(&str, &str)] = &[
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_q_norm.weight", "self_attn.q_norm.weight"),
    ("attn_k_norm.weight", "self_attn.k_norm.weight"),
    (
        "post_attention_norm.weight",
        "post_attention_layernorm.weight",
    ),
    ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
    ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
];
const LAYER_BIASES: &[(&str, &str)] = &[
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
    ("attn_output.bias", "self_attn.o_proj.bias"),
];
/// Read for the config (rope scaling), not written as a parameter.
const CONSUMED: &[&str] = &["rope_freqs.weight"];

impl<'a> TensorMap<'a> {
    pub fn new(gguf: &'a GgufFile, hp: &LlamaHparams) -> Result<Self> {
        let file = gguf.path().display().to_string();
        // Head counts and sizes come from the file's metadata: their products are checked.
        let rows = |heads: usize| {
            heads.checked_mul(hp.head_dim).ok_or_else(|| {
                anyhow!(
                    "{file}: {heads} heads of {} dimensions overflow",
                    hp.head_dim
                )
            })
        };
        let (q_rows, kv_rows) = (rows(hp.n_head)?, rows(hp.n_kv_head)?);
        let gemma3 = hp.gemma3_sliding_window.is_some();
        let (layer_table, family) = if gemma3 {
            (GEMMA3_LAYER, "Gemma 3")
        } else {
            (LAYER, "Llama")
        };
        // llama.cpp permutes Q and K rows for llama only.
        let permuted = |heads: usize| (!gemma3).then_some(heads);
        let expected = |suffix: &str| -> (Vec<usize>, Option<usize>) {
            match suffix {
                "attn_norm.weight"
                | "ffn_norm.weight"
                | "attn_output.bias"
                | "post_attention_norm.weight"
                | "post_ffw_norm.weight" => (vec![hp.hidden], None),
                "attn_q_norm.weight" | "attn_k_norm.weight" => (vec![hp.head_dim], None),
                "attn_q.weight" => (vec![q_rows, hp.hidden], permuted(hp.n_head)),
                "attn_k.weight" => (vec![kv_rows, hp.hidden], permuted(hp.n_kv_head)),
                "attn_v.weight" => (vec![kv_rows, hp.hidden], None),
                "attn_output.weight" => (vec![hp.hidden, q_rows], None),
                "ffn_gate.weight" | "ffn_up.weight" => (vec![hp.ffn, hp.hidden], None),
                "ffn_down.weight" => (vec![hp.hidden, hp.ffn], None),
                "attn_q.bias" => (vec![q_rows], permuted(hp.n_head)),
                "attn_k.bias" => (vec![kv_rows], permuted(hp.n_kv_head)),
                "attn_v.bias" => (vec![kv_rows], None),
                other => unreachable!("no shape rule for {other}"),
            }
        };

        let mut tensors = Vec::new();
        let mut seen = BTreeSet::new();
        for t in gguf.tensors() {
            let (name, (shape, unpermute_heads)) = match t.name.as_str() {
                "token_embd.weight" => (
                    "model.embed_tokens.weight".to_owned(),
                    (vec![hp.vocab_size, hp.hidden], None),
                ),
                "output_norm.weight" => ("model.norm.weight".to_owned(), (vec![hp.hidden], None)),
                "output.weight" => (
                    "lm_head.weight".to_owned(),
                    (vec![hp.vocab_size, hp.hidden], None),
                ),
                n if CONSUMED.contains(&n) => continue,
                n => {
                    let Some((layer, suffix)) =
                        n.strip_prefix("blk.").and_then(|r| r.split_once('.'))
                    else {
                        bail!("{file}: unexpected tensor {n} (not part of a {family} model)");
                    };
                    let hf = layer_table
                        .iter()
                        .chain(LAYER_BIASES)
                        .find(|(g, _)| *g == suffix)
                        .map(|p| p.1);
                    let (Ok(layer), Some(hf)) = (layer.parse::<usize>(), hf) else {
                        bail!("{file}: unexpected tensor {n} (not part of a {family} model; mixture-of-experts and other variants are not supported)");
                    };
                    if layer >= hp.n_layer {
                        bail!("{file}: tensor {n} belongs to layer {layer} but the model has {} layers", hp.n_layer);
                    }
                    (format!("model.layers.{layer}.{hf}"), expected(suffix))
                }
            };
            if t.shape() != shape {
                bail!(
                    "{file}: tensor {} has shape {:?}, expected {shape:?} for {name}",
                    t.name,
                    t.shape()
                );
            }
            seen.insert(t.name.clone());
            let minus_one = gemma3 && t.name.ends_with("norm.weight");
            tensors.push(MappedTensor {
                source: t,
                name,
                shape,
                unpermute_heads,
                minus_one,
            });
        }

        let layer_names = |table: &[(&str, &str)]| -> Vec<String> {
            (0..hp.n_layer)
                .flat_map(|i| table.iter().map(move |(g, _)| format!("blk.{i}.{g}")))
                .collect()
        };
        let mut required = vec![
            "token_embd.weight".to_owned(),
            "output_norm.weight".to_owned(),
        ];
        required.extend(layer_names(layer_table));
        let biases = layer_names(LAYER_BIASES);
        let present_biases = biases.iter().filter(|b| seen.contains(*b)).count();
        let attention_bias = present_biases > 0;
        if attention_bias {
            required.extend(biases);
        }
        let missing: Vec<_> = required.iter().filter(|n| !seen.contains(*n)).collect();
        if !missing.is_empty() {
            let more = if missing.len() > 5 {
                format!(" and {} more", missing.len() - 5)
            } else {
                String::new()
            };
            let list: Vec<_> = missing.iter().take(5).map(|s| s.as_str()).collect();
            let why = if attention_bias && present_biases < hp.n_layer.saturating_mul(4) {
                " (transformers' Llama has biases on all of q, k, v and o or on none)"
            } else {
                ""
            };
            bail!("{file}: missing tensors {}{more}{why}", list.join(", "));
        }
        Ok(Self {
            tensors,
            tied: !seen.contains("output.weight"),
            attention_bias,
        })
    }
}

/// Undoes llama.cpp's `permute` (convert_hf_to_gguf.py, LlamaModel.permute) on `x`, the
/// row-major rows of a Q or K projection (or bias: `row_len` 1): per head of `d` rows, GGUF row
/// `2j + i` holds transformers' row `i * d/2 + j`.
pub fn unpermute_rows(x: &[f32], n_head: usize, row_len: usize) -> Vec<f32> {
    let d = x.len() / row_len / n_head;
    let mut out = vec![0f32; x.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..d / 2 {
                let src = (h * d + 2 * j + i) * row_len;
                let dst = (h * d + i * d / 2 + j) * row_len;
                out[dst..dst + row_len].copy_from_slice(&x[src..src + row_len]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's permute, literally: reshape (n_head, 2, d/2, row) -> swap axes 1, 2.
    fn permute(x: &[f32], n_head: usize, row_len: usize) -> Vec<f32> {
        let d = x.len() / row_len / n_head;
        let mut out = Vec::with_capacity(x.len());
        for h in 0..n_head {
            for j in 0..d / 2 {
                for i in 0..2 {
                    let src = (h * d + i * d / 2 + j) * row_len;
                    out.extend_from_slice(&x[src..src + row_len]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_by_hand_and_inverts_permute() {
        // One head of 4 one-value rows: GGUF [a, b, c, d] holds transformers' rows [a, c, b, d].
        assert_eq!(unpermute_rows(&[0., 1., 2., 3.], 1, 1), [0., 2., 1., 3.]);
        let x: Vec<f32> = (0..3 * 8 * 5).map(|v| v as f32).collect();
        assert_eq!(unpermute_rows(&permute(&x, 3, 5), 3, 5), x);
        assert_ne!(permute(&x, 3, 5), x);
    }
}
