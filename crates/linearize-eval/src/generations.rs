//! Greedy generations of the teacher and the student on the same prompts, side by side, and the
//! check that recurrent decoding is exact: the tokens a model decodes one at a time through its
//! cache equal those that re-running the whole prefix through the full-sequence (chunked)
//! forward picks at every step.
use anyhow::{ensure, Context, Result};
use linearize_models::chat_template::ChatMessage;
use linearize_models::generate::{generate, GenerateConfig, SamplingConfig};
use linearize_models::lm::CausalLm;
use linearize_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationsConfig {
    pub enabled: bool,
    pub prompts: Vec<String>,
    pub max_new_tokens: usize,
    /// Wrap each prompt as a user message in the tokenizer's chat template (instruct models).
    pub chat: bool,
}

impl Default for GenerationsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            prompts: vec![
                "The capital of France is".into(),
                "Once upon a time, in a small village by the sea,".into(),
                "The three primary colors are".into(),
            ],
            max_new_tokens: 32,
            chat: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationPair {
    pub prompt: String,
    pub teacher: String,
    pub student: String,
    pub teacher_tokens: Vec<u32>,
    pub student_tokens: Vec<u32>,
    /// Leading generated tokens the two share.
    pub common_prefix: usize,
}

/// The prompt's ids: plain text with the tokenizer's special tokens, or a chat turn.
pub fn encode_prompt(tokenizer: &Tokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    if chat {
        let message = ChatMessage::new("user", prompt);
        tokenizer
            .encode_chat(&[message], true)
            .context("applying the chat template")
    } else {
        tokenizer.encode(prompt, true)
    }
}

/// Greedy continuations of every prompt by both models.
pub fn side_by_side<T: CausalLm, S: CausalLm>(
    teacher: &T,
    student: &S,
    tokenizer: &Tokenizer,
    cfg: &GenerationsConfig,
) -> Result<Vec<GenerationPair>> {
    let config = GenerateConfig {
        max_new_tokens: cfg.max_new_tokens,
        sampling: SamplingConfig::greedy(),
        stop_ids: tokenizer.eos_ids().to_vec(),
        cuda_graphs: true,
    };
    cfg.prompts
        .iter()
        .map(|prompt| {
            let ids = encode_prompt(tokenizer, prompt, cfg.chat)?;
            let t = generate(teacher, &ids, &config, |_| Ok(()))
                .with_context(|| format!("teacher on {prompt:?}"))?;
            let s = generate(student, &ids, &config, |_| Ok(()))
                .with_context(|| format!("student on {prompt:?}"))?;
            Ok(GenerationPair {
                prompt: prompt.clone(),
                teacher: tokenizer.decode(&t.tokens, true)?,
                student: tokenizer.decode(&s.tokens, true)?,
                common_prefix: t
                    .tokens
                    .iter()
                    .zip(&s.tokens)
                    .take_while(|(a, b)| a == b)
                    .count(),
                teacher_tokens: t.tokens,
                student_tokens: s.tokens,
            })
        })
        .collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeCheckConfig {
    pub enabled: bool,
    pub prompt: String,
    pub new_tokens: usize,
}

impl Default for DecodeCheckConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            prompt: "The quick brown fox jumps over the lazy dog because".into(),
            new_tokens: 24,
        }
    }
}

/// Recurrent decoding against the full forward, for one prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecodeCheck {
    pub prompt_tokens: usize,
    /// Greedy tokens decoded one at a time through the cache.
    pub recurrent: Vec<u32>,
    /// Entry k: the most likely token after prompt + recurrent[..k], from a full forward pass of
    /// that whole sequence without a cache.
    pub full_forward: Vec<u32>,
    pub agree: bool,
    pub first_mismatch: Option<usize>,
}

/// Decodes `new_tokens` greedily from `prompt` through the cache, then re-derives every step
/// from a full forward of its prefix (teacher-forced on the recurrent tokens, so one mismatch
/// does not hide the steps after it).
pub fn recurrent_vs_full<M: CausalLm>(
    model: &M,
    prompt: &[u32],
    new_tokens: usize,
) -> Result<DecodeCheck> {
    ensure!(
        new_tokens >= 1,
        "the decode check needs at least one new token"
    );
    let config = GenerateConfig {
        max_new_tokens: new_tokens,
        sampling: SamplingConfig::greedy(),
        stop_ids: Vec::new(),
        cuda_graphs: true,
    };
    let recurrent = generate(model, prompt, &config, |_| Ok(()))
        .context("recurrent decoding")?
        .tokens;
    let _no_grad = tch::no_grad_guard();
    let mut sequence: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut full_forward = Vec::with_capacity(recurrent.len());
    for &token in &recurrent {
        let ids = Tensor::from_slice(&sequence)
            .view([1, -1])
            .to_device(model.device());
        let best = model
            .forward(&ids)
            .context("full forward")?
            .select(1, -1)
            .argmax(-1, false)
            .to_kind(Kind::Int64)
            .to_device(Device::Cpu)
            .int64_value(&[0]);
        full_forward.push(best as u32);
        sequence.push(token as i64);
    }
    let first_mismatch = recurrent
        .iter()
        .zip(&full_forward)
        .position(|(a, b)| a != b);
    Ok(DecodeCheck {
        prompt_tokens: prompt.len(),
        agree: first_mismatch.is_none(),
        first_mismatch,
        recurrent,
        full_forward,
    })
}
