//! Rotary position embedding in Hugging Face's layout: a head's first and second halves are the
//! two coordinates rotated together (`rotate_half`), not interleaved pairs.
use crate::config::{ModelConfig, RopeScaling};
use anyhow::{bail, Result};
use std::f64::consts::PI;
use tch::{Device, Kind, Tensor};

/// Positions the tables cover at most. A config's `max_position_embeddings` is a claim of the
/// model directory, not a size to allocate: 10^12 would ask for terabytes. 2^17 (Llama 3.1's
/// context) costs 128 MB at head_dim 128 in f32; longer positions are an error.
pub const MAX_TABLE_POSITIONS: i64 = 1 << 17;

/// cos/sin tables for every position up to `max_position_embeddings` (at most
/// [`MAX_TABLE_POSITIONS`]).
pub struct Rope {
    cos: Tensor, // (max_positions, head_dim), model dtype
    sin: Tensor, // (max_positions, head_dim)
    max_position_embeddings: i64,
}

impl Rope {
    /// Precomputes the tables the way HF does: angles in f32, cos/sin times the scaling's
    /// attention factor (yarn) in f32, then cast to `kind`.
    pub fn new(cfg: &ModelConfig, kind: Kind, device: Device) -> Self {
        Self::with(cfg, cfg.rope_theta, cfg.rope_scaling.as_ref(), kind, device)
    }

    /// As [`Rope::new`] with another base and scaling than the config's global ones (Gemma 3's
    /// local layers).
    pub fn with(
        cfg: &ModelConfig,
        theta: f64,
        scaling: Option<&RopeScaling>,
        kind: Kind,
        device: Device,
    ) -> Self {
        let inv_freq: Vec<f32> = inv_freq_with(cfg.head_dim, theta, scaling)
            .into_iter()
            .map(|f| f as f32)
            .collect();
        let inv_freq = Tensor::from_slice(&inv_freq).to_device(device); // (d/2,)
        let table = cfg.max_position_embeddings.min(MAX_TABLE_POSITIONS);
        let positions = Tensor::arange(table, (Kind::Float, device)); // (P,)
        let freqs = positions.outer(&inv_freq); // (P, d/2)
        let angles = Tensor::cat(&[&freqs, &freqs], -1); // (P, d)
        let scale = scaling.map_or(1.0, |s| s.attention_factor()) as f32 as f64;
        Self {
            cos: (angles.cos() * scale).to_kind(kind),
            sin: (angles.sin() * scale).to_kind(kind),
            max_position_embeddings: cfg.max_position_embeddings,
        }
    }

    pub fn max_positions(&self) -> i64 {
        self.cos.size()[0]
    }

    /// The (cos, sin) rows for positions `offset .. offset + len`, each (len, head_dim).
    pub fn cos_sin(&self, offset: i64, len: i64) -> Result<(Tensor, Tensor)> {
        if offset + len > self.max_positions() {
            let position = offset + len - 1;
            if self.max_positions() < self.max_position_embeddings {
                bail!(
                    "position {position} is beyond the {MAX_TABLE_POSITIONS} positions supported \
                     (the model's max_position_embeddings is {})",
                    self.max_position_embeddings
                );
            }
            bail!(
                "position {position} is beyond max_position_embeddings = {} of the model",
                self.max_positions()
            );
        }
        Ok((
            self.cos.narrow(0, offset, len),
            self.sin.narrow(0, offset, len),
        ))
    }

    /// The (cos, sin) rows for positions `position .. position + len`, each (len, head_dim), with
    /// `position` an int64 scalar on the device (read there: nothing waits for it on the host,
    /// which a CUDA graph needs). The caller checks the range.
    pub fn cos_sin_at(&self, position: &Tensor, len: i64) -> (Tensor, Tensor) {
        let rows = Tensor::arange(len, (Kind::Int64, position.device())) + position; // (len,)
        (
            self.cos.index_select(0, &rows),
            self.sin.index_select(0, &rows),
        )
    }

    /// Rotates `x` (b, h, L, d) by the angles of its L positions (`cos`, `sin` from
    /// [`Rope::cos_sin`]).
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        x * cos + rotate_half(x) * sin
    }
}

/// [-x2, x1] for x = [x1, x2] split along the last dim.
fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size().last().copied().unwrap_or(0) / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// The inverse frequencies theta^(-2i/d) of the head_dim/2 rotated pairs, with the config's
/// scaling applied (transformers' `ROPE_INIT_FUNCTIONS`, computed in f64).
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    inv_freq_with(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.as_ref())
}

/// [`inv_freq`] for heads `head_dim` wide, base `theta` and `scaling`.
pub fn inv_freq_with(head_dim: i64, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f64> {
    let d = head_dim as f64;
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d))
        .collect();
    match scaling.copied() {
        // Dynamic NTK changes nothing up to max_position_embeddings (see `RopeScaling::Dynamic`).
        None | Some(RopeScaling::Dynamic { .. }) => base,
        Some(RopeScaling::Linear { factor }) => base.into_iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            // Llama 3.1: long wavelengths (low frequencies) are slowed down by `factor`, short ones
            // kept, and the band between interpolated smoothly.
            let old_len = original_max_position_embeddings as f64;
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            truncate,
            ..
        }) => {
            // YaRN: dims that turn fewer than `beta_slow` times over the pretraining length are
            // interpolated (divided by `factor`), those turning more than `beta_fast` times kept,
            // with a linear ramp over the dims between.
            let old_len = original_max_position_embeddings as f64;
            let correction_dim =
                |rotations: f64| d * (old_len / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln());
            let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
            if truncate {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
            if low == high {
                high += 0.001; // transformers' guard against a zero-width ramp
            }
            base.into_iter()
                .enumerate()
                .map(|(i, f)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    f / factor * ramp + f * (1.0 - ramp)
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(scaling: &str) -> ModelConfig {
        ModelConfig::from_json_str(&format!(
            r#"{{"model_type": "llama", "vocab_size": 8, "hidden_size": 32, "intermediate_size": 8,
               "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 10000.0,
               "max_position_embeddings": 40, "rope_scaling": {scaling}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn llama3_scaling_keeps_high_divides_low_and_smooths_between() {
        let plain = inv_freq(&config("null"));
        let scaled = inv_freq(&config(
            r#"{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}"#,
        ));
        // head_dim 16: wavelengths 2*pi*10000^(i/8) = 6.3, 19.9, 62.8, 199, ... against the
        // band [64/4, 64/1] = [16, 64].
        assert_eq!(plain.len(), 8);
        assert_eq!(scaled[0], plain[0]);
        for i in 1..3 {
            assert!(
                scaled[i] < plain[i] && scaled[i] > plain[i] / 8.0,
                "band {i}"
            );
        }
        for i in 3..8 {
            assert!((scaled[i] - plain[i] / 8.0).abs() < 1e-15, "low {i}");
        }
    }

    /// The rotation of a pair (x_i, x_{i+d/2}) by angle p * f_i, written out per element.
    fn naive_rotate(x: &[f32], p: i64, freqs: &[f64]) -> Vec<f32> {
        let half = x.len() / 2;
        let mut out = vec![0f32; x.len()];
        for i in 0..half {
            let (s, c) = (p as f64 * freqs[i]).sin_cos();
            let (a, b) = (x[i] as f64, x[i + half] as f64);
            out[i] = (a * c - b * s) as f32;
            out[i + half] = (b * c + a * s) as f32;
        }
        out
    }

    #[test]
    fn apply_matches_per_pair_rotation() {
        let cfg = config("null");
        let rope = Rope::new(&cfg, Kind::Float, Device::Cpu);
        let x = Tensor::randn([1, 2, 5, 16], (Kind::Float, Device::Cpu));
        let offset = 30;
        let (cos, sin) = rope.cos_sin(offset, 5).unwrap();
        let y = Rope::apply(&x, &cos, &sin);
        let freqs = inv_freq(&cfg);
        for h in 0..2 {
            for t in 0..5 {
                let xv = Vec::<f32>::try_from(x.get(0).get(h).get(t)).unwrap();
                let yv = Vec::<f32>::try_from(y.get(0).get(h).get(t)).unwrap();
                let want = naive_rotate(&xv, offset + t, &freqs);
                for (a, b) in yv.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "h{h} t{t}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn positions_beyond_the_table_are_refused() {
        let rope = Rope::new(&config("null"), Kind::Float, Device::Cpu);
        assert!(rope.cos_sin(35, 5).is_ok());
        let e = rope.cos_sin(36, 5).unwrap_err().to_string();
        assert!(e.contains("max_position_embeddings = 40"), "{e}");
    }
}
