//! Recurrent form for decoding: one token against the window cache, the sink tokens before its
//! window and the decayed linear sums. The cache keeps each token's log-gate, so a cached key
//! outside the window (`tk`) and the sums carried from before the cache decay by exactly the
//! gates since their tokens.
use super::{check_inputs, decay_after, LizardConfig, LizardInputs, LizardState};
use crate::error::Result;
use crate::ops::lolcats::gammas;
use crate::ops::window::without_sinks;
use crate::tensors::{compute_kind, prepare, repeat_heads, Dims, Precision};
use tch::{Kind, Tensor};

/// Adds one token (len 1) to `state` and returns its output (b, h, 1, d_v). `position`, when
/// given, is the token's absolute position (`state`'s count) as an int64 scalar on the device,
/// as in [`crate::ops::lolcats::step`] (CUDA graphs). The gates are not checked here (that would
/// make each step wait for the device); [`super::chunked`] and [`super::naive`] check them.
pub fn step(
    state: &mut LizardState,
    x: &LizardInputs,
    cfg: &LizardConfig,
    position: Option<&Tensor>,
) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    Dims::of("q", x.q)?.check_single("q", x.q)?;
    let kind = compute_kind("v", x.v)?;
    let window = cfg.window();
    let device = x.v.device();
    let current = LizardState::initial(Some(state), &s, cfg, (kind, device))?;
    let h = s.heads;
    let t = current.pos;
    let m = current.cached();
    let phi_k = without_sinks(&x.phi_k.to_kind(kind), t, cfg.sinks);
    let g = x.log_gates.to_kind(kind); // (b, h, 1)

    // The sinks before the window (n of them), the cached keys (positions t-m .. t-1) and the new
    // one; which of the latter the window holds. Sinks are softmax keys only.
    let (sink_k, sink_v) = current.sinks.visible(&window, t);
    let n = sink_k.size()[2];
    let sink_phi = Tensor::zeros([s.batch, s.phi_k_heads, n, s.feature_dim], (kind, device));
    let cat = |sinks: &Tensor, cache: &Tensor, new: &Tensor| {
        repeat_heads(&Tensor::cat(&[sinks, cache, &new.to_kind(kind)], 2), h)
    };
    let (keys, phi_keys, values) = (
        cat(&sink_k, &current.k, x.k),
        cat(&sink_phi, &current.phi_k, &phi_k),
        cat(&sink_v, &current.v, x.v),
    ); // (b, h, n+m+1, ·)
       // Built on the device (see lolcats::step): the sink count `n` is the host's, fixed once the
       // window has passed the sinks.
    let positions = |start: i64, end: i64| match position {
        Some(p) => Tensor::arange_start(start - t, end - t, (Kind::Int64, device)) + p,
        None => Tensor::arange_start(start, end, (Kind::Int64, device)),
    };
    let (inside, _) = window.masks(&positions(t, t + 1), &positions(t - m, t + 1)); // (m+1,)
    let inside = Tensor::cat(&[Tensor::ones([n], (Kind::Bool, device)), inside], 0); // (n+m+1,)

    // Log-decay from each cached key and the new one to this token (b, h, m+1); the sums carried
    // from before the cache decay by all of them. Sink columns get 0 (masked anyway).
    let gates = Tensor::cat(&[&current.log_gates, &g], 2);
    let after = decay_after(&gates, kind);
    let after = Tensor::cat(&[Tensor::zeros([s.batch, h, n], (kind, device)), after], 2);
    let whole = gates.sum_dim_intlist(-1, true, kind).exp().unsqueeze(-1); // (b, h, 1, 1)

    let q = prepare(x.q, kind, h); // (b, h, 1, d)
    let phi_q = prepare(x.phi_q, kind, h); // (b, h, 1, f)
    let scores = q.matmul(&keys.transpose(-1, -2)) / (s.head_dim as f64).sqrt(); // (b, h, 1, n+m+1)
    let scores = scores.masked_fill(&inside.logical_not(), f64::NEG_INFINITY);
    let max = scores.amax([-1i64].as_slice(), true);
    let a_window = (scores - max).exp() * gammas(x.window_factors, h, kind, 4);
    let a_cached_linear = (phi_q.matmul(&phi_keys.transpose(-1, -2)) * after.exp().unsqueeze(2))
        .masked_fill(&inside, 0.0);
    let a = a_window + a_cached_linear;

    let num = a.matmul(&values) + phi_q.matmul(&current.linear.kv) * &whole;
    let den = a.sum_dim_intlist(-1, true, kind)
        + phi_q.matmul(&current.linear.k_sum.unsqueeze(-1)) * whole;
    *state = current.advance(
        &x.k.to_kind(kind),
        &phi_k,
        &x.v.to_kind(kind),
        &g,
        h,
        cfg,
        Precision::uniform(kind),
    );
    Ok((num / den).to_kind(x.v.kind()))
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
    let mut state = LizardState::initial(state.as_ref(), &s, cfg, (kind, x.v.device()))?;
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
