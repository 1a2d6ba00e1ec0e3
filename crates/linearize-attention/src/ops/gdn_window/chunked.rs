//! Chunked form for training and prefill: [`swa::chunked`] for the softmax term and
//! [`gated_deltanet::chunked`] on shifted queries for the delta term, no L x L matrix and no
//! per-token loop.
//!
//! The delta term of a call runs over E = [one empty token ; the m cached tokens ; the L new
//! ones] from the carried state, which holds every token before the cached ones. The empty token
//! (k = v = 0, β = 0, g = 0: it changes nothing) stands at position pos0 − m − 1, so that the
//! state after E's token e is `S_{p_e}` for every e, the carried one included. Query t reads
//! `S_{t−w}`, the state after E's token `e = t − w − (pos0 − m − 1)`; it is given there as
//! `q'_e = e^{Σ g over e+1 ..= e+w} q̂_t` (the w gates after token e, each a sum over its own
//! window, so that no difference of long cumulative sums loses precision) and the kernel's output
//! at e is its delta term. The kernel runs up to the last token that leaves the window in this
//! call, so its final state is the next call's carried state; the w−1 tokens after it stay in
//! the window cache.
use super::{
    check_inputs, keep_last, without_sink_writes, GdnWindowConfig, GdnWindowInputs, GdnWindowState,
};
use crate::error::Result;
use crate::ops::gated_deltanet::{self, GatedDeltaNetState};
use crate::ops::swa::{self, SwaState};
use crate::tensors::{pad_seq, repeat_heads, Precision};
use tch::Tensor;

/// Runs the sequence on from `state` (empty when `None`) and returns the output (b, h, L, d_v)
/// and the state after the last token.
pub fn chunked(
    x: &GdnWindowInputs,
    cfg: &GdnWindowConfig,
    state: Option<&GdnWindowState>,
) -> Result<(Tensor, GdnWindowState)> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    let p = Precision::of("v", x.v)?;
    let device = x.v.device();
    let [cached_k, cached_g, cached_beta, carried] =
        GdnWindowState::ordered_memory(state, &s, x, cfg, (p.acc, device))?;
    // The window's cached values, in order: the memory writes them when their tokens leave.
    let cached_v = match state {
        Some(state) => {
            SwaState::initial(Some(&state.window), &s.window, &cfg.swa(), (p.acc, device))?.v
        }
        None => x.v.narrow(2, 0, 0).to_kind(p.acc),
    };
    let (y_window, window) = swa::chunked(x.q, x.k, x.v, &cfg.swa(), state.map(|s| &s.window))?;

    let (h, len, w) = (s.heads(), s.window.len, cfg.window_size);
    let pos0 = window.pos - len;
    let m = cached_k.size()[2];
    let beta = without_sink_writes(&x.beta.to_kind(p.acc), pos0, cfg.sinks);
    let g = x.g.to_kind(p.acc);
    // New token i reads E's token i − shift; those before `shift` have no token out of reach.
    let shift = w - m - 1;
    let queries = len - shift;
    let (memory, delta) = if queries <= 0 {
        let mut size = y_window.size();
        size[3] = s.delta.value_dim;
        let carried = GatedDeltaNetState { s: carried };
        (Tensor::zeros(&size, (p.acc, device)), carried)
    } else {
        let run = queries + 1; // E's tokens up to the last that leaves the window
        let joined = |cached: &Tensor, new: &Tensor| {
            let mut size = new.size();
            size[2] = 1;
            let empty = Tensor::zeros(&size, (cached.kind(), device));
            Tensor::cat(&[&empty, cached, &new.to_kind(cached.kind())], 2)
        };
        let operand = |t: &Tensor| t.to_kind(p.operand);
        let (k, v) = (
            joined(&operand(&cached_k), x.delta_k).narrow(2, 0, run),
            joined(&operand(&cached_v), x.v).narrow(2, 0, run),
        );
        let g = joined(&cached_g, &g); // (b, h_g, 1 + m + L)
        let beta = joined(&cached_beta, &beta).narrow(2, 0, run);
        // Σ g over E's tokens e+1 ..= e+w for each query slot e: (b, h, queries).
        let lag = g
            .narrow(2, 1, m + len)
            .unfold(2, w, 1)
            .sum_dim_intlist(-1, false, p.acc);
        let lag = repeat_heads(&lag, h).exp().unsqueeze(-1); // (b, h, queries, 1)
        let q = x.delta_q.narrow(2, shift, queries).to_kind(p.acc) * lag;
        let q = pad_seq(&q, 0, 1).to_kind(p.operand); // (b, h, run, d_k)
        let (y, end) = gated_deltanet::chunked(
            &q,
            &k,
            &v,
            &g.narrow(2, 0, run),
            &beta,
            &cfg.gdn(),
            Some(&GatedDeltaNetState { s: carried }),
        )?;
        (
            pad_seq(&y.narrow(2, 0, queries), shift, 0).to_kind(p.acc),
            end,
        )
    };

    let scale = x.delta_scale.to_kind(p.acc).reshape([1, h, 1, 1]);
    let y = (y_window.to_kind(p.acc) + scale * memory).to_kind(x.v.kind());
    let reach = cfg.window().reach();
    let end = GdnWindowState {
        delta_k: keep_last(&cached_k, x.delta_k, reach, window.pos),
        g: keep_last(&cached_g, &g, reach, window.pos),
        beta: keep_last(&cached_beta, &beta, reach, window.pos),
        window,
        delta,
    };
    Ok((y, end))
}
