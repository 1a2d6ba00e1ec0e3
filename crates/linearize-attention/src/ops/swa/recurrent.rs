//! Recurrent form for decoding: one token against the cache of the last w-1 keys and values and
//! the sink tokens before its window.
use super::{check_inputs, SwaConfig, SwaState};
use crate::error::Result;
use crate::tensors::{compute_kind, prepare, repeat_heads, Dims};
use tch::Tensor;

/// Adds one token (len 1) to `state` and returns its output (b, h, 1, d_v).
pub fn step(
    state: &mut SwaState,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &SwaConfig,
) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(q, k, v)?;
    Dims::of("q", q)?.check_single("q", q)?;
    let kind = compute_kind("v", v)?;
    let window = cfg.window();
    let current = SwaState::initial(Some(state), &s, cfg, (kind, v.device()))?;
    *state = current.advance(&k.to_kind(kind), &v.to_kind(kind), cfg);

    // The cache holds (up to) the w-1 tokens before this one: with it, exactly its window; the
    // sinks before the window join it.
    let (sink_k, sink_v) = current.sinks.visible(&window, current.pos);
    let keys = repeat_heads(
        &Tensor::cat(&[&sink_k, &current.k, &k.to_kind(kind)], 2),
        s.heads,
    );
    let values = repeat_heads(
        &Tensor::cat(&[&sink_v, &current.v, &v.to_kind(kind)], 2),
        s.heads,
    );
    let scores =
        prepare(q, kind, s.heads).matmul(&keys.transpose(-1, -2)) / (s.head_dim as f64).sqrt();
    Ok(scores.softmax(-1, kind).matmul(&values).to_kind(v.kind()))
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
    let mut state = SwaState::initial(state.as_ref(), &s, cfg, (kind, v.device()))?;
    let mut outputs = Vec::with_capacity(s.len as usize);
    for t in 0..s.len {
        let token = |x: &Tensor| x.narrow(2, t, 1);
        outputs.push(step(&mut state, &token(q), &token(k), &token(v), cfg)?);
    }
    Ok((Tensor::cat(&outputs, 2), state))
}
