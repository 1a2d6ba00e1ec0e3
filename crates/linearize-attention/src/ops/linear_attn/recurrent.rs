//! Recurrent form for decoding: one token at a time against the (f x d) state.
use super::{check_inputs, LinearAttnConfig, LinearState};
use crate::error::Result;
use crate::tensors::{compute_kind, prepare, tracked, Dims, Precision};
use tch::Tensor;

/// Adds one token (len 1) to `state` in place and returns its output (b, h, 1, d). The state's
/// tensors keep their storage (shallow clones of them see the update), unless autograd tracks
/// the step ([`tracked`]).
pub fn step(
    state: &mut LinearState,
    phi_q: &Tensor,
    phi_k: &Tensor,
    v: &Tensor,
    cfg: &LinearAttnConfig,
) -> Result<Tensor> {
    cfg.validate()?;
    let s = check_inputs(phi_q, phi_k, v)?;
    Dims::of("phi_q", phi_q)?.check_single("phi_q", phi_q)?;
    let kind = compute_kind("v", v)?;
    state.ready(&s, kind)?;
    let (phi_k, v_new) = (prepare(phi_k, kind, s.heads), prepare(v, kind, s.heads));
    if tracked(&[phi_q, &phi_k, &v_new, &state.kv, &state.k_sum]) {
        *state = state.absorb(&phi_k, &v_new, Precision::uniform(kind));
    } else {
        state.absorb_token(&phi_k, &v_new);
    }

    let q = prepare(phi_q, kind, s.heads);
    let num = q.matmul(&state.kv); // (b, h, 1, d)
    let den = q.matmul(&state.k_sum.unsqueeze(-1)) + cfg.eps; // (b, h, 1, 1)
    Ok((num / den).to_kind(v.kind()))
}

/// Runs a whole sequence token by token through [`step`], from `state` (empty when `None`).
pub fn recurrent(
    phi_q: &Tensor,
    phi_k: &Tensor,
    v: &Tensor,
    cfg: &LinearAttnConfig,
    state: Option<LinearState>,
) -> Result<(Tensor, LinearState)> {
    let s = check_inputs(phi_q, phi_k, v)?;
    let kind = compute_kind("v", v)?;
    // A copy: the steps update it in place, and the caller's state must not change.
    let mut state =
        LinearState::initial(state.as_ref(), &s, (kind, v.device()))?.map_tensors(&Tensor::copy);
    let mut outputs = Vec::with_capacity(s.len as usize);
    for t in 0..s.len {
        let token = |x: &Tensor| x.narrow(2, t, 1);
        outputs.push(step(
            &mut state,
            &token(phi_q),
            &token(phi_k),
            &token(v),
            cfg,
        )?);
    }
    Ok((Tensor::cat(&outputs, 2), state))
}
