//! Llama and Gemma 3 hyper-parameters from GGUF metadata, and the config.json /
//! generation_config.json transformers' LlamaForCausalLM or Gemma3ForCausalLM reads.
use super::reader::GgufFile;
use super::tokenizer::ConvertedTokenizer;
use super::Dtype;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value as Json};

/// The architectures whose tensors map onto transformers' Llama (or Gemma 3) layout.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "gemma3"];

/// llama.cpp's fixed layout of Gemma 3 (llama-model.cpp, LLM_ARCH_GEMMA3): every sixth layer
/// global, the local layers' RoPE base 10000. The file stores neither.
const GEMMA3_SLIDING_WINDOW_PATTERN: usize = 6;
const GEMMA3_LOCAL_ROPE_THETA: f64 = 10_000.0;
/// Gemma 3 27B's layer count: llama.cpp scales its queries by hidden / heads rather than by the
/// head width, as its `query_pre_attn_scalar` says.
const GEMMA3_27B_LAYERS: usize = 62;

#[derive(Clone, Debug, PartialEq)]
pub struct LlamaHparams {
    pub n_layer: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub context_length: u64,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub vocab_size: usize,
    /// transformers' `rope_scaling`, or None for plain RoPE.
    pub rope_scaling: Option<Json>,
    /// Gemma 3's local attention window (`gemma3.attention.sliding_window`); `None` for llama.
    pub gemma3_sliding_window: Option<usize>,
}

impl LlamaHparams {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let file = gguf.path().display().to_string();
        let arch = gguf.architecture()?;
        if !SUPPORTED_ARCHITECTURES.contains(&arch) {
            bail!(
                "{file}: architecture {arch:?} is not supported (supported: {}; Llama 2/3, Mistral and SmolLM2 GGUF files use llama)",
                SUPPORTED_ARCHITECTURES.join(", ")
            );
        }
        let key = |k: &str| format!("{arch}.{k}");
        let count = |k: &str| -> Result<usize> {
            let v = gguf.require_u64(&key(k))?;
            if v == 0 {
                bail!("{file}: {} is 0", key(k));
            }
            Ok(v as usize)
        };
        let gemma3 = arch == "gemma3";
        let (n_layer, hidden, ffn) = (
            count("block_count")?,
            count("embedding_length")?,
            count("feed_forward_length")?,
        );
        let n_head = count("attention.head_count")?;
        let n_kv_head = match gguf.get_u64(&key("attention.head_count_kv"))? {
            Some(0) | None => n_head,
            Some(n) => n as usize,
        };
        if n_head % n_kv_head != 0 {
            bail!(
                "{file}: {n_head} attention heads do not split into {n_kv_head} key/value groups"
            );
        }
        let head_dim = match gguf.get_u64(&key("attention.key_length"))? {
            Some(n) => n as usize,
            None => hidden / n_head,
        };
        let rope_dim = gguf
            .get_u64(&key("rope.dimension_count"))?
            .map_or(head_dim, |n| n as usize);
        if rope_dim != head_dim {
            bail!("{file}: partial rotary embedding ({rope_dim} of {head_dim} head dims) does not fit transformers' Llama");
        }
        if head_dim % 2 != 0 {
            bail!("{file}: head dimension {head_dim} is odd; RoPE needs pairs");
        }
        if let Some(v) = gguf.get_u64(&key("attention.value_length"))? {
            if v as usize != head_dim {
                bail!("{file}: value head dim {v} differs from key head dim {head_dim}");
            }
        }
        let rope_theta = gguf.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
        let vocab_size = match gguf.get_u64(&key("vocab_size"))? {
            Some(n) => n as usize,
            None => gguf
                .get_array("tokenizer.ggml.tokens")?
                .map(<[_]>::len)
                .ok_or_else(|| {
                    anyhow!(
                        "{file}: neither {} nor tokenizer.ggml.tokens gives the vocabulary size",
                        key("vocab_size")
                    )
                })?,
        };
        Ok(Self {
            n_layer,
            hidden,
            ffn,
            n_head,
            n_kv_head,
            head_dim,
            context_length: gguf.get_u64(&key("context_length"))?.unwrap_or(2048),
            rope_theta,
            rms_eps: gguf
                .get_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(if gemma3 { 1e-6 } else { 1e-5 }),
            vocab_size,
            rope_scaling: rope_scaling(gguf, arch, head_dim, rope_theta)?,
            gemma3_sliding_window: if gemma3 {
                Some(count("attention.sliding_window")?)
            } else {
                None
            },
        })
    }

    /// The decoder family's transformers names and keys: Gemma 3's, or Llama's.
    fn family_json(&self, attention_bias: bool) -> Json {
        let Some(window) = self.gemma3_sliding_window else {
            return json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_act": "silu",
                "mlp_bias": false,
                "pretraining_tp": 1,
                "attention_bias": attention_bias,
            });
        };
        let layer_types: Vec<&str> = (0..self.n_layer)
            .map(|i| {
                if (i + 1) % GEMMA3_SLIDING_WINDOW_PATTERN == 0 {
                    "full_attention"
                } else {
                    "sliding_attention"
                }
            })
            .collect();
        let query_pre_attn_scalar = if self.n_layer == GEMMA3_27B_LAYERS {
            self.hidden / self.n_head
        } else {
            self.head_dim
        };
        json!({
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": window,
            "layer_types": layer_types,
            "rope_local_base_freq": GEMMA3_LOCAL_ROPE_THETA,
            "query_pre_attn_scalar": query_pre_attn_scalar,
            "final_logit_softcapping": null,
            "attn_logit_softcapping": null,
            "attention_bias": attention_bias,
        })
    }

    pub fn config_json(
        &self,
        tok: &ConvertedTokenizer,
        tied: bool,
        attention_bias: bool,
        dtype: Dtype,
    ) -> Json {
        let mut config = json!({
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.context_length,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
            "tie_word_embeddings": tied,
            "vocab_size": self.vocab_size,
            "bos_token_id": tok.bos.as_ref().map(|t| t.id),
            "eos_token_id": tok.eos.as_ref().map(|t| t.id),
            "pad_token_id": tok.pad.as_ref().map(|t| t.id),
            "torch_dtype": dtype.torch_name(),
        });
        if let (Json::Object(c), Json::Object(family)) =
            (&mut config, self.family_json(attention_bias))
        {
            c.extend(family);
        }
        config
    }

    /// Stop on EOS and, for chat models, on end-of-turn too.
    pub fn generation_config_json(tok: &ConvertedTokenizer) -> Json {
        let mut eos: Vec<u32> = tok.eos.iter().chain(&tok.eot).map(|t| t.id).collect();
        eos.dedup();
        let eos = match eos.as_slice() {
            [] => Json::Null,
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "bos_token_id": tok.bos.as_ref().map(|t| t.id),
            "eos_token_id": eos,
            "pad_token_id": tok.pad.as_ref().map(|t| t.id),
        })
    }
}

fn rope_scaling(gguf: &GgufFile, arch: &str, head_dim: usize, theta: f64) -> Result<Option<Json>> {
    let file = gguf.path().display().to_string();
    let key = |k: &str| format!("{arch}.rope.{k}");
    let kind = gguf.get_str(&key("scaling.type"))?;
    let factor = match gguf.get_f64(&key("scaling.factor"))? {
        Some(f) => Some(f),
        None => gguf.get_f64(&key("scale_linear"))?,
    };
    if let Some(t) = gguf.tensor("rope_freqs.weight") {
        let factors = gguf.dequantize(t)?;
        return llama3_scaling(&factors, theta, head_dim).map(Some).ok_or_else(|| {
            anyhow!("{file}: rope_freqs.weight does not match any Llama 3 rope scaling (factor, low/high frequency factors, original context)")
        });
    }
    let factor_or = |what: &str| {
        factor.ok_or_else(|| {
            anyhow!(
                "{file}: {what} rope scaling without {}",
                key("scaling.factor")
            )
        })
    };
    Ok(match kind {
        None | Some("none") => match factor {
            Some(f) if f != 1.0 && f != 0.0 => Some(json!({"rope_type": "linear", "factor": f})),
            _ => None,
        },
        Some("linear") => Some(json!({"rope_type": "linear", "factor": factor_or("linear")?})),
        Some("yarn") => {
            let original = gguf.get_u64(&key("scaling.original_context_length"))?.ok_or_else(|| {
                anyhow!("{file}: yarn rope scaling without {}", key("scaling.original_context_length"))
            })?;
            let mut s = json!({
                "rope_type": "yarn",
                "factor": factor_or("yarn")?,
                "original_max_position_embeddings": original,
            });
            for (gguf_key, hf_key) in [
                ("scaling.attn_factor", "attention_factor"),
                ("scaling.yarn_beta_fast", "beta_fast"),
                ("scaling.yarn_beta_slow", "beta_slow"),
            ] {
                if let Some(v) = gguf.get_f64(&key(gguf_key))? {
                    s[hf_key] = json!(v);
                }
            }
            Some(s)
        }
        Some(other) => bail!("{file}: rope scaling type {other:?} is not supported (supported: none, linear, yarn, Llama 3 rope_freqs)"),
    })
}

/// The per-frequency factors llama.cpp's converter writes for a Llama 3 `rope_scaling`
/// (convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors).
fn llama3_factors(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f64> {
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

/// The file keeps only the factors; find the parameters that reproduce them, among the values
/// Llama 3.x releases use.
fn llama3_scaling(factors: &[f32], theta: f64, head_dim: usize) -> Option<Json> {
    if factors.len() != head_dim / 2 {
        return None;
    }
    let factor = factors.iter().copied().fold(f32::MIN, f32::max) as f64;
    let factor = (factor * 1e4).round() / 1e4;
    for original in [8192.0, 4096.0, 2048.0, 16384.0, 32768.0, 65536.0, 131072.0] {
        for low in [1.0, 0.5, 2.0] {
            for high in [4.0, 2.0, 8.0, 1.0] {
                if high <= low {
                    continue;
                }
                let want = llama3_factors(theta, head_dim, factor, low, high, original);
                let fits = want
                    .iter()
                    .zip(factors)
                    .all(|(w, &f)| (w - f as f64).abs() <= 1e-3 * w.max(1.0));
                if fits {
                    return Some(json!({
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": original as u64,
                    }));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_is_recovered_from_its_factors() {
        // Llama 3.1 8B: theta 500000, head dim 128, factor 8, low 1, high 4, original 8192.
        let factors: Vec<f32> = llama3_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192.0)
            .iter()
            .map(|&f| f as f32)
            .collect();
        assert!(
            factors.iter().any(|&f| f > 1.0 && f < 8.0),
            "the test needs smoothed factors"
        );
        let s = llama3_scaling(&factors, 500000.0, 128).unwrap();
        assert_eq!(s["rope_type"], "llama3");
        assert_eq!(s["factor"], 8.0);
        assert_eq!(s["low_freq_factor"], 1.0);
        assert_eq!(s["high_freq_factor"], 4.0);
        assert_eq!(s["original_max_position_embeddings"], 8192);
        // Llama 3.2 uses factor 32.
        let factors: Vec<f32> = llama3_factors(500000.0, 64, 32.0, 1.0, 4.0, 8192.0)
            .iter()
            .map(|&f| f as f32)
            .collect();
        assert_eq!(
            llama3_scaling(&factors, 500000.0, 64).unwrap()["factor"],
            32.0
        );
    }

    #[test]
    fn arbitrary_factors_are_not_mistaken_for_llama3() {
        let factors: Vec<f32> = (0..64).map(|i| 1.0 + (i % 7) as f32).collect();
        assert!(llama3_scaling(&factors, 500000.0, 128).is_none());
    }
}
