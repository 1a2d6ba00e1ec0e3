//! Recurrent form for decoding: one token against the window cache, the sink tokens before its
//! window and the decayed linear sums, updated in place once the cache is full. The cache keeps
//! each token's log-gate, so a cached key outside the window (`tk`) and the sums carried from
//! before the cache decay by exactly the gates since their tokens.
use super::{check_inputs, decay_after, LizardConfig, LizardInputs, LizardState};
use crate::error::Result;
use crate::ops::lolcats::gammas;
use crate::ops::window::{step_positions, step_scores, without_sinks};
use crate::tensors::{compute_kind, grouped_matmul, tracked, Dims, Precision};
use tch::{Kind, Tensor};

/// Adds one token (len 1) to `state` and returns its output (b, h, 1, d_v). Once the window cache
/// is full (and past the sinks) the step updates the state in place, as
/// [`crate::ops::lolcats::step`] does. `position`, when given, is the token's absolute position
/// (`state`'s count) as an int64 scalar on the device, as there (CUDA graphs). The gates are not
/// checked here (that would make each step wait for the device); [`super::chunked`] and
/// [`super::naive`] check them.
pub fn step(
    state: &mut LizardState,
    x: &LizardInputs,
    cfg: &LizardConfig,
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
    let g = x.log_gates.to_kind(kind); // (b, h, 1)

    // The sinks before the window (n of them), the cached keys (positions t-m .. t-1, in their
    // slots' order) and the new one; which of the latter the window holds. Sinks are softmax
    // keys only. Built on the device, the sink count `n` the host's (see lolcats::step).
    let (sink_k, sink_v) = state.sinks.visible(&window, t);
    let n = sink_k.size()[2];
    let (q_pos, k_pos) = step_positions(m, window.reach(), t, position, device);
    let (inside, _) = window.masks(&q_pos, &k_pos); // (m+1,)
    let inside = Tensor::cat(&[Tensor::ones([n], (Kind::Bool, device)), inside], 0); // (n+m+1,)

    // Log-decay from each cached key and the new one to this token (b, h, m+1), summed in the
    // tokens' order (the cache's slot `j` holds the token `order[j]` places after t-m); the sums
    // carried from before the cache decay by all of them. Sink columns get 0 (masked anyway).
    let order = k_pos.narrow(0, 0, m) - k_pos.narrow(0, m, 1) + m; // (m,)
    let in_order = state
        .log_gates
        .zeros_like()
        .index_copy(2, &order, &state.log_gates);
    let gates = Tensor::cat(&[&in_order, &g], 2);
    let after = decay_after(&gates, kind);
    let after = Tensor::cat(
        &[
            Tensor::zeros([s.batch, h, n], (kind, device)),
            after.narrow(2, 0, m).index_select(2, &order),
            after.narrow(2, m, 1),
        ],
        2,
    );
    let whole = gates.sum_dim_intlist(-1, true, kind).exp().unsqueeze(-1); // (b, h, 1, 1)

    let q = x.q.to_kind(kind); // (b, h, 1, d)
    let phi_q = x.phi_q.to_kind(kind); // (b, h, 1, f)
    let scores = step_scores(&q, &sink_k, &state.k, &k); // (b, h, 1, n+m+1)
    let scores = scores.masked_fill(&inside.logical_not(), f64::NEG_INFINITY);
    let max = scores.amax([-1i64].as_slice(), true);
    let a_window = (scores - max).exp() * gammas(x.window_factors, h, kind, 4);
    let linear_scores = Tensor::cat(
        &[
            Tensor::zeros([s.batch, h, 1, n], (kind, device)),
            grouped_matmul(&phi_q, &state.phi_k.transpose(-1, -2)),
            grouped_matmul(&phi_q, &phi_k.transpose(-1, -2)),
        ],
        -1,
    ); // (b, h, 1, n+m+1)
    let a_cached_linear = (linear_scores * after.exp().unsqueeze(2)).masked_fill(&inside, 0.0);
    let a = a_window + a_cached_linear;

    let num = grouped_matmul(&a.narrow(-1, 0, n), &sink_v)
        + grouped_matmul(&a.narrow(-1, n, m), &state.v)
        + grouped_matmul(&a.narrow(-1, n + m, 1), &v)
        + phi_q.matmul(&state.linear.kv) * &whole;
    let den =
        a.sum_dim_intlist(-1, true, kind) + phi_q.matmul(&state.linear.k_sum.unsqueeze(-1)) * whole;
    let y = num / den; // (b, h, 1, d_v)

    let tracked = tracked(&[&y]) || tracked(&state.tensors());
    if m == window.reach() && t >= cfg.sinks && !tracked {
        state.push([&k, &phi_k, &v, &g], h, position);
    } else {
        let ordered = LizardState::initial(Some(state), &s, cfg, (kind, device))?;
        *state = ordered.advance(&k, &phi_k, &v, &g, h, cfg, Precision::uniform(kind));
    }
    Ok(y.to_kind(x.v.kind()))
}

/// Runs a whole sequence token by token through [`step`], from `state` (empty when `None`).
pub fn recurrent(
    x: &LizardInputs,
    cfg: &LizardConfig,
    state: Option<LizardState>,
) -> Result<(Tensor, LizardState)> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    super::check_gates(x.log_gates)?;
    let kind = compute_kind("v", x.v)?;
    // A copy (the steps update it in place, and the caller's state must not change), in the
    // layout the steps read.
    let mut state = match state {
        Some(state) => state.map_tensors(&Tensor::copy),
        None => LizardState::initial(None, &s, cfg, (kind, x.v.device()))?,
    };
    let mut outputs = Vec::with_capacity(s.len as usize);
    for t in 0..s.len {
        let token = |x: &Tensor| x.narrow(2, t, 1);
        let (q, k, v, phi_q, phi_k, g) = (
            token(x.q),
            token(x.k),
            token(x.v),
            token(x.phi_q),
            token(x.phi_k),
            x.log_gates.narrow(2, t, 1),
        );
        let one = LizardInputs {
            q: &q,
            k: &k,
            v: &v,
            phi_q: &phi_q,
            phi_k: &phi_k,
            log_gates: &g,
            window_factors: x.window_factors,
        };
        outputs.push(step(&mut state, &one, cfg, None)?);
    }
    Ok((Tensor::cat(&outputs, 2), state))
}
