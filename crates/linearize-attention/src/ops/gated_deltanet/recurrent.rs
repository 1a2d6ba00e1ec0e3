//! Recurrent form for decoding, in the delta form of the update: with the decayed state
//! `S' = α_t S`, the correction `δ_t = β_t (v_t − k_t S')` replaces what `S'` holds for `k_t`:
//! `S_t = S' + k_tᵀ δ_t`, `o_t = q_t S_t` (two (d_k, d_v) products per token, no (d_k, d_k) one).
use super::{check_inputs, check_values, GatedDeltaNetState};
use crate::error::Result;
use crate::tensors::{compute_kind, prepare, tracked, Dims};
use tch::Tensor;

/// Adds one token (len 1) to `state` in place and returns its output (b, h, 1, d_v): the state
/// decays and takes the correction's outer product in its own storage (shallow clones of it see
/// the update), so a step allocates nothing of its size (out of place where autograd tracks the
/// step: [`tracked`]). It reads nothing back from the device
/// (so it can be captured into a CUDA graph) and so does not check `g` and `beta`'s values, as
/// [`super::chunked`] does.
pub fn step(
    state: &mut GatedDeltaNetState,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
) -> Result<Tensor> {
    let s = check_inputs(q, k, v, g, beta)?;
    Dims::of("q", q)?.check_single("q", q)?;
    state.check(&s)?;
    let kind = compute_kind("v", v)?;
    let h = s.heads;
    if state.s.kind() != kind {
        state.s = state.s.to_kind(kind);
    }
    write(state, q, [k, v, g, beta], h, kind);
    Ok(prepare(q, kind, h).matmul(&state.s).to_kind(v.kind()))
}

/// Writes one token `k` (b, h_k, 1, d_k), `v` (b, h_v, 1, d_v), `g` and `beta` (b, ·, 1) into
/// `state` (already in `kind`, with `heads` heads), in place unless autograd tracks the step.
/// `reader` is the query that reads the state this step: autograd keeps the state for its
/// gradient, so a tracked reader, too, asks for the out-of-place update.
pub(crate) fn write(
    state: &mut GatedDeltaNetState,
    reader: &Tensor,
    [k, v, g, beta]: [&Tensor; 4],
    heads: i64,
    kind: tch::Kind,
) {
    let per_token = |x: &Tensor| prepare(x, kind, heads).unsqueeze(-1); // (b, h, 1, 1)
    let (alpha, beta) = (per_token(g).exp(), per_token(beta));
    let (k, v_new) = (prepare(k, kind, heads), prepare(v, kind, heads)); // (b, h, 1, d_k), (b, h, 1, d_v)
    if tracked(&[reader, &k, &v_new, &alpha, &beta, &state.s]) {
        let decayed = alpha * &state.s;
        let delta = beta * (v_new - k.matmul(&decayed));
        state.s = decayed + k.transpose(-1, -2).matmul(&delta);
    } else {
        let _ = state.s.g_mul_(&alpha); // S' = α S, (b, h, d_k, d_v)
        let delta = beta * (v_new - k.matmul(&state.s)); // (b, h, 1, d_v)
        let _ = state.s.addcmul_(&k.transpose(-1, -2), &delta);
    }
}

/// Runs a whole sequence token by token through [`step`], from `state` (zero when `None`).
pub fn recurrent(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    state: Option<GatedDeltaNetState>,
) -> Result<(Tensor, GatedDeltaNetState)> {
    let s = check_inputs(q, k, v, g, beta)?;
    check_values(g, beta)?;
    let kind = compute_kind("v", v)?;
    // A copy: the steps update it in place, and the caller's state must not change.
    let mut state = GatedDeltaNetState::initial(state.as_ref(), &s, (kind, v.device()))?
        .map_tensors(&Tensor::copy);
    let mut outputs = Vec::with_capacity(s.len as usize);
    for t in 0..s.len {
        let token = |x: &Tensor| x.narrow(2, t, 1);
        outputs.push(step(
            &mut state,
            &token(q),
            &token(k),
            &token(v),
            &token(g),
            &token(beta),
        )?);
    }
    Ok((Tensor::cat(&outputs, 2), state))
}
