//! Greedy generations of the teacher and the student on the same prompts, side by side, and the
//! check that recurrent decoding is exact: the tokens a model decodes one at a time through its
//! cache equal those that re-running the whole prefix through the full-sequence (chunked)
//! forward picks at every step.
use anyhow::{ensure, Context, Result};
use linearize_models::chat_template::ChatMessage;
use linearize_models::generate::{generate, GenerateConfig, SamplingConfig};
use linearize_models::lm::CausalLm;
use linearize_models::prompt_format::read_prompts_file;
use linearize_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationsConfig {
    pub enabled: bool,
    pub prompts: Vec<String>,
    /// A text file of more prompts, one a line (blank lines and lines starting with `#` are
    /// skipped), asked after `prompts`; e.g. `data/prompts/chat_facts.txt` with `chat: true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompts_file: Option<PathBuf>,
    pub max_new_tokens: usize,
    /// Wrap each prompt as a user message in the tokenizer's chat template (instruct models),
    /// or in Alpaca's plain instruction prompt when it has none.
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
            prompts_file: None,
            max_new_tokens: 32,
            chat: false,
        }
    }
}

impl GenerationsConfig {
    /// `prompts` followed by those of `prompts_file`.
    pub fn all_prompts(&self) -> Result<Vec<String>> {
        let mut prompts = self.prompts.clone();
        if let Some(path) = &self.prompts_file {
            prompts.extend(read_prompts_file(path)?);
        }
        Ok(prompts)
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
    /// The whole greedy answers are the same tokens.
    pub exact: bool,
    /// The answers' first sentences ([`first_sentence`]) are the same text.
    pub first_sentence_match: bool,
}

/// How often the student's greedy answers agree with the teacher's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationAgreement {
    pub prompts: usize,
    /// Answers identical token for token.
    pub exact: usize,
    /// Answers whose first sentences are identical.
    pub first_sentence: usize,
    pub exact_rate: f64,
    pub first_sentence_rate: f64,
}

impl GenerationAgreement {
    pub fn of(pairs: &[GenerationPair]) -> Option<Self> {
        let n = pairs.len();
        (n > 0).then(|| {
            let exact = pairs.iter().filter(|p| p.exact).count();
            let first_sentence = pairs.iter().filter(|p| p.first_sentence_match).count();
            Self {
                prompts: n,
                exact,
                first_sentence,
                exact_rate: exact as f64 / n as f64,
                first_sentence_rate: first_sentence as f64 / n as f64,
            }
        })
    }
}

/// The text up to and including the first `.`, `!` or `?` that ends a sentence (followed by
/// whitespace or the end), or up to the first line break, without surrounding whitespace: the
/// part of an answer that states the fact ("The capital of France is Paris.").
pub fn first_sentence(text: &str) -> &str {
    let text = text.trim();
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let ends = i + 1 == bytes.len() || bytes[i + 1].is_ascii_whitespace();
        if b == b'\n' {
            return text[..i].trim_end();
        }
        if matches!(b, b'.' | b'!' | b'?') && ends {
            return &text[..=i];
        }
    }
    text
}

/// The prompt's ids: plain text with the tokenizer's special tokens, or a user turn in the
/// tokenizer's prompt format.
pub fn encode_prompt(tokenizer: &Tokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    if chat {
        let message = ChatMessage::new("user", prompt);
        tokenizer
            .encode_chat(&[message], true)
            .with_context(|| format!("rendering in the {}", tokenizer.describe_prompt_format()))
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
    if cfg.chat {
        tracing::info!(format = %tokenizer.describe_prompt_format(), "generation prompts");
    }
    cfg.all_prompts()?
        .into_iter()
        .map(|prompt| {
            let ids = encode_prompt(tokenizer, &prompt, cfg.chat)?;
            // Polled per token: a job's SIGTERM stops a long generation.
            let poll = |_: u32| Ok(linearize_models::stop::check()?);
            let t = generate(teacher, &ids, &config, poll)
                .with_context(|| format!("teacher on {prompt:?}"))?;
            let s = generate(student, &ids, &config, poll)
                .with_context(|| format!("student on {prompt:?}"))?;
            let teacher_text = tokenizer.decode(&t.tokens, true)?;
            let student_text = tokenizer.decode(&s.tokens, true)?;
            Ok(GenerationPair {
                prompt,
                exact: t.tokens == s.tokens,
                first_sentence_match: first_sentence(&teacher_text)
                    == first_sentence(&student_text),
                teacher: teacher_text,
                student: student_text,
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
    /// Entry k: how far the full forward's logit for its own best token lies above its logit
    /// for `recurrent[k]` (0 where they agree). A gap below the compute dtype's rounding step
    /// is a near-tie that rounding decides, not a decoding defect.
    pub logit_gaps: Vec<f64>,
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
    let mut logit_gaps = Vec::with_capacity(recurrent.len());
    for &token in &recurrent {
        let ids = Tensor::from_slice(&sequence)
            .view([1, -1])
            .to_device(model.device());
        // (vocab,) f64 on the host: two values are read from it.
        let last = model
            .forward(&ids)
            .context("full forward")?
            .select(1, -1)
            .squeeze_dim(0)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu);
        let best = last.argmax(-1, false).int64_value(&[]);
        full_forward.push(best as u32);
        logit_gaps.push(last.double_value(&[best]) - last.double_value(&[token as i64]));
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
        logit_gaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sentence_ends_at_a_full_stop_or_line_break() {
        assert_eq!(
            first_sentence("  The capital of France is Paris. It is large."),
            "The capital of France is Paris."
        );
        assert_eq!(
            first_sentence("It is 3.14 or so! Yes."),
            "It is 3.14 or so!"
        );
        assert_eq!(first_sentence("Paris\nThe city"), "Paris");
        assert_eq!(first_sentence("No stop at all"), "No stop at all");
        assert_eq!(first_sentence("Why? Because."), "Why?");
    }

    #[test]
    fn agreement_counts_exact_and_first_sentence_matches() {
        let pair = |t: &str, s: &str, tt: &[u32], st: &[u32]| GenerationPair {
            prompt: "q".into(),
            teacher: t.into(),
            student: s.into(),
            teacher_tokens: tt.to_vec(),
            student_tokens: st.to_vec(),
            common_prefix: 0,
            exact: tt == st,
            first_sentence_match: first_sentence(t) == first_sentence(s),
        };
        let pairs = [
            pair("Paris. Big.", "Paris. Big.", &[1, 2], &[1, 2]),
            pair("Paris. Big.", "Paris. Small.", &[1, 2], &[1, 3]),
            pair("Paris.", "Lyon.", &[1], &[4]),
            pair("Rome.", "Rome!", &[5], &[6]),
        ];
        let a = GenerationAgreement::of(&pairs).unwrap();
        assert_eq!((a.prompts, a.exact, a.first_sentence), (4, 1, 2));
        assert_eq!((a.exact_rate, a.first_sentence_rate), (0.25, 0.5));
        assert!(GenerationAgreement::of(&[]).is_none());
    }

    #[test]
    fn prompts_file_adds_its_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.txt");
        std::fs::write(&path, "# comment\nFirst?\n\n  Second?  \n").unwrap();
        let cfg = GenerationsConfig {
            prompts: vec!["Zero".into()],
            prompts_file: Some(path.clone()),
            ..GenerationsConfig::default()
        };
        assert_eq!(cfg.all_prompts().unwrap(), ["Zero", "First?", "Second?"]);
        std::fs::write(&path, "# only comments\n").unwrap();
        assert!(cfg
            .all_prompts()
            .unwrap_err()
            .to_string()
            .contains("no prompts"));
    }
}
