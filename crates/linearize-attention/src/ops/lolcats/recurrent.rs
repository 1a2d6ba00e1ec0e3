//! Recurrent form for decoding: one token against the window cache, the sink tokens before its
//! window and the linear sums, updated in place once the cache is full.
use super::{check_inputs, gammas, LolcatsConfig, LolcatsInputs, LolcatsState};
use crate::error::Result;
use crate::ops::window::{step_positions, step_scores, without_sinks};
use crate::tensors::{compute_kind, grouped_matmul, tracked, Dims, Precision};
use tch::{Kind, Tensor};

/// Adds one token (len 1) to `state` and returns its output (b, h, 1, d_v). Once the window cache
/// is full (and past the sinks) the step updates the state in place: the token leaving the window
/// joins the linear sums and the new one takes its slot of the ring, so no step copies the state
/// (out of place where autograd tracks the step: [`tracked`]).
/// `position`, when given, is the token's absolute position (`state`'s count) as an int64 scalar
/// on the device: the window masks and the ring's slot are then built from it rather than from the
/// host count, so that a CUDA graph capturing this step stays right when replayed at later
/// positions.
pub fn step(
    state: &mut LolcatsState,
    x: &LolcatsInputs,
    cfg: &LolcatsConfig,
    position: Option<&Tensor>,
) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    Dims::of("q", x.q)?.check_single("q", x.q)?;
    state.check(&s, cfg)?;
    let kind = compute_kind("v", x.v)?;
    state.ready(kind);
    let window = cfg.window();
    let device = x.v.device();
    let h = s.heads;
    let (t, m) = (state.pos, state.cached());
    let (k, v) = (x.k.to_kind(kind), x.v.to_kind(kind));
    let phi_k = without_sinks(&x.phi_k.to_kind(kind), t, cfg.sinks);

    // The sinks before the window (n of them), the cached keys (positions t-m .. t-1, in their
    // slots' order) and the new one; which of the latter the window holds. Sinks are softmax
    // keys: their features are never read (the linear weights are masked where the softmax ones
    // are). Each part is read at its own head count, not joined into a copy.
    let (sink_k, sink_v) = state.sinks.visible(&window, t);
    let n = sink_k.size()[2];
    // Built on the device: a mask copied from the host would make every layer's step wait for
    // the device to catch up, leaving decoding bound by launch latency. The sink count `n` is
    // the host's: it stops changing once the window has passed the sinks, before a CUDA graph
    // may capture the step.
    let (q_pos, k_pos) = step_positions(m, window.reach(), t, position, device);
    let (inside, _) = window.masks(&q_pos, &k_pos); // (m+1,)
    let inside = Tensor::cat(&[Tensor::ones([n], (Kind::Bool, device)), inside], 0); // (n+m+1,)

    let q = x.q.to_kind(kind); // (b, h, 1, d)
    let phi_q = x.phi_q.to_kind(kind); // (b, h, 1, f)
    let scores = step_scores(&q, &sink_k, &state.k, &k); // (b, h, 1, n+m+1)
    let scores = scores.masked_fill(&inside.logical_not(), f64::NEG_INFINITY);
    let max = scores.amax([-1i64].as_slice(), true);
    let a_window = (scores - max).exp() * gammas(x.window_factors, h, kind, 4);
    let a_cached_linear = Tensor::cat(
        &[
            Tensor::zeros([s.batch, h, 1, n], (kind, device)),
            grouped_matmul(&phi_q, &state.phi_k.transpose(-1, -2)),
            grouped_matmul(&phi_q, &phi_k.transpose(-1, -2)),
        ],
        -1,
    )
    .masked_fill(&inside, 0.0);
    let a = a_window + a_cached_linear; // (b, h, 1, n+m+1)

    let num = grouped_matmul(&a.narrow(-1, 0, n), &sink_v)
        + grouped_matmul(&a.narrow(-1, n, m), &state.v)
        + grouped_matmul(&a.narrow(-1, n + m, 1), &v)
        + phi_q.matmul(&state.linear.kv); // (b, h, 1, d_v)
    let den = a.sum_dim_intlist(-1, true, kind) + phi_q.matmul(&state.linear.k_sum.unsqueeze(-1));
    let y = num / den; // (b, h, 1, d_v)

    let tracked = tracked(&[&y]) || tracked(&state.tensors());
    if m == window.reach() && t >= cfg.sinks && !tracked {
        state.push(&k, &phi_k, &v, h, position);
    } else {
        let ordered = LolcatsState::initial(Some(state), &s, cfg, (kind, device))?;
        *state = ordered.advance(&k, &phi_k, &v, h, cfg, Precision::uniform(kind));
    }
    Ok(y.to_kind(x.v.kind()))
}

/// Runs a whole sequence token by token through [`step`], from `state` (empty when `None`).
pub fn recurrent(
    x: &LolcatsInputs,
    cfg: &LolcatsConfig,
    state: Option<LolcatsState>,
) -> Result<(Tensor, LolcatsState)> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    let kind = compute_kind("v", x.v)?;
    // A copy (the steps update it in place, and the caller's state must not change), in the
    // layout the steps read.
    let mut state = match state {
        Some(state) => state.map_tensors(&Tensor::copy),
        None => LolcatsState::initial(None, &s, cfg, (kind, x.v.device()))?,
    };
    let mut outputs = Vec::with_capacity(s.len as usize);
    for t in 0..s.len {
        let token = |x: &Tensor| x.narrow(2, t, 1);
        let (q, k, v, phi_q, phi_k) = (
            token(x.q),
            token(x.k),
            token(x.v),
            token(x.phi_q),
            token(x.phi_k),
        );
        let one = LolcatsInputs {
            q: &q,
            k: &k,
            v: &v,
            phi_q: &phi_q,
            phi_k: &phi_k,
            window_factors: x.window_factors,
        };
        outputs.push(step(&mut state, &one, cfg, None)?);
    }
    Ok((Tensor::cat(&outputs, 2), state))
}
