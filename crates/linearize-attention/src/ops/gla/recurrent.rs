//! Recurrent form for decoding: `S = diag(exp(g_t)) S + k_t^T v_t`, `o_t = q_t S`.
use super::{check_inputs, GlaState, Shapes};
use crate::error::Result;
use crate::tensors::{compute_kind, prepare, tracked, Dims};
use tch::Tensor;

/// Adds one token (len 1) to `state` in place and returns its output (b, h, 1, d_v): the state
/// decays and takes the token's outer product in its own storage (shallow clones of it see the
/// update), so a step allocates nothing of its size; out of place where autograd tracks the step
/// ([`tracked`]).
pub fn step(
    state: &mut GlaState,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_gates: &Tensor,
) -> Result<Tensor> {
    let s = check_step(state, q, k, v, log_gates)?;
    let kind = compute_kind("v", v)?;
    let h = s.heads;
    if state.s.kind() != kind {
        state.s = state.s.to_kind(kind);
    }
    let decay = prepare(log_gates, kind, h).exp().transpose(-1, -2); // (b, h, d_k, 1)
    let k = prepare(k, kind, h).transpose(-1, -2); // (b, h, d_k, 1)
    let v_new = prepare(v, kind, h); // (b, h, 1, d_v)
    if tracked(&[q, &k, &v_new, &decay, &state.s]) {
        state.s = decay * &state.s + k.matmul(&v_new);
    } else {
        let _ = state.s.g_mul_(&decay);
        let _ = state.s.addcmul_(&k, &v_new);
    }
    Ok(prepare(q, kind, h).matmul(&state.s).to_kind(v.kind()))
}

/// Checks a step's inputs (one token) and `state` against each other, changing nothing: what
/// [`step`] refuses, so that a caller advancing several states together (Liger) can check them
/// all before any moves.
pub(crate) fn check_step(
    state: &GlaState,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_gates: &Tensor,
) -> Result<Shapes> {
    let s = check_inputs(q, k, v, log_gates)?;
    Dims::of("q", q)?.check_single("q", q)?;
    state.check(&s)?;
    Ok(s)
}

/// Runs a whole sequence token by token through [`step`], from `state` (zero when `None`).
pub fn recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_gates: &Tensor,
    state: Option<GlaState>,
) -> Result<(Tensor, GlaState)> {
    let s = check_inputs(q, k, v, log_gates)?;
    let kind = compute_kind("v", v)?;
    // A copy: the steps update it in place, and the caller's state must not change.
    let mut state =
        GlaState::initial(state.as_ref(), &s, (kind, v.device()))?.map_tensors(&Tensor::copy);
    let mut outputs = Vec::with_capacity(s.len as usize);
    for t in 0..s.len {
        let token = |x: &Tensor| x.narrow(2, t, 1);
        outputs.push(step(
            &mut state,
            &token(q),
            &token(k),
            &token(v),
            &token(log_gates),
        )?);
    }
    Ok((Tensor::cat(&outputs, 2), state))
}
