//! Perplexity by the evaluation protocol of docs/eval.md, so numbers compare across tools: the
//! whole text is encoded without special tokens and cut into consecutive windows of `ctx`
//! tokens (a partial last window is dropped; optionally only the first K windows are kept);
//! each window is scored on its own, by the mean next-token NLL of its tokens 1..ctx-1 given
//! their prefix in the window; the result is exp(mean NLL over all scored tokens).
//!
//! [`compare`] scores a teacher and a student on the same windows in one pass and adds the mean
//! per-token KL(teacher || student) and how often their most likely next tokens agree.
use anyhow::{ensure, Result};
use linearize_models::lm::CausalLm;
use linearize_models::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How the text is cut and batched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowOptions {
    /// Tokens per window.
    pub ctx: usize,
    /// Score only the first this many windows.
    pub max_windows: Option<usize>,
    /// Windows per forward call (does not change the result).
    pub batch_size: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PerplexityReport {
    pub perplexity: f64,
    /// Mean next-token negative log-likelihood (nats) over the scored tokens.
    pub mean_nll: f64,
    pub ctx: usize,
    pub windows: usize,
    /// windows * (ctx - 1).
    pub scored_tokens: usize,
    /// Tokens in the whole text, before windowing.
    pub total_tokens: usize,
}

/// A teacher and a student scored on identical windows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub teacher: PerplexityReport,
    pub student: PerplexityReport,
    /// Mean over scored positions of KL(teacher || student) of the next-token distributions.
    pub kl_teacher_student: f64,
    /// Fraction of scored positions where both models' most likely next token is the same.
    pub top1_agreement: f64,
}

/// The windows the protocol scores: consecutive, non-overlapping, `ctx` tokens each, the
/// partial last one dropped, at most `max_windows`.
pub fn windows<'a>(tokens: &'a [u32], options: &WindowOptions) -> Result<Vec<&'a [u32]>> {
    ensure!(
        options.ctx >= 2,
        "ctx must be at least 2 (one token to predict from), got {}",
        options.ctx
    );
    ensure!(options.batch_size >= 1, "batch size must be at least 1");
    ensure!(
        options.max_windows != Some(0),
        "max windows must be at least 1"
    );
    let all = tokens.len() / options.ctx;
    ensure!(
        all > 0,
        "the text has {} tokens, fewer than one window of ctx = {}",
        tokens.len(),
        options.ctx
    );
    let count = options.max_windows.map_or(all, |k| k.min(all));
    Ok(tokens.chunks_exact(options.ctx).take(count).collect())
}

/// Perplexity of `text` under `model` (tokenized without special tokens).
pub fn perplexity_of_text<M: CausalLm>(
    model: &M,
    tokenizer: &Tokenizer,
    text: &str,
    options: &WindowOptions,
) -> Result<PerplexityReport> {
    perplexity(model, &tokenizer.encode(text, false)?, options)
}

/// Perplexity of the token sequence `tokens` (the whole encoded text).
pub fn perplexity<M: CausalLm>(
    model: &M,
    tokens: &[u32],
    options: &WindowOptions,
) -> Result<PerplexityReport> {
    let windows = windows(tokens, options)?;
    let _no_grad = tch::no_grad_guard();
    let mut nll = 0.0;
    for (i, batch) in windows.chunks(options.batch_size).enumerate() {
        // A job's SIGTERM stops evaluation between batches.
        linearize_models::stop::check()?;
        let logits = forward(model, batch)?;
        nll += window_nll(&logits, &targets(batch, model.device())).double_value(&[]);
        log_progress(i, options.batch_size, windows.len());
    }
    Ok(report(nll, windows.len(), tokens.len(), options.ctx))
}

/// [`perplexity`] of both models on the same windows, plus their next-token KL and top-1
/// agreement. Each batch runs through the teacher, then the student; [`crate::kl::kl_report`]
/// gives the same numbers with their spread over tokens and positions.
pub fn compare<T: CausalLm, S: CausalLm>(
    teacher: &T,
    student: &S,
    tokens: &[u32],
    options: &WindowOptions,
) -> Result<Comparison> {
    Ok(crate::kl::kl_report(teacher, student, tokens, options, 1)?.comparison)
}

/// Logs about ten times over a run: after batch `i` of `batch_size` windows out of `total`.
pub(crate) fn log_progress(i: usize, batch_size: usize, total: usize) {
    let batches = total.div_ceil(batch_size);
    if (i + 1) % batches.div_ceil(10) == 0 || i + 1 == batches {
        tracing::info!(
            "scored {} of {total} windows",
            ((i + 1) * batch_size).min(total)
        );
    }
}

pub(crate) fn report(
    total_nll: f64,
    windows: usize,
    total_tokens: usize,
    ctx: usize,
) -> PerplexityReport {
    let scored_tokens = windows * (ctx - 1);
    let mean_nll = total_nll / scored_tokens as f64;
    PerplexityReport {
        perplexity: mean_nll.exp(),
        mean_nll,
        ctx,
        windows,
        scored_tokens,
        total_tokens,
    }
}

/// Logits (b, ctx, vocab) in f32 of a batch of windows.
pub(crate) fn forward<M: CausalLm>(model: &M, batch: &[&[u32]]) -> Result<Tensor> {
    let ids: Vec<i64> = batch
        .iter()
        .flat_map(|w| w.iter().map(|&t| t as i64))
        .collect();
    let ctx = batch[0].len() as i64;
    let ids = Tensor::from_slice(&ids)
        .view([batch.len() as i64, ctx])
        .to_device(model.device());
    let logits = model.forward(&ids)?;
    let size = logits.size();
    ensure!(
        size.len() == 3 && size[0] == batch.len() as i64 && size[1] == ctx,
        "expected logits of shape ({}, {ctx}, vocab), got {size:?}",
        batch.len()
    );
    Ok(logits.to_kind(Kind::Float))
}

/// (b, ctx-1, vocab): the logits that predict tokens 1..ctx-1.
pub(crate) fn predictions(logits: &Tensor) -> Tensor {
    let ctx = logits.size()[1];
    logits.narrow(1, 0, ctx - 1)
}

/// (b, ctx-1) int64: tokens 1..ctx-1 of each window.
pub(crate) fn targets(batch: &[&[u32]], device: Device) -> Tensor {
    let ids: Vec<i64> = batch
        .iter()
        .flat_map(|w| w[1..].iter().map(|&t| t as i64))
        .collect();
    Tensor::from_slice(&ids)
        .view([batch.len() as i64, -1])
        .to_device(device)
}

/// Summed NLL (f64 scalar) of `targets` under the predictions of `logits`.
pub(crate) fn window_nll(logits: &Tensor, targets: &Tensor) -> Tensor {
    let logp = predictions(logits).log_softmax(-1, Kind::Float);
    let picked = logp.gather(-1, &targets.unsqueeze(-1), false);
    -picked.sum(Kind::Double)
}
