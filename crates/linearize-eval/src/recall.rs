//! Recall probes, generated deterministically from a seed and scored on any [`CausalLm`] with
//! its tokenizer. Linear attention compresses the context into a fixed-size state; these probes
//! show what that costs where softmax attention looks things up exactly.
//!
//! **Passkey retrieval** (as in Landmark Attention and LongLoRA): an instruction, filler
//! sentences ("The grass is green. The sky is blue. ...", repeated), somewhere among them "The pass key is
//! NNNNN. Remember it. NNNNN is the pass key.", more filler, then "What is the pass key? The pass
//! key is". The prompt is built to at most the target length in tokens (every power of two from
//! `min_length` to `max_length`, by default the model's context), with the needle at each of the
//! configured depths (fractions of the filler before it); the model decodes greedily and is right
//! when the first number in its answer is the pass key.
//!
//! **Multi-key needle**: the same filler with several needles, each naming its key ("The red pass
//! key is NNNNN. ..."), spread evenly over the filler; the question asks for one of them, chosen
//! at random. Right when the first number of the answer is that key's: a model that only keeps
//! the latest or the most salient number fails it.
//!
//! **MQAR** (Zoology's multi-query associative recall, in words a pretrained model can read):
//! "word: number" lines (the key-value pairs), then the same keys again in shuffled order, each
//! followed by its number. A query is right when, fed the text up to each token of the number,
//! the model's most likely next token is that token for every token of the number (what greedy
//! decoding after "word:" would produce). Accuracy is reported by the distance in tokens between
//! the pair and its query, in power-of-two buckets.
//!
//! Every accuracy comes with its count and a 95% Wilson score interval ([`wilson`]): with the
//! few trials a long-context probe affords, 3 of 4 and 75 of 100 are different claims.
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

/// Names of the multi-key needles' keys.
const KEY_NAMES: [&str; 8] = [
    "red", "blue", "green", "gold", "silver", "black", "white", "purple",
];

fn named_needle(name: &str, key: u32) -> String {
    format!(" The {name} pass key is {key}. Remember it. {key} is the {name} pass key.")
}

fn named_question(name: &str) -> String {
    format!(" What is the {name} pass key? The {name} pass key is")
}

/// z for a two-sided 95% interval: the 0.975 quantile of the standard normal.
const Z95: f64 = 1.959_963_984_540_054;

/// A two-sided interval of an accuracy.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
}

/// The 95% Wilson score interval of `correct` successes in `n` trials: the proportions p whose
/// normal test `|k/n − p| <= z·sqrt(p(1−p)/n)` accepts, i.e.
/// `(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)`. Unlike p̂ ± z·se it stays inside
/// [0, 1] and is not empty at 0 or n successes. `[0, 1]` when n is 0.
pub fn wilson(correct: usize, n: usize) -> Interval {
    if n == 0 {
        return Interval {
            low: 0.0,
            high: 1.0,
        };
    }
    let (k, n) = (correct as f64, n as f64);
    let p = k / n;
    let z2 = Z95 * Z95;
    let denominator = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denominator;
    let half = Z95 * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denominator;
    Interval {
        low: (center - half).max(0.0),
        high: (center + half).min(1.0),
    }
}

/// Right answers out of some trials: the count, the accuracy and its 95% Wilson interval.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Tally {
    n: usize,
    correct: usize,
}

impl Tally {
    fn add(&mut self, correct: bool) {
        self.n += 1;
        self.correct += correct as usize;
    }

    fn accuracy(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.correct as f64 / self.n as f64
        }
    }

    fn ci95(&self) -> Interval {
        wilson(self.correct, self.n)
    }
}

/// Groups outcomes by key, keeping the order in which keys first appear.
fn tallies<K: PartialEq + Copy>(outcomes: impl Iterator<Item = (K, bool)>) -> Vec<(K, Tally)> {
    let mut groups: Vec<(K, Tally)> = Vec::new();
    for (key, correct) in outcomes {
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, tally)) => tally.add(correct),
            None => {
                let mut tally = Tally::default();
                tally.add(correct);
                groups.push((key, tally));
            }
        }
    }
    groups
}

/// Prompt lengths: every power of two times `min` below the longest, then the longest (the
/// smaller of `max` and the model's context), none above the context.
fn doubling_lengths(
    what: &str,
    min: usize,
    max: Option<usize>,
    max_context: Option<usize>,
) -> Result<Vec<usize>> {
    let max = match (max, max_context) {
        (Some(m), Some(c)) => m.min(c),
        (Some(m), None) | (None, Some(m)) => m,
        (None, None) => {
            bail!("{what}.max_length is not set and the model's context is unknown: set max_length")
        }
    };
    ensure!(min >= 1, "{what}.min_length must be at least 1, got {min}");
    let mut lengths = Vec::new();
    let mut length = min;
    while length < max {
        lengths.push(length);
        length *= 2;
    }
    if max >= min {
        lengths.push(max);
    }
    Ok(lengths)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasskeyConfig {
    pub enabled: bool,
    /// Shortest prompt, tokens.
    pub min_length: usize,
    /// Longest prompt, tokens (lengths double from `min_length` up to it, it included); capped
    /// at the model's context. `null`: the model's context.
    pub max_length: Option<usize>,
    /// Where the needle sits, as fractions of the filler before it; every length is probed at
    /// every depth.
    pub depths: Vec<f64>,
    /// Prompts per length and depth, each with its own key.
    pub trials: usize,
}

impl Default for PasskeyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_length: 256,
            max_length: None,
            depths: vec![0.1, 0.5, 0.9],
            trials: 2,
        }
    }
}

impl PasskeyConfig {
    /// Checks what needs no model: lengths, depths, trials.
    pub fn validate(&self) -> Result<()> {
        if let Some(max) = self.max_length {
            ensure!(
                self.min_length >= 1 && self.min_length <= max,
                "passkey lengths need 1 <= min_length <= max_length, got {} and {max}",
                self.min_length
            );
        }
        ensure!(self.trials >= 1, "passkey.trials must be at least 1");
        ensure!(
            !self.depths.is_empty() && self.depths.iter().all(|d| (0.0..=1.0).contains(d)),
            "passkey.depths must be a non-empty list of fractions in [0, 1], got {:?}",
            self.depths
        );
        Ok(())
    }

    /// The prompt lengths: doubling from `min_length`, then the longest (`max_length` or the
    /// model's context `max_context`, whichever is smaller) itself.
    pub fn lengths(&self, max_context: Option<usize>) -> Result<Vec<usize>> {
        self.validate()?;
        doubling_lengths("passkey", self.min_length, self.max_length, max_context)
    }
}

/// The shared parts of the needle-in-a-haystack prompts, encoded once.
struct Haystack {
    intro: Vec<u32>,
    filler: Vec<Vec<u32>>,
}

impl Haystack {
    fn new(tokenizer: &Tokenizer) -> Result<Self> {
        Ok(Self {
            intro: tokenizer.encode(PASSKEY_INTRO, true)?,
            filler: PASSKEY_FILLER
                .iter()
                .map(|sentence| tokenizer.encode(sentence, false))
                .collect::<Result<Vec<_>>>()?,
        })
    }

    /// The intro, filler sentences with the `needles` among them (each at its depth, a fraction
    /// of the filler before it; ascending), then the `question`, at most `length` tokens with
    /// `answer_room` more after it. Returns the ids and the needles' actual depths.
    fn build(
        &self,
        length: usize,
        needles: &[(f64, Vec<u32>)],
        question: &[u32],
        answer_room: usize,
    ) -> Result<(Vec<u32>, Vec<f64>)> {
        let budget = length.saturating_sub(answer_room);
        let fixed =
            self.intro.len() + needles.iter().map(|(_, n)| n.len()).sum::<usize>() + question.len();
        let mut room = budget.saturating_sub(fixed);
        let sentences: Vec<&[u32]> = self
            .filler
            .iter()
            .cycle()
            .map_while(|sentence| {
                room = room.checked_sub(sentence.len())?;
                Some(sentence.as_slice())
            })
            .collect();
        ensure!(
            !sentences.is_empty(),
            "a prompt of {length} tokens has no room for filler (the fixed parts take {fixed} \
             tokens); raise min_length"
        );
        let mut ids = self.intro.clone();
        let mut depths = Vec::with_capacity(needles.len());
        let mut placed = 0;
        for (depth, needle) in needles {
            let before = ((depth * sentences.len() as f64).round() as usize).max(placed);
            ids.extend(sentences[placed..before].concat());
            ids.extend_from_slice(needle);
            depths.push(before as f64 / sentences.len() as f64);
            placed = before;
        }
        ids.extend(sentences[placed..].concat());
        ids.extend_from_slice(question);
        Ok((ids, depths))
    }
}

/// One passkey prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct PasskeyPrompt {
    /// The target length the prompt was built for.
    pub length: usize,
    /// The configured depth the prompt was built for.
    pub target_depth: f64,
    /// Where the needle sits, as a fraction of the filler before it.
    pub depth: f64,
    pub passkey: u32,
    pub ids: Vec<u32>,
    /// Tokens to decode: enough for the pass key and a little more.
    pub answer_tokens: usize,
}

/// The prompts of `cfg` for a model with context `max_context`, deterministic from `seed`:
/// for each length, for each depth, `trials` prompts.
pub fn passkey_prompts(
    tokenizer: &Tokenizer,
    cfg: &PasskeyConfig,
    seed: u64,
    max_context: Option<usize>,
) -> Result<Vec<PasskeyPrompt>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let haystack = Haystack::new(tokenizer)?;
    let question = tokenizer.encode(PASSKEY_QUESTION, false)?;
    let mut prompts = Vec::new();
    for length in cfg.lengths(max_context)? {
        for &target_depth in &cfg.depths {
            for _ in 0..cfg.trials {
                let passkey = rng.random_range(10_000..100_000);
                let needle = tokenizer.encode(&passkey_needle(passkey), false)?;
                let answer = tokenizer.encode(&format!(" {passkey}."), false)?;
                // Decoding needs room after the prompt too.
                let (ids, depths) = haystack.build(
                    length,
                    &[(target_depth, needle)],
                    &question,
                    answer.len() + 1,
                )?;
                prompts.push(PasskeyPrompt {
                    length,
                    target_depth,
                    depth: depths[0],
                    passkey,
                    ids,
                    answer_tokens: answer.len() + 1,
                });
            }
        }
    }
    Ok(prompts)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PasskeyTrial {
    pub length: usize,
    /// Prompt tokens actually used (at most `length`).
    pub prompt_tokens: usize,
    pub target_depth: f64,
    pub depth: f64,
    pub passkey: u32,
    /// The decoded answer.
    pub answer: String,
    pub correct: bool,
}

/// Accuracy at one prompt length, over every depth (`trials` is the n).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PasskeyLength {
    pub length: usize,
    pub trials: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub ci95: Interval,
}

/// Accuracy at one prompt length and needle depth (the configured one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PasskeyCell {
    pub length: usize,
    pub depth: f64,
    pub trials: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub ci95: Interval,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PasskeyReport {
    pub accuracy: f64,
    pub correct: usize,
    pub ci95: Interval,
    pub by_length: Vec<PasskeyLength>,
    pub by_depth: Vec<PasskeyCell>,
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
        linearize_models::stop::check()?;
        let answer = greedy_answer(model, tokenizer, &prompt.ids, prompt.answer_tokens)
            .with_context(|| format!("passkey prompt of {} tokens", prompt.ids.len()))?;
        trials.push(PasskeyTrial {
            length: prompt.length,
            prompt_tokens: prompt.ids.len(),
            target_depth: prompt.target_depth,
            depth: prompt.depth,
            passkey: prompt.passkey,
            correct: first_number(&answer) == Some(prompt.passkey.to_string()),
            answer,
        });
    }
    let by_length = tallies(trials.iter().map(|t| (t.length, t.correct)))
        .into_iter()
        .map(|(length, tally)| PasskeyLength {
            length,
            trials: tally.n,
            correct: tally.correct,
            accuracy: tally.accuracy(),
            ci95: tally.ci95(),
        })
        .collect();
    let cells = trials
        .iter()
        .map(|t| ((t.length, t.target_depth.to_bits()), t.correct));
    let by_depth = tallies(cells)
        .into_iter()
        .map(|((length, depth), tally)| PasskeyCell {
            length,
            depth: f64::from_bits(depth),
            trials: tally.n,
            correct: tally.correct,
            accuracy: tally.accuracy(),
            ci95: tally.ci95(),
        })
        .collect();
    let mut all = Tally::default();
    trials.iter().for_each(|t| all.add(t.correct));
    Ok(PasskeyReport {
        accuracy: all.accuracy(),
        correct: all.correct,
        ci95: all.ci95(),
        by_length,
        by_depth,
        trials,
    })
}

/// The greedy continuation of `ids`, at most `tokens` tokens (stopping at EOS), decoded.
fn greedy_answer<M: CausalLm>(
    model: &M,
    tokenizer: &Tokenizer,
    ids: &[u32],
    tokens: usize,
) -> Result<String> {
    let config = GenerateConfig {
        max_new_tokens: tokens,
        sampling: SamplingConfig::greedy(),
        stop_ids: tokenizer.eos_ids().to_vec(),
        cuda_graphs: true,
    };
    let generation = generate(model, ids, &config, |_| Ok(()))?;
    tokenizer.decode(&generation.tokens, true)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultiKeyConfig {
    pub enabled: bool,
    /// Shortest prompt, tokens.
    pub min_length: usize,
    /// Longest prompt (lengths double from `min_length`); `null`: the model's context.
    pub max_length: Option<usize>,
    /// Needles per prompt, each with its own named key (2 to 8); one of them is asked for.
    pub keys: usize,
    /// Prompts per length.
    pub trials: usize,
}

impl Default for MultiKeyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_length: 256,
            max_length: None,
            keys: 4,
            trials: 4,
        }
    }
}

impl MultiKeyConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(max) = self.max_length {
            ensure!(
                self.min_length >= 1 && self.min_length <= max,
                "multikey lengths need 1 <= min_length <= max_length, got {} and {max}",
                self.min_length
            );
        }
        ensure!(
            (2..=KEY_NAMES.len()).contains(&self.keys),
            "multikey.keys must be 2 to {}, got {}",
            KEY_NAMES.len(),
            self.keys
        );
        ensure!(self.trials >= 1, "multikey.trials must be at least 1");
        Ok(())
    }

    pub fn lengths(&self, max_context: Option<usize>) -> Result<Vec<usize>> {
        self.validate()?;
        doubling_lengths("multikey", self.min_length, self.max_length, max_context)
    }
}

/// One multi-key prompt: `keys` needles, the one at index `asked` asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiKeyPrompt {
    pub length: usize,
    /// The needles' keys in prompt order.
    pub keys: Vec<u32>,
    /// Which needle the question asks for.
    pub asked: usize,
    /// Where the asked needle sits, as a fraction of the filler before it.
    pub depth: f64,
    pub ids: Vec<u32>,
    pub answer_tokens: usize,
}

/// The prompts of `cfg`, deterministic from `seed`: needles spread evenly over the filler
/// (depths (i + 0.5) / keys), distinct names and keys, the asked one drawn at random.
pub fn multikey_prompts(
    tokenizer: &Tokenizer,
    cfg: &MultiKeyConfig,
    seed: u64,
    max_context: Option<usize>,
) -> Result<Vec<MultiKeyPrompt>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d75_6c74_696b_6579);
    let haystack = Haystack::new(tokenizer)?;
    let mut prompts = Vec::new();
    for length in cfg.lengths(max_context)? {
        for _ in 0..cfg.trials {
            let mut names = KEY_NAMES.to_vec();
            names.shuffle(&mut rng);
            names.truncate(cfg.keys);
            let mut keys: Vec<u32> = Vec::with_capacity(cfg.keys);
            while keys.len() < cfg.keys {
                let key = rng.random_range(10_000..100_000);
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            let asked = rng.random_range(0..cfg.keys);
            let needles = names
                .iter()
                .zip(&keys)
                .enumerate()
                .map(|(i, (name, &key))| {
                    let depth = (i as f64 + 0.5) / cfg.keys as f64;
                    Ok((depth, tokenizer.encode(&named_needle(name, key), false)?))
                })
                .collect::<Result<Vec<_>>>()?;
            let question = tokenizer.encode(&named_question(names[asked]), false)?;
            let answer = tokenizer.encode(&format!(" {}.", keys[asked]), false)?;
            let (ids, depths) = haystack.build(length, &needles, &question, answer.len() + 1)?;
            prompts.push(MultiKeyPrompt {
                length,
                keys,
                asked,
                depth: depths[asked],
                ids,
                answer_tokens: answer.len() + 1,
            });
        }
    }
    Ok(prompts)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MultiKeyTrial {
    pub length: usize,
    pub prompt_tokens: usize,
    pub keys: Vec<u32>,
    pub asked: usize,
    pub depth: f64,
    pub answer: String,
    pub correct: bool,
    /// The answer gave another needle's key (retrieval of the wrong fact, not of none).
    pub other_key: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MultiKeyReport {
    pub accuracy: f64,
    pub correct: usize,
    pub ci95: Interval,
    /// Answers that gave another needle's key.
    pub other_key: usize,
    /// Per length (`trials` is the n).
    pub by_length: Vec<PasskeyLength>,
    pub trials: Vec<MultiKeyTrial>,
}

/// Greedy answers of `model` to the multi-key `prompts`.
pub fn multikey<M: CausalLm>(
    model: &M,
    tokenizer: &Tokenizer,
    prompts: &[MultiKeyPrompt],
) -> Result<MultiKeyReport> {
    ensure!(!prompts.is_empty(), "no multi-key prompts to score");
    let mut trials = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        linearize_models::stop::check()?;
        let answer = greedy_answer(model, tokenizer, &prompt.ids, prompt.answer_tokens)
            .with_context(|| format!("multi-key prompt of {} tokens", prompt.ids.len()))?;
        let number = first_number(&answer);
        let is = |key: u32| number.as_deref() == Some(key.to_string().as_str());
        trials.push(MultiKeyTrial {
            length: prompt.length,
            prompt_tokens: prompt.ids.len(),
            correct: is(prompt.keys[prompt.asked]),
            other_key: (0..prompt.keys.len()).any(|i| i != prompt.asked && is(prompt.keys[i])),
            keys: prompt.keys.clone(),
            asked: prompt.asked,
            depth: prompt.depth,
            answer,
        });
    }
    let by_length = tallies(trials.iter().map(|t| (t.length, t.correct)))
        .into_iter()
        .map(|(length, tally)| PasskeyLength {
            length,
            trials: tally.n,
            correct: tally.correct,
            accuracy: tally.accuracy(),
            ci95: tally.ci95(),
        })
        .collect();
    let mut all = Tally::default();
    trials.iter().for_each(|t| all.add(t.correct));
    Ok(MultiKeyReport {
        accuracy: all.accuracy(),
        correct: all.correct,
        ci95: all.ci95(),
        other_key: trials.iter().filter(|t| t.other_key).count(),
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

/// Accuracy of the queries whose distance is in `min_distance..max_distance` (`queries` is the
/// n).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistanceBucket {
    pub min_distance: usize,
    pub max_distance: usize,
    pub queries: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub ci95: Interval,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MqarReport {
    pub accuracy: f64,
    pub queries: usize,
    pub correct: usize,
    pub ci95: Interval,
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
        linearize_models::stop::check()?;
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
    let mut sorted = outcomes.clone();
    sorted.sort_by_key(|&(d, _)| d);
    let buckets = sorted
        .into_iter()
        .map(|(distance, correct)| (1usize << distance.max(1).ilog2(), correct));
    let by_distance = tallies(buckets)
        .into_iter()
        .map(|(min, tally)| DistanceBucket {
            min_distance: min,
            max_distance: min * 2,
            queries: tally.n,
            correct: tally.correct,
            accuracy: tally.accuracy(),
            ci95: tally.ci95(),
        })
        .collect();
    let mut all = Tally::default();
    outcomes.iter().for_each(|&(_, correct)| all.add(correct));
    Ok(MqarReport {
        accuracy: all.accuracy(),
        queries: all.n,
        correct: all.correct,
        ci95: all.ci95(),
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
