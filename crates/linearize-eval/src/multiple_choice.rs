//! Multiple-choice tasks from local JSONL files, scored by log-likelihood exactly as
//! lm-evaluation-harness scores its `multiple_choice` tasks.
//!
//! # File format
//! One JSON object per line (blank lines are skipped); the task is named after the file stem:
//! ```json
//! {"context": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "gold": 0}
//! ```
//! - `context` (string): everything before the answer, few-shot examples included. May be empty.
//! - `choices` (array of at least one string): the candidate answers, without a leading space.
//! - `gold` (integer): the index of the right choice in `choices`.
//!
//! Other keys are an error, so that a typo does not silently change the task.
//!
//! # Scoring
//! As the harness (`target_delimiter` " "): the continuation of choice `i` is `" " + choice`;
//! trailing whitespace of the context moves to the front of the continuation; context + continuation
//! is encoded as a whole without special tokens and the continuation's tokens are those after the
//! encoded context (an empty context becomes the BOS, or else EOS, token); the log-likelihood is
//! the sum of the continuation tokens' log-probabilities; sequences longer than the model's
//! context keep their last tokens.
//! - `acc`: the choice with the largest log-likelihood is `gold` (the first on ties).
//! - `acc_norm`: the same with each log-likelihood divided by the length of the choice string
//!   (`len(choice)` in Python: Unicode characters, which for ASCII are bytes).
//!
//! Each metric comes with the harness's standard error, sample standard deviation / sqrt(n).
use anyhow::{bail, ensure, Context, Result};
use linearize_models::lm::CausalLm;
use linearize_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// One question.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McDoc {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
}

/// A task: its name (the file stem) and questions.
#[derive(Clone, Debug, PartialEq)]
pub struct McTask {
    pub name: String,
    pub path: PathBuf,
    pub docs: Vec<McDoc>,
}

impl McTask {
    /// Reads a task file (format in the module docs); `limit` keeps its first questions.
    pub fn load(path: &Path, limit: Option<usize>) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading multiple-choice task {}", path.display()))?;
        let mut docs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if limit.is_some_and(|n| docs.len() >= n) {
                break;
            }
            let doc: McDoc = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a task line", path.display(), i + 1))?;
            ensure!(
                !doc.choices.is_empty(),
                "{}:{}: `choices` is empty",
                path.display(),
                i + 1
            );
            ensure!(
                doc.gold < doc.choices.len(),
                "{}:{}: `gold` is {} but there are {} choices",
                path.display(),
                i + 1,
                doc.gold,
                doc.choices.len()
            );
            ensure!(
                doc.choices.iter().all(|c| !c.is_empty()),
                "{}:{}: a choice is empty (acc_norm divides by its length)",
                path.display(),
                i + 1
            );
            docs.push(doc);
        }
        ensure!(!docs.is_empty(), "{} has no questions", path.display());
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        Ok(Self {
            name,
            path: path.to_path_buf(),
            docs,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct McReport {
    pub task: String,
    pub docs: usize,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: f64,
    pub acc_norm_stderr: f64,
}

/// `acc` and `acc_norm` of `model` on `task`.
pub fn score_task<M: CausalLm>(
    model: &M,
    tokenizer: &Tokenizer,
    task: &McTask,
) -> Result<McReport> {
    let (mut acc, mut acc_norm) = (Vec::new(), Vec::new());
    for (i, doc) in task.docs.iter().enumerate() {
        linearize_models::stop::check()?;
        let lls = doc
            .choices
            .iter()
            .map(|choice| {
                let (context, continuation) = encode_pair(tokenizer, &doc.context, choice)?;
                loglikelihood(model, &context, &continuation)
            })
            .collect::<Result<Vec<f64>>>()
            .with_context(|| format!("task {}, question {}", task.name, i + 1))?;
        let normed: Vec<f64> = lls
            .iter()
            .zip(&doc.choices)
            .map(|(ll, choice)| ll / choice.chars().count() as f64)
            .collect();
        acc.push((first_argmax(&lls) == doc.gold) as u8 as f64);
        acc_norm.push((first_argmax(&normed) == doc.gold) as u8 as f64);
    }
    Ok(McReport {
        task: task.name.clone(),
        docs: task.docs.len(),
        acc: mean(&acc),
        acc_stderr: stderr(&acc),
        acc_norm: mean(&acc_norm),
        acc_norm_stderr: stderr(&acc_norm),
    })
}

/// The harness's `_encode_pair` for `context` and the continuation `" " + choice`.
pub fn encode_pair(
    tokenizer: &Tokenizer,
    context: &str,
    choice: &str,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let continuation = format!(" {choice}");
    let trimmed = context.trim_end();
    let (context, continuation) = (
        trimmed,
        format!("{}{continuation}", &context[trimmed.len()..]),
    );
    if context.is_empty() {
        let prefix = tokenizer
            .bos_id()
            .or_else(|| tokenizer.eos_ids().first().copied())
            .context("an empty context needs a BOS or EOS token to condition on")?;
        return Ok((vec![prefix], tokenizer.encode(&continuation, false)?));
    }
    let whole = tokenizer.encode(&format!("{context}{continuation}"), false)?;
    let context_len = tokenizer.encode(context, false)?.len();
    ensure!(
        context_len < whole.len(),
        "the choice {choice:?} adds no tokens to the context"
    );
    Ok((whole[..context_len].to_vec(), whole[context_len..].to_vec()))
}

/// Sum of log p(continuation | context), left-truncated to the model's context as the harness
/// does.
pub fn loglikelihood<M: CausalLm>(model: &M, context: &[u32], continuation: &[u32]) -> Result<f64> {
    ensure!(
        !context.is_empty() && !continuation.is_empty(),
        "log-likelihood needs a context and a continuation"
    );
    let mut whole: Vec<i64> = context
        .iter()
        .chain(continuation)
        .map(|&t| t as i64)
        .collect();
    if let Some(max) = model.max_context() {
        let max = max as usize;
        if continuation.len() > max {
            bail!(
                "a continuation of {} tokens does not fit the model's context of {max}",
                continuation.len()
            );
        }
        if whole.len() > max + 1 {
            whole.drain(..whole.len() - (max + 1));
        }
    }
    let input = &whole[..whole.len() - 1];
    let _no_grad = tch::no_grad_guard();
    let ids = Tensor::from_slice(input)
        .view([1, -1])
        .to_device(model.device());
    let logits = model.forward(&ids)?; // (1, L, vocab)
    let n = continuation.len() as i64;
    let len = input.len() as i64;
    let logp = logits.narrow(1, len - n, n).log_softmax(-1, Kind::Float);
    let targets = Tensor::from_slice(&whole[whole.len() - continuation.len()..])
        .view([1, n, 1])
        .to_device(logp.device());
    Ok(logp
        .gather(-1, &targets, false)
        .sum(Kind::Double)
        .double_value(&[]))
}

/// Index of the largest value, the first on ties (numpy's argmax).
fn first_argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The harness's `mean_stderr`: sample standard deviation (n - 1) over sqrt(n).
fn stderr(values: &[f64]) -> f64 {
    let n = values.len() as f64;
    if values.len() < 2 {
        return 0.0;
    }
    let m = mean(values);
    let var = values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0);
    (var / n).sqrt()
}
