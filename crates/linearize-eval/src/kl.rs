//! How far the student's next-token distributions are from the teacher's, token by token, on the
//! windows of the perplexity protocol (docs/eval.md): KL(teacher || student) and top-1 agreement
//! per scored position, summarised as means (what [`crate::perplexity::compare`] reports), as
//! quantiles over all scored tokens (a mean hides a few catastrophic tokens), and by position in
//! the window (linear attention tends to drift as the context grows, softmax does not).
use crate::perplexity::{
    forward, log_progress, predictions, report, targets, window_nll, windows, Comparison,
    WindowOptions,
};
use anyhow::{ensure, Context, Result};
use linearize_models::lm::CausalLm;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

/// KL and agreement of the predictions for window positions `start..end` (the position of the
/// predicted token in its window, 1..ctx).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PositionBucket {
    pub start: usize,
    pub end: usize,
    /// Scored tokens in the bucket, over all windows.
    pub tokens: usize,
    pub kl: f64,
    pub top1_agreement: f64,
}

/// Quantiles of the per-token KL(teacher || student), nats.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KlQuantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KlReport {
    /// Both perplexities, mean KL and top-1 agreement.
    pub comparison: Comparison,
    pub kl_quantiles: KlQuantiles,
    /// Equal-width buckets of window positions, in order.
    pub by_position: Vec<PositionBucket>,
}

/// Scores `teacher` and `student` on the protocol windows of `tokens`, keeping per-token KL and
/// agreement, grouped into `position_buckets` equal ranges of window positions (at most ctx - 1).
pub fn kl_report<T: CausalLm, S: CausalLm>(
    teacher: &T,
    student: &S,
    tokens: &[u32],
    options: &WindowOptions,
    position_buckets: usize,
) -> Result<KlReport> {
    ensure!(position_buckets >= 1, "position buckets must be at least 1");
    let windows = windows(tokens, options)?;
    let ctx = options.ctx;
    let _no_grad = tch::no_grad_guard();
    let (mut nll_t, mut nll_s) = (0.0, 0.0);
    // Per window position j = 1..ctx-1 (index j - 1): summed KL and agreement count.
    let mut kl_at = vec![0.0f64; ctx - 1];
    let mut agree_at = vec![0usize; ctx - 1];
    let mut all_kl: Vec<f32> = Vec::with_capacity(windows.len() * (ctx - 1));
    for (i, batch) in windows.chunks(options.batch_size).enumerate() {
        linearize_models::stop::check()?;
        let logits_t = forward(teacher, batch)?;
        let logits_s = forward(student, batch)?.to_device(logits_t.device());
        ensure!(
            logits_t.size() == logits_s.size(),
            "teacher logits {:?} and student logits {:?} differ in shape",
            logits_t.size(),
            logits_s.size()
        );
        let targets = targets(batch, logits_t.device());
        nll_t += window_nll(&logits_t, &targets).double_value(&[]);
        nll_s += window_nll(&logits_s, &targets).double_value(&[]);
        // Predictions for positions 1..ctx-1 come from positions 0..ctx-2.
        let logp_t = predictions(&logits_t).log_softmax(-1, Kind::Float);
        let logp_s = predictions(&logits_s).log_softmax(-1, Kind::Float);
        let kl = (logp_t.exp() * (&logp_t - &logp_s))
            .sum_dim_intlist(-1, false, Kind::Float)
            .to_device(Device::Cpu); // (b, ctx-1)
        let agree = logp_t
            .argmax(-1, false)
            .eq_tensor(&logp_s.argmax(-1, false))
            .to_device(Device::Cpu); // (b, ctx-1)
        let kl = Vec::<Vec<f32>>::try_from(&kl).context("copying per-token KL")?;
        let agree = Vec::<Vec<bool>>::try_from(&agree).context("copying top-1 agreement")?;
        for (kl_row, agree_row) in kl.iter().zip(&agree) {
            for (j, (&k, &a)) in kl_row.iter().zip(agree_row).enumerate() {
                kl_at[j] += k as f64;
                agree_at[j] += a as usize;
            }
            all_kl.extend_from_slice(kl_row);
        }
        log_progress(i, options.batch_size, windows.len());
    }
    let n = windows.len();
    let scored = (n * (ctx - 1)) as f64;
    let comparison = Comparison {
        teacher: report(nll_t, n, tokens.len(), ctx),
        student: report(nll_s, n, tokens.len(), ctx),
        kl_teacher_student: kl_at.iter().sum::<f64>() / scored,
        top1_agreement: agree_at.iter().sum::<usize>() as f64 / scored,
    };
    Ok(KlReport {
        comparison,
        kl_quantiles: quantiles(all_kl),
        by_position: buckets(&kl_at, &agree_at, n, position_buckets),
    })
}

/// Nearest-rank quantiles of the per-token values.
fn quantiles(mut values: Vec<f32>) -> KlQuantiles {
    values.sort_unstable_by(f32::total_cmp);
    let at = |q: f64| {
        let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
        values[rank - 1] as f64
    };
    KlQuantiles {
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        max: at(1.0),
    }
}

/// Groups the per-position sums (index j - 1 for window position j) into `count` ranges of
/// nearly equal width.
fn buckets(kl_at: &[f64], agree_at: &[usize], windows: usize, count: usize) -> Vec<PositionBucket> {
    let positions = kl_at.len();
    let count = count.min(positions);
    (0..count)
        .map(|b| {
            let (lo, hi) = (b * positions / count, (b + 1) * positions / count);
            let tokens = (hi - lo) * windows;
            PositionBucket {
                start: lo + 1,
                end: hi + 1,
                tokens,
                kl: kl_at[lo..hi].iter().sum::<f64>() / tokens as f64,
                top1_agreement: agree_at[lo..hi].iter().sum::<usize>() as f64 / tokens as f64,
            }
        })
        .collect()
}
