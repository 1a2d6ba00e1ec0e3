//! Text generation over any [`CausalLm`]: the prompt is prefilled in one call, then tokens are
//! decoded one at a time through the model's cache; on a GPU, once the model's state stops
//! growing, by replaying one captured CUDA graph per token ([`CausalLm::graph_decoder`]), which
//! computes the same logits without the launch cost of each kernel. The next token is chosen on
//! the CPU from the f32 logits (greedy, or temperature / top-k / top-p sampling with a seeded RNG of its own,
//! so a seed reproduces a generation whatever else uses libtorch's global RNG).
use crate::lm::{CausalLm, ReplayDecoder};
use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How the next token is chosen from the logits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SamplingConfig {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f64,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities sum to at
    /// least `top_p`. 1 keeps all.
    pub top_p: f64,
    /// Sample among the `top_k` most likely tokens only.
    pub top_k: Option<usize>,
    pub seed: u64,
}

impl SamplingConfig {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: None,
            seed: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature must be >= 0 (0 = greedy), got {}",
            self.temperature
        );
        ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top-p must be in (0, 1], got {}",
            self.top_p
        );
        ensure!(self.top_k != Some(0), "top-k must be at least 1");
        Ok(())
    }
}

/// Picks tokens from logits according to a [`SamplingConfig`].
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        let rng = StdRng::seed_from_u64(config.seed);
        Ok(Self { config, rng })
    }

    /// The next token given the logits over the vocabulary.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if self.config.temperature == 0.0 {
            return argmax(logits);
        }
        let candidates = self.distribution(logits)?;
        let mut u: f64 = self.rng.random();
        for &(token, p) in &candidates {
            if u < p {
                return Ok(token);
            }
            u -= p;
        }
        // Rounding left `u` a hair above the summed probabilities: the last candidate.
        Ok(candidates.last().expect("distribution is never empty").0)
    }

    /// The tokens sampling may pick and their probabilities (summing to 1), most likely first,
    /// after temperature, top-k and top-p, in that order (as transformers applies them).
    pub fn distribution(&self, logits: &[f32]) -> Result<Vec<(u32, f64)>> {
        ensure!(!logits.is_empty(), "empty logits");
        ensure!(
            logits.iter().all(|x| !x.is_nan()),
            "the model produced NaN logits"
        );
        let temperature = if self.config.temperature == 0.0 {
            1.0
        } else {
            self.config.temperature
        };
        let mut candidates: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, x as f64 / temperature))
            .collect();
        let by_logit = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if let Some(k) = self.config.top_k.filter(|&k| k < candidates.len()) {
            candidates.select_nth_unstable_by(k - 1, by_logit);
            candidates.truncate(k);
        }
        candidates.sort_unstable_by(by_logit);
        let max = candidates[0].1;
        ensure!(max.is_finite(), "the logits have no finite maximum");
        let total: f64 = candidates.iter().map(|c| (c.1 - max).exp()).sum();
        for c in &mut candidates {
            c.1 = (c.1 - max).exp() / total;
        }
        if self.config.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = candidates
                .iter()
                .take_while(|c| {
                    let before = mass;
                    mass += c.1;
                    before < self.config.top_p
                })
                .count();
            candidates.truncate(keep.max(1));
            let kept: f64 = candidates.iter().map(|c| c.1).sum();
            for c in &mut candidates {
                c.1 /= kept;
            }
        }
        Ok(candidates)
    }
}

/// Index of the largest logit (the first one on ties, like torch.argmax).
fn argmax(logits: &[f32]) -> Result<u32> {
    ensure!(!logits.is_empty(), "empty logits");
    ensure!(
        logits.iter().all(|x| !x.is_nan()),
        "the model produced NaN logits"
    );
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    Ok(best as u32)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation ends when one of these is chosen (the tokenizer's [`eos_ids`]).
    ///
    /// [`eos_ids`]: crate::tokenizer::Tokenizer::eos_ids
    pub stop_ids: Vec<u32>,
    /// Decode by CUDA graph replays where the model can ([`CausalLm::graph_ready`]).
    #[serde(default = "default_cuda_graphs")]
    pub cuda_graphs: bool,
}

fn default_cuda_graphs() -> bool {
    true
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// A stop id was chosen (it is not part of the generated tokens).
    Eos(u32),
    MaxNewTokens,
    /// The sequence reached the model's maximum context.
    ContextFull,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// The generated tokens, without the prompt and without the stop id.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// Continues `prompt`, calling `on_token` with each generated token as soon as it is chosen
/// (for streaming; an error from it stops generation).
pub fn generate<M: CausalLm>(
    model: &M,
    prompt: &[u32],
    config: &GenerateConfig,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    ensure!(!prompt.is_empty(), "cannot generate from an empty prompt");
    let max_context = model.max_context().map(|n| n.max(0) as usize);
    if let Some(max) = max_context {
        ensure!(
            prompt.len() <= max,
            "the prompt has {} tokens, more than the model's context of {max}",
            prompt.len()
        );
    }
    let mut sampler = Sampler::new(config.sampling.clone())?;
    let _no_grad = tch::no_grad_guard();
    let device = model.device();
    let mut cache = model.new_cache(1)?;
    let mut tokens = Vec::new();
    if config.max_new_tokens == 0 {
        return Ok(Generation {
            tokens,
            stop: StopReason::MaxNewTokens,
        });
    }
    let mut logits = last_logits(model.forward_cached(&ids_tensor(prompt, device), &mut cache)?)?;
    // Held until a graph decoder takes it over.
    let mut cache = Some(cache);
    let mut replay: Option<Box<dyn ReplayDecoder + '_>> = None;
    // A capture must follow an eager one-token step (lazy set-up), not only the prefill.
    let mut eager_steps = 0;
    loop {
        let next = sampler.sample(&logits)?;
        if config.stop_ids.contains(&next) {
            return Ok(Generation {
                tokens,
                stop: StopReason::Eos(next),
            });
        }
        tokens.push(next);
        on_token(next)?;
        if tokens.len() == config.max_new_tokens {
            return Ok(Generation {
                tokens,
                stop: StopReason::MaxNewTokens,
            });
        }
        if max_context.is_some_and(|max| prompt.len() + tokens.len() >= max) {
            return Ok(Generation {
                tokens,
                stop: StopReason::ContextFull,
            });
        }
        if replay.is_none() && config.cuda_graphs && eager_steps > 0 {
            if let Some(ready) = cache.take_if(|c| model.graph_ready(c)) {
                replay = Some(model.graph_decoder(ready)?);
            }
        }
        logits = match (replay.as_mut(), cache.as_mut()) {
            (Some(replay), _) => replay.decode(next)?,
            (None, Some(cache)) => {
                eager_steps += 1;
                last_logits(model.forward_cached(&ids_tensor(&[next], device), cache)?)?
            }
            (None, None) => bail!("generation lost its decoding state"),
        };
    }
}

/// (1, L) int64 on `device`.
fn ids_tensor(ids: &[u32], device: Device) -> Tensor {
    let ids: Vec<i64> = ids.iter().map(|&id| id as i64).collect();
    Tensor::from_slice(&ids).view([1, -1]).to_device(device)
}

/// The logits (vocab,) of the last position of (1, L, vocab), on the CPU.
fn last_logits(logits: Tensor) -> Result<Vec<f32>> {
    let size = logits.size();
    if size.len() != 3 || size[0] != 1 || size[1] < 1 {
        bail!("expected logits of shape (1, L, vocab), got {size:?}");
    }
    let last = logits
        .select(1, -1)
        .squeeze_dim(0)
        .to_kind(Kind::Float)
        .to_device(Device::Cpu);
    Vec::<f32>::try_from(&last).context("copying logits to the CPU")
}
