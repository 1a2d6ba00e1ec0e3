//! Recurrent form for decoding: one token against the window cache, the sink tokens before its
//! window and the linear sums.
use super::{check_inputs, gammas, LolcatsConfig, LolcatsInputs, LolcatsState};
use crate::error::Result;
use crate::ops::window::without_sinks;
use crate::tensors::{compute_kind, prepare, repeat_heads, Dims, Precision};
use tch::{Kind, Tensor};

/// Adds one token (len 1) to `state` and returns its output (b, h, 1, d_v). `position`, when
/// given, is the token's absolute position (`state`'s count) as an int64 scalar on the device:
/// the window masks are then built from it rather than from the host count, so that a CUDA graph
/// capturing this step stays right when replayed at later positions.
pub fn step(
    state: &mut LolcatsState,
    x: &LolcatsInputs,
    cfg: &LolcatsConfig,
    position: Option<&Tensor>,
) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    Dims::of("q", x.q)?.check_single("q", x.q)?;
    let kind = compute_kind("v", x.v)?;
    let window = cfg.window();
    let device = x.v.device();
    let current = LolcatsState::initial(Some(state), &s, cfg, (kind, device))?;
    let h = s.heads;
    let t = current.pos;
    let m = current.cached();
    let phi_k = without_sinks(&x.phi_k.to_kind(kind), t, cfg.sinks);

    // The sinks before the window (n of them), the cached keys (positions t-m .. t-1) and the new
    // one; which of the latter the window holds. Sinks are softmax keys: their features are
    // never read (the linear weights are masked where the softmax ones are).
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
       // Built on the device: a mask copied from the host would make every layer's step wait for
       // the device to catch up, leaving decoding bound by launch latency. The sink count `n` is
       // the host's: it stops changing once the window has passed the sinks, before a CUDA graph
       // may capture the step.
    let positions = |start: i64, end: i64| match position {
        Some(p) => Tensor::arange_start(start - t, end - t, (Kind::Int64, device)) + p,
        None => Tensor::arange_start(start, end, (Kind::Int64, device)),
    };
    let (inside, _) = window.masks(&positions(t, t + 1), &positions(t - m, t + 1)); // (m+1,)
    let inside = Tensor::cat(&[Tensor::ones([n], (Kind::Bool, device)), inside], 0); // (n+m+1,)

    let q = prepare(x.q, kind, h); // (b, h, 1, d)
    let phi_q = prepare(x.phi_q, kind, h); // (b, h, 1, f)
    let scores = q.matmul(&keys.transpose(-1, -2)) / (s.head_dim as f64).sqrt(); // (b, h, 1, m+1)
    let scores = scores.masked_fill(&inside.logical_not(), f64::NEG_INFINITY);
    let max = scores.amax([-1i64].as_slice(), true);
    let a_window = (scores - max).exp() * gammas(x.window_factors, h, kind, 4);
    let a_cached_linear = phi_q
        .matmul(&phi_keys.transpose(-1, -2))
        .masked_fill(&inside, 0.0);
    let a = a_window + a_cached_linear;

    let num = a.matmul(&values) + phi_q.matmul(&current.linear.kv);
    let den = a.sum_dim_intlist(-1, true, kind) + phi_q.matmul(&current.linear.k_sum.unsqueeze(-1));
    *state = current.advance(
        &x.k.to_kind(kind),
        &phi_k,
        &x.v.to_kind(kind),
        h,
        cfg,
        Precision::uniform(kind),
    );
    Ok((num / den).to_kind(x.v.kind()))
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
    let mut state = LolcatsState::initial(state.as_ref(), &s, cfg, (kind, x.v.device()))?;
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
