//! Chunked form for training and prefill: the WY / UT representation of flash-linear-attention's
//! `chunk_gated_delta_rule`. Within a chunk of C tokens entering with state `S_0`, write the
//! update as `S_t = α_t S_{t−1} + k_tᵀ δ_t`; with `γ_t` the cumulative log-decay from the chunk's
//! start through t, the corrections `δ` (C, d_v) solve the unit-lower-triangular system
//!
//! ```text
//! (I + A) δ = β ⊙ V − (β e^γ ⊙ K) S_0,   A_ti = β_t e^{γ_t − γ_i} k_t·k_i  (i < t)
//! ```
//!
//! so that `δ = U − W S_0` with `U = T (β ⊙ V)`, `W = T (β e^γ ⊙ K)`, `T = (I + A)⁻¹`: one
//! triangular solve per chunk, independent of the state. Then
//! `O = (e^γ ⊙ Q) S_0 + (Q Kᵀ ⊙ e^{γ_t − γ_i}, i <= t) δ` and
//! `S_C = e^{γ_C} S_0 + (e^{γ_C − γ} ⊙ K)ᵀ δ`. Every decay is the exponential of a difference
//! that is <= 0 (the pairs i > t are set to −∞ before the exponential), so outputs and
//! gradients stay finite for any decay strength: strong decays underflow to zero, never
//! overflow. Only the state scan across chunks runs sequentially (two products per chunk).
//! For f16 / bf16 inputs the matmuls take operands in the input dtype; decays, the triangular
//! solve, the corrections and the state stay in f32.
use super::{check_inputs, check_values, GatedDeltaNetConfig, GatedDeltaNetState};
use crate::error::Result;
use crate::tensors::{ceil_div, pad_seq, prepare, Precision};
use tch::{Kind, Tensor};

/// Runs the sequence on from `state` (zero when `None`) and returns the output (b, h, L, d_v) and
/// the state after the last token.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    cfg: &GatedDeltaNetConfig,
    state: Option<&GatedDeltaNetState>,
) -> Result<(Tensor, GatedDeltaNetState)> {
    cfg.validate()?;
    let s = check_inputs(q, k, v, g, beta)?;
    check_values(g, beta)?;
    let p = Precision::of("v", v)?;
    let out_kind = v.kind();
    let init = GatedDeltaNetState::initial(state, &s, (p.acc, v.device()))?;
    let (b, h, c) = (s.batch, s.heads, cfg.chunk_size);
    let (dk, dv) = (s.key_dim, s.value_dim);
    let n = ceil_div(s.len, c);
    // Padding tokens have k = v = 0, β = 0 and decay 1 (g = 0): they change neither outputs nor
    // state.
    let pad = |x: &Tensor| {
        let x = prepare(x, p.acc, h);
        pad_seq(&x, 0, n * c - s.len)
    };
    let chunks = |x: &Tensor| {
        let width = x.size()[3];
        pad(x).reshape([b, h, n, c, width])
    };
    let (q, k, v) = (chunks(q), chunks(k), chunks(v)); // (b, h, n, C, d)
    let per_token = |x: &Tensor| pad(&x.unsqueeze(-1)).reshape([b, h, n, c]);
    let (g, beta) = (per_token(g), per_token(beta)); // (b, h, n, C)
    let cum = g.cumsum(3, p.acc); // γ: log-decay from the chunk start through t
    let total = cum.select(3, c - 1); // (b, h, n)

    let device = q.device();
    let future = Tensor::ones([c, c], (Kind::Bool, device)).triu(1);
    let decay = (cum.unsqueeze(-1) - cum.unsqueeze(-2)) // (b, h, n, C_t, C_i)
        .masked_fill(&future, f64::NEG_INFINITY)
        .exp();

    // The UT transform: one unit-lower-triangular solve for both right-hand sides.
    let beta_col = beta.unsqueeze(-1); // (b, h, n, C, 1)
    let a = (&beta_col * p.mm(&k, &k.transpose(-1, -2)) * &decay).tril(-1);
    let system = a + Tensor::eye(c, (p.acc, device));
    let rhs = Tensor::cat(
        &[&beta_col * &v, &beta_col * cum.exp().unsqueeze(-1) * &k],
        -1,
    );
    let solved = system.linalg_solve_triangular(&rhs, false, true, true); // (b, h, n, C, d_v + d_k)
    let (u, w) = (solved.narrow(-1, 0, dv), solved.narrow(-1, dv, dk));

    // The scan across chunks: each chunk's corrections δ = U − W S_0 and the state it leaves.
    let k_to_end = (&k * (total.unsqueeze(-1) - &cum).exp().unsqueeze(-1)).transpose(-1, -2); // (b, h, n, d_k, C)
    let chunk_decay = total.exp().unsqueeze(-1).unsqueeze(-1); // (b, h, n, 1, 1)
                                                               // Per-chunk views through `unbind`, whose backward stacks the gradients once (a `select` per
                                                               // chunk would scatter each into a zero tensor of all chunks: quadratic in the chunk count).
    let mut before = Vec::with_capacity(n as usize);
    let mut corrections = Vec::with_capacity(n as usize);
    let mut carried = init.s;
    for (((u, w), k_to_end), chunk_decay) in u
        .unbind(2)
        .iter()
        .zip(w.unbind(2))
        .zip(k_to_end.unbind(2))
        .zip(chunk_decay.unbind(2))
    {
        let delta = u - p.mm_state(&w, &carried); // (b, h, C, d_v)
        let next = chunk_decay * &carried + p.mm(&k_to_end, &delta);
        before.push(carried);
        corrections.push(delta);
        carried = next;
    }
    let before = Tensor::stack(&before, 2); // (b, h, n, d_k, d_v): state entering each chunk
    let delta = Tensor::stack(&corrections, 2); // (b, h, n, C, d_v)

    let within = p.mm(&q, &k.transpose(-1, -2)) * decay; // (b, h, n, C_t, C_i), zero for i > t
    let y = p.mm_state(&(&q * cum.exp().unsqueeze(-1)), &before) + p.mm(&within, &delta);
    let y = y.reshape([b, h, n * c, dv]).narrow(2, 0, s.len);
    Ok((y.to_kind(out_kind), GatedDeltaNetState { s: carried }))
}
