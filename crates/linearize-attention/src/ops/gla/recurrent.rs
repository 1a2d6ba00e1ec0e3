//! Recurrent form for decoding: `S = diag(exp(g_t)) S + k_t^T v_t`, `o_t = q_t S`.
use super::{check_inputs, GlaState};
use crate::error::Result;
use crate::tensors::{compute_kind, prepare, Dims};
use tch::Tensor;

/// Adds one token (len 1) to `state` and returns its output (b, h, 1, d_v).
pub fn step(
    state: &mut GlaState,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_gates: &Tensor,
) -> Result<Tensor> {
    let s = check_inputs(q, k, v, log_gates)?;
    Dims::of("q", q)?.check_single("q", q)?;
    let kind = compute_kind("v", v)?;
    let h = s.heads;
    let current = GlaState::initial(Some(state), &s, (kind, v.device()))?;
    let decay = prepare(log_gates, kind, h).exp().transpose(-1, -2); // (b, h, d_k, 1)
    let update = prepare(k, kind, h)
        .transpose(-1, -2)
        .matmul(&prepare(v, kind, h)); // (b, h, d_k, d_v)
    *state = GlaState {
        s: decay * current.s + update,
    };
    Ok(prepare(q, kind, h).matmul(&state.s).to_kind(v.kind()))
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
    let mut state = GlaState::initial(state.as_ref(), &s, (kind, v.device()))?;
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
