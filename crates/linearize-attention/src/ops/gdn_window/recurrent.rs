//! Recurrent form for decoding. The window cache holds the w−1 tokens before the new one (a ring
//! once full) with their memory keys, gates and write strengths, and the delta-rule state holds
//! every token before them: a step reads that state aged by the cached tokens' gates and its
//! own, writes the token leaving the window into it ([`gated_deltanet`]'s update) and then runs
//! the window's step ([`swa::step`]), which writes the new token over the one that left.
use super::{
    check_inputs, keep_last, without_sink_writes, GdnWindowConfig, GdnWindowInputs, GdnWindowState,
};
use crate::error::Result;
use crate::ops::gated_deltanet;
use crate::ops::swa;
use crate::ops::window::{cache_in_order, RingSlot};
use crate::tensors::{compute_kind, prepare, tracked, Dims};
use tch::Tensor;

/// Adds one token (len 1) to `state` and returns its output (b, h, 1, d_v). Once the window cache
/// is full the step updates the state in place (out of place where autograd tracks the step:
/// [`tracked`]). `position`, when given, is the token's absolute position (`state`'s count) as
/// an int64 scalar on the device, as in [`swa::step`] (CUDA graphs). The gates are not checked
/// here (that would make each step wait for the device); [`super::chunked`] and
/// [`super::naive`] check them.
pub fn step(
    state: &mut GdnWindowState,
    x: &GdnWindowInputs,
    cfg: &GdnWindowConfig,
    position: Option<&Tensor>,
) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    Dims::of("q", x.q)?.check_single("q", x.q)?;
    state.check(&s, x, cfg)?;
    let kind = compute_kind("v", x.v)?;
    state.ready(kind);
    let h = s.heads();
    let (t, m, reach) = (state.pos(), state.cached(), cfg.window().reach());
    let g = x.g.to_kind(kind); // (b, h_g, 1)
    let beta = without_sink_writes(&x.beta.to_kind(kind), t, cfg.sinks);

    // The memory holds the tokens up to t−w; they age by the gates of the w−1 cached tokens and
    // this one's. (While the cache fills the memory is empty and the sum does not matter.)
    let lag = (state.g.sum_dim_intlist(-1, true, kind) + &g).exp(); // (b, h_g, 1)
    let delta_q = prepare(x.delta_q, kind, h);
    let memory = delta_q.matmul(&state.delta.s) * prepare(&lag, kind, h).unsqueeze(-1); // (b, h, 1, d_v)

    // The token t − (w−1) leaves the window: the one in this token's slot of a full ring, or
    // this token itself for a window of one (no cache). Its value is read before the window's
    // step writes over it.
    let tracked = tracked(&[x.delta_q, x.delta_k, x.v, &g, &beta]) || tracked(&state.tensors());
    if m == reach {
        let slot = (reach > 0).then(|| RingSlot::of(reach, t, position));
        let leaving = |cache: &Tensor, token: &Tensor| match &slot {
            Some(slot) => slot.read(cache),
            None => token.shallow_clone(),
        };
        let v = leaving(&state.window.v, &x.v.to_kind(kind));
        let k = leaving(&state.delta_k, &x.delta_k.to_kind(kind));
        let (g_out, beta_out) = (leaving(&state.g, &g), leaving(&state.beta, &beta));
        gated_deltanet::write(
            &mut state.delta,
            &delta_q,
            [&k, &v, &g_out, &beta_out],
            h,
            kind,
        );
    }
    let window = swa::step(&mut state.window, x.q, x.k, x.v, &cfg.swa(), position)?;

    if m == reach && reach > 0 && !tracked {
        let slot = RingSlot::of(reach, t, position);
        slot.write(&mut state.delta_k, &x.delta_k.to_kind(kind));
        slot.write(&mut state.g, &g);
        slot.write(&mut state.beta, &beta);
    } else {
        let ordered = |cache: &Tensor| cache_in_order(cache, kind, reach, t);
        state.delta_k = keep_last(&ordered(&state.delta_k), x.delta_k, reach, t + 1);
        state.g = keep_last(&ordered(&state.g), &g, reach, t + 1);
        state.beta = keep_last(&ordered(&state.beta), &beta, reach, t + 1);
    }
    let scale = x.delta_scale.to_kind(kind).reshape([1, h, 1, 1]);
    Ok((window.to_kind(kind) + scale * memory).to_kind(x.v.kind()))
}

/// Runs a whole sequence token by token through [`step`], from `state` (empty when `None`).
pub fn recurrent(
    x: &GdnWindowInputs,
    cfg: &GdnWindowConfig,
    state: Option<GdnWindowState>,
) -> Result<(Tensor, GdnWindowState)> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    gated_deltanet::check_values(x.g, x.beta)?;
    let kind = compute_kind("v", x.v)?;
    // A copy (the steps update it in place, and the caller's state must not change); the empty
    // state is the chunked form's after no token, built from the first token's shapes.
    let mut state = match state {
        Some(state) => state.map_tensors(&Tensor::copy),
        None => empty_state(x, &s, cfg, kind)?,
    };
    let mut outputs = Vec::with_capacity(s.window.len as usize);
    for t in 0..s.window.len {
        let token = |x: &Tensor| x.narrow(2, t, 1);
        let (q, k, v, delta_q, delta_k, g, beta) = (
            token(x.q),
            token(x.k),
            token(x.v),
            token(x.delta_q),
            token(x.delta_k),
            x.g.narrow(2, t, 1),
            x.beta.narrow(2, t, 1),
        );
        let one = GdnWindowInputs {
            q: &q,
            k: &k,
            v: &v,
            delta_q: &delta_q,
            delta_k: &delta_k,
            g: &g,
            beta: &beta,
            delta_scale: x.delta_scale,
        };
        outputs.push(step(&mut state, &one, cfg, None)?);
    }
    Ok((Tensor::cat(&outputs, 2), state))
}

/// The state before any token.
fn empty_state(
    x: &GdnWindowInputs,
    s: &super::Shapes,
    cfg: &GdnWindowConfig,
    kind: tch::Kind,
) -> Result<GdnWindowState> {
    let opts = (kind, x.v.device());
    let [delta_k, g, beta, delta] = GdnWindowState::ordered_memory(None, s, x, cfg, opts)?;
    Ok(GdnWindowState {
        window: swa::SwaState::initial(None, &s.window, &cfg.swa(), opts)?,
        delta_k,
        g,
        beta,
        delta: gated_deltanet::GatedDeltaNetState { s: delta },
    })
}
