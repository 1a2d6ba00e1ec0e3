//! Recall probes, generated deterministically from a seed and scored on any [`CausalLm`] with
//! its tokenizer. Linear attention compresses the context into a fixed-size state; these probes
//! show what that costs where softmax attention looks things up exactly.
//!
//! **Passkey retrieval** (as in Landmark Attention and LongLoRA): an instruction, filler
//! sentences ("The grass is green. The sky is blue. ...", repeated), somewhere among them "The pass key is
//! NNNNN. Remember it. NNNNN is the pass key.", more filler, then "What is the pass key? The pass
//! key is". The prompt is built to at most the target length in tokens, with the needle at depths
//! spread evenly over the filler; the model decodes greedily and is right when the first number
//! in its answer is the pass key.
//!
//! **MQAR** (Zoology's multi-query associative recall, in words a pretrained model can read):
//! "word: number" lines (the key-value pairs), then the same keys again in shuffled order, each
//! followed by its number. A query is right when, fed the text up to each token of the number,
//! the model's most likely next token is that token for every token of the number (what greedy
//! decoding after "word:" would produce). Accuracy is reported by the distance in tokens between
//! the pair and its query, in power-of-two buckets.
use anyhow::{bail, ensure, Context, Result};
use linearize_models::generate::{generate, GenerateConfig, SamplingConfig};
use linearize_models::lm::CausalLm;
use linearize_models::tokenizer::Tokenizer;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

const PASSKEY_INTRO: &str = "There is an important piece of information hidden inside a lot of \
    irrelevant text. Find it and memorize it. I will quiz you about it.";
/// Repeated in this order, as many sentences as fit.
const PASSKEY_FILLER: [&str; 5] = [
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
];
const PASSKEY_QUESTION: &str = " What is the pass key? The pass key is";

fn passkey_needle(key: u32) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key.")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasskeyConfig {
    pub enabled: bool,
    /// Shortest prompt, tokens.
    pub min_length: usize,
    /// Longest prompt, tokens (lengths double from `min_length` up to it, it included); capped
    /// at the model's context.
    pub max_length: usize,
    /// Prompts per length, needles at depths (i + 0.5) / trials of the filler.
    pub trials: usize,
}

impl Default for PasskeyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_length: 256,
            max_length: 1024,
            trials: 4,
        }
    }
}

impl PasskeyConfig {
    /// The prompt lengths: doubling from `min_length`, then `max_length` itself, none above
    /// `max_context`.
    pub fn lengths(&self, max_context: Option<usize>) -> Result<Vec<usize>> {
        ensure!(
            self.min_length >= 1 && self.min_length <= self.max_length,
            "passkey lengths need 1 <= min_length <= max_length, got {} and {}",
            self.min_length,
            self.max_length
        );
        ensure!(self.trials >= 1, "passkey trials must be at least 1");
        let max = max_context.map_or(self.max_length, |m| m.min(self.max_length));
        let mut lengths = Vec::new();
        let mut length = self.min_length;
        while length < max {
            lengths.push(length);
            length *= 2;
        }
        if max >= self.min_length {
            lengths.push(max);
        }
        Ok(lengths)
    }
}

/// One passkey prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct PasskeyPrompt {
    /// The target length the prompt was built for.
    pub length: usize,
    /// Where the needle sits, as a fraction of the filler before it.
    pub depth: f64,
    pub passkey: u32,
    pub ids: Vec<u32>,
    /// Tokens to decode: enough for the pass key and a little more.
    pub answer_tokens: usize,
}

/// The prompts of `cfg` for a model with context `max_context`, deterministic from `seed`.
pub fn passkey_prompts(
    tokenizer: &Tokenizer,
    cfg: &PasskeyConfig,
    seed: u64,
    max_context: Option<usize>,
) -> Result<Vec<PasskeyPrompt>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let intro = tokenizer.encode(PASSKEY_INTRO, true)?;
    let filler = PASSKEY_FILLER
        .iter()
        .map(|sentence| tokenizer.encode(sentence, false))
        .collect::<Result<Vec<_>>>()?;
    let question = tokenizer.encode(PASSKEY_QUESTION, false)?;
    let mut prompts = Vec::new();
    for length in cfg.lengths(max_context)? {
        for trial in 0..cfg.trials {
            let passkey = rng.random_range(10_000..100_000);
            let needle = tokenizer.encode(&passkey_needle(passkey), false)?;
            let answer = tokenizer.encode(&format!(" {passkey}."), false)?;
            // Decoding needs room after the prompt too.
            let budget = length.saturating_sub(answer.len() + 1);
            let fixed = intro.len() + needle.len() + question.len();
            let mut room = budget.saturating_sub(fixed);
            let sentences: Vec<&[u32]> = filler
                .iter()
                .cycle()
                .map_while(|sentence| {
                    room = room.checked_sub(sentence.len())?;
                    Some(sentence.as_slice())
                })
                .collect();
            ensure!(
                !sentences.is_empty(),
                "a passkey prompt of {length} tokens has no room for filler (the fixed parts \
                 take {fixed} tokens); raise min_length"
            );
            let depth = (trial as f64 + 0.5) / cfg.trials as f64;
            let before = (depth * sentences.len() as f64).round() as usize;
            let mut ids = intro.clone();
            ids.extend(sentences[..before].concat());
            ids.extend_from_slice(&needle);
            ids.extend(sentences[before..].concat());
            ids.extend_from_slice(&question);
            prompts.push(PasskeyPrompt {
                length,
                depth: before as f64 / sentences.len() as f64,
                passkey,
                ids,
                answer_tokens: answer.len() + 1,
            });
        }
    }
    Ok(prompts)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PasskeyTrial {
    pub length: usize,
    /// Prompt tokens actually used (at most `length`).
    pub prompt_tokens: usize,
    pub depth: f64,
    pub passkey: u32,
    /// The decoded answer.
    pub answer: String,
    pub correct: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PasskeyLength {
    pub length: usize,
    pub trials: usize,
    pub accuracy: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PasskeyReport {
    pub accuracy: f64,
    pub by_length: Vec<PasskeyLength>,
    pub trials: Vec<PasskeyTrial>,
}

/// Greedy answers of `model` to `prompts`.
pub fn passkey<M: CausalLm>(
    model: &M,
    tokenizer: &Tokenizer,
    prompts: &[PasskeyPrompt],
) -> Result<PasskeyReport> {
    ensure!(!prompts.is_empty(), "no passkey prompts to score");
    let mut trials = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let config = GenerateConfig {
            max_new_tokens: prompt.answer_tokens,
            sampling: SamplingConfig::greedy(),
            stop_ids: tokenizer.eos_ids().to_vec(),
            cuda_graphs: true,
        };
        let generation = generate(model, &prompt.ids, &config, |_| Ok(()))
            .with_context(|| format!("passkey prompt of {} tokens", prompt.ids.len()))?;
        let answer = tokenizer.decode(&generation.tokens, true)?;
        trials.push(PasskeyTrial {
            length: prompt.length,
            prompt_tokens: prompt.ids.len(),
            depth: prompt.depth,
            passkey: prompt.passkey,
            correct: first_number(&answer) == Some(prompt.passkey.to_string()),
            answer,
        });
    }
    let mut by_length: Vec<PasskeyLength> = Vec::new();
    for trial in &trials {
        match by_length.last_mut() {
            Some(last) if last.length == trial.length => {
                last.trials += 1;
                last.accuracy += trial.correct as u8 as f64;
            }
            _ => by_length.push(PasskeyLength {
                length: trial.length,
                trials: 1,
                accuracy: trial.correct as u8 as f64,
            }),
        }
    }
    for bucket in &mut by_length {
        bucket.accuracy /= bucket.trials as f64;
    }
    Ok(PasskeyReport {
        accuracy: fraction(trials.iter().map(|t| t.correct)),
        by_length,
        trials,
    })
}

/// The first run of ASCII digits in `text`.
fn first_number(text: &str) -> Option<String> {
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let digits: String = text[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some(digits)
}

fn fraction(outcomes: impl Iterator<Item = bool>) -> f64 {
    let (mut hits, mut total) = (0usize, 0usize);
    for hit in outcomes {
        hits += hit as usize;
        total += 1;
    }
    if total == 0 {
        0.0
    } else {
        hits as f64 / total as f64
    }
}

/// Keys of the MQAR pairs: common, distinct English words.
const MQAR_KEYS: [&str; 64] = [
    "apple", "river", "candle", "garden", "window", "tiger", "pencil", "forest", "bottle",
    "mirror", "rocket", "basket", "island", "copper", "violin", "desert", "ladder", "monkey",
    "planet", "silver", "tunnel", "wallet", "butter", "castle", "dragon", "engine", "falcon",
    "guitar", "hammer", "jacket", "kettle", "lemon", "marble", "needle", "orange", "parrot",
    "rabbit", "saddle", "tomato", "turtle", "velvet", "walnut", "anchor", "bridge", "cactus",
    "dolphin", "feather", "glacier", "harbor", "lantern", "meadow", "nickel", "oyster", "pepper",
    "quartz", "ribbon", "spider", "thunder", "umbrella", "valley", "wizard", "yogurt", "zebra",
    "blanket",
];
const MQAR_INTRO: &str = "Remember the number that goes with each word.\n";
const MQAR_RECALL: &str = "Now recall them.\n";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqarConfig {
    pub enabled: bool,
    /// Key-value pairs per sample (at most 64).
    pub num_pairs: usize,
    /// Samples.
    pub trials: usize,
}

impl Default for MqarConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            num_pairs: 16,
            trials: 4,
        }
    }
}

/// One query of an MQAR sample: the value's tokens sit at `value_start..value_start + len` of
/// the sample.
#[derive(Clone, Debug, PartialEq)]
pub struct MqarQuery {
    pub value_start: usize,
    pub value: Vec<u32>,
    /// Tokens from the value's first occurrence (in its pair) to this one.
    pub distance: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct MqarSample {
    pub ids: Vec<u32>,
    pub queries: Vec<MqarQuery>,
}

/// The samples of `cfg`, deterministic from `seed`.
pub fn mqar_samples(tokenizer: &Tokenizer, cfg: &MqarConfig, seed: u64) -> Result<Vec<MqarSample>> {
    ensure!(
        (1..=MQAR_KEYS.len()).contains(&cfg.num_pairs),
        "MQAR needs 1 to {} pairs, got {}",
        MQAR_KEYS.len(),
        cfg.num_pairs
    );
    ensure!(cfg.trials >= 1, "MQAR trials must be at least 1");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let newline = tokenizer.encode("\n", false)?;
    let mut samples = Vec::with_capacity(cfg.trials);
    for _ in 0..cfg.trials {
        let mut keys: Vec<&str> = MQAR_KEYS.to_vec();
        keys.shuffle(&mut rng);
        keys.truncate(cfg.num_pairs);
        let pairs = keys
            .iter()
            .map(|key| {
                let value: u32 = rng.random_range(100..1000);
                Ok((
                    tokenizer.encode(&format!("{key}:"), false)?,
                    tokenizer.encode(&format!(" {value}"), false)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut ids = tokenizer.encode(MQAR_INTRO, true)?;
        let mut first_at = Vec::with_capacity(pairs.len());
        for (key, value) in &pairs {
            ids.extend_from_slice(key);
            first_at.push(ids.len());
            ids.extend_from_slice(value);
            ids.extend_from_slice(&newline);
        }
        ids.extend(tokenizer.encode(MQAR_RECALL, false)?);
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.shuffle(&mut rng);
        let mut queries = Vec::with_capacity(pairs.len());
        for i in order {
            let (key, value) = &pairs[i];
            ids.extend_from_slice(key);
            queries.push(MqarQuery {
                value_start: ids.len(),
                value: value.clone(),
                distance: ids.len() - first_at[i],
            });
            ids.extend_from_slice(value);
            ids.extend_from_slice(&newline);
        }
        samples.push(MqarSample { ids, queries });
    }
    Ok(samples)
}

/// Accuracy of the queries whose distance is in `min_distance..max_distance`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistanceBucket {
    pub min_distance: usize,
    pub max_distance: usize,
    pub queries: usize,
    pub accuracy: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MqarReport {
    pub accuracy: f64,
    pub queries: usize,
    /// Longest sample, tokens.
    pub max_tokens: usize,
    /// Non-empty power-of-two buckets, nearest first.
    pub by_distance: Vec<DistanceBucket>,
}

/// Scores `model` on `samples`, one full forward pass per sample.
pub fn mqar<M: CausalLm>(model: &M, samples: &[MqarSample]) -> Result<MqarReport> {
    ensure!(!samples.is_empty(), "no MQAR samples to score");
    let _no_grad = tch::no_grad_guard();
    let mut outcomes: Vec<(usize, bool)> = Vec::new();
    let mut max_tokens = 0;
    for sample in samples {
        if let Some(max) = model.max_context() {
            if sample.ids.len() as i64 > max {
                bail!(
                    "an MQAR sample has {} tokens, more than the model's context of {max}; \
                     lower num_pairs",
                    sample.ids.len()
                );
            }
        }
        max_tokens = max_tokens.max(sample.ids.len());
        let predicted = greedy_predictions(model, &sample.ids)?;
        for query in &sample.queries {
            let correct = query
                .value
                .iter()
                .enumerate()
                .all(|(j, &token)| predicted[query.value_start + j - 1] == token as i64);
            outcomes.push((query.distance, correct));
        }
    }
    let mut by_distance: Vec<DistanceBucket> = Vec::new();
    let mut sorted = outcomes.clone();
    sorted.sort_by_key(|&(d, _)| d);
    for (distance, correct) in sorted {
        let min = 1usize << distance.max(1).ilog2();
        match by_distance.last_mut() {
            Some(last) if last.min_distance == min => {
                last.queries += 1;
                last.accuracy += correct as u8 as f64;
            }
            _ => by_distance.push(DistanceBucket {
                min_distance: min,
                max_distance: min * 2,
                queries: 1,
                accuracy: correct as u8 as f64,
            }),
        }
    }
    for bucket in &mut by_distance {
        bucket.accuracy /= bucket.queries as f64;
    }
    Ok(MqarReport {
        accuracy: fraction(outcomes.iter().map(|o| o.1)),
        queries: outcomes.len(),
        max_tokens,
        by_distance,
    })
}

/// The most likely next token after each prefix of `ids` (entry j follows ids[..=j]).
fn greedy_predictions<M: CausalLm>(model: &M, ids: &[u32]) -> Result<Vec<i64>> {
    let input: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let input = Tensor::from_slice(&input)
        .view([1, -1])
        .to_device(model.device());
    let logits = model.forward(&input)?;
    let best = logits
        .argmax(-1, false)
        .squeeze_dim(0)
        .to_kind(Kind::Int64)
        .to_device(Device::Cpu);
    Vec::<i64>::try_from(&best).context("copying predictions")
}
