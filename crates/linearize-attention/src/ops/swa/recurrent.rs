//! Recurrent form for decoding: one token against the cache of the last w-1 keys and values and
//! the sink tokens before its window.
use super::{check_inputs, Shapes, SwaConfig, SwaState};
use crate::error::Result;
use crate::ops::window::step_scores;
use crate::tensors::{compute_kind, grouped_matmul, tracked, Dims};
use tch::Tensor;

/// Adds one token (len 1) to `state` and returns its output (b, h, 1, d_v). Once the cache is
/// full (and past the sinks) the token is written over the one leaving the window, in place
/// (out of place where autograd tracks the step: [`tracked`]).
/// `position`, when given, is the token's absolute position (`state`'s count) as an int64 scalar
/// on the device, which then picks that slot, so that a CUDA graph capturing the step stays right
/// when replayed at later positions.
pub fn step(
    state: &mut SwaState,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &SwaConfig,
    position: Option<&Tensor>,
) -> Result<Tensor> {
    let s = check_step(state, q, k, v, cfg)?;
    let kind = compute_kind("v", v)?;
    let window = cfg.window();
    state.ready(kind);
    let (t, m) = (state.pos, state.cached());
    let (k, v_new) = (k.to_kind(kind), v.to_kind(kind));

    // The cache holds (up to) the w-1 tokens before this one, in some order: with it, exactly
    // its window; the sinks before the window join it. Each part is read at its own head count.
    let (sink_k, sink_v) = state.sinks.visible(&window, t);
    let n = sink_k.size()[2];
    let q = q.to_kind(kind);
    let scores = step_scores(&q, &sink_k, &state.k, &k); // (b, h, 1, n+m+1)
    let a = scores.softmax(-1, kind);
    let y = grouped_matmul(&a.narrow(-1, 0, n), &sink_v)
        + grouped_matmul(&a.narrow(-1, n, m), &state.v)
        + grouped_matmul(&a.narrow(-1, n + m, 1), &v_new); // (b, h, 1, d_v)

    let tracked = tracked(&[&y]) || tracked(&state.tensors());
    if m == window.reach() && t >= cfg.sinks && !tracked {
        state.push(&k, &v_new, position);
    } else {
        let ordered = SwaState::initial(Some(state), &s, cfg, (kind, v.device()))?;
        *state = ordered.advance(&k, &v_new, cfg);
    }
    Ok(y.to_kind(v.kind()))
}

/// Checks a step's inputs (one token) and `state` against each other, changing nothing (see
/// [`crate::ops::gla::step`]'s twin, which Liger checks beside this one).
pub(crate) fn check_step(
    state: &SwaState,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &SwaConfig,
) -> Result<Shapes> {
    cfg.validate()?;
    let s = check_inputs(q, k, v)?;
    Dims::of("q", q)?.check_single("q", q)?;
    state.check(&s, cfg)?;
    Ok(s)
}

/// Runs a whole sequence token by token through [`step`], from `state` (empty when `None`).
pub fn recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &SwaConfig,
    state: Option<SwaState>,
) -> Result<(Tensor, SwaState)> {
    cfg.validate()?;
    let s = check_inputs(q, k, v)?;
    let kind = compute_kind("v", v)?;
    // A copy (the steps update it in place, and the caller's state must not change), in the
    // layout the steps read.
    let mut state = match state {
        Some(state) => state.map_tensors(&Tensor::copy),
        None => SwaState::initial(None, &s, cfg, (kind, v.device()))?,
    };
    let mut outputs = Vec::with_capacity(s.len as usize);
    for t in 0..s.len {
        let token = |x: &Tensor| x.narrow(2, t, 1);
        outputs.push(step(
            &mut state,
            &token(q),
            &token(k),
            &token(v),
            cfg,
            None,
        )?);
    }
    Ok((Tensor::cat(&outputs, 2), state))
}
