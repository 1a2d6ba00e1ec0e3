//! Chunked form for training and prefill. Query chunk j sees, as explicit scores, only its local
//! block of keys (its own C tokens plus enough earlier chunks to cover every window); all keys
//! before that block are, for every query of the chunk, outside the window, so they enter as
//! linear sums carried across chunks. Cost O(L·(C + w)·d + L·f·d), memory linear in L. For f16 /
//! bf16 inputs the matmuls take operands in the input dtype, the sums stay in f32.
use super::{check_inputs, gammas, LolcatsConfig, LolcatsInputs, LolcatsState};
use crate::error::Result;
use crate::ops::window::LocalBlocks;
use crate::tensors::{exclusive_cumsum, prepare, repeat_heads, Precision};
use tch::Tensor;

/// Runs the sequence on from `state` (empty when `None`) and returns the output (b, h, L, d_v) and
/// the state after the last token.
pub fn chunked(
    x: &LolcatsInputs,
    cfg: &LolcatsConfig,
    state: Option<&LolcatsState>,
) -> Result<(Tensor, LolcatsState)> {
    cfg.validate()?;
    let s = check_inputs(x)?;
    let p = Precision::of("v", x.v)?;
    let window = cfg.window();
    let device = x.v.device();
    let start = LolcatsState::initial(state, &s, &window, (p.acc, device))?;
    let blocks = LocalBlocks::new(&window, cfg.chunk_size, s.len, start.cached(), start.pos)?;
    let h = s.heads;

    // Cached tokens followed by the new ones, laid out in slots (b, h, S, ·). Only matmuls read
    // them, so they are laid out in the operand dtype (the cache holds values of that dtype).
    let slots = |cache: &Tensor, new: &Tensor| {
        let joined = Tensor::cat(&[cache.to_kind(p.operand), new.to_kind(p.operand)], 2);
        repeat_heads(&blocks.slot_keys(&joined), h)
    };
    let k_slots = slots(&start.k, x.k);
    let phi_k_slots = slots(&start.phi_k, x.phi_k);
    let v_slots = slots(&start.v, x.v);

    // Linear sums over the keys before each chunk's local block (b, h, n, f, d_v) and (b, h, n, f),
    // summed across chunks in `acc`.
    let phi_k_chunks = blocks.slot_chunks(&phi_k_slots);
    let kv_before = exclusive_cumsum(
        &p.mm(
            &phi_k_chunks.transpose(-1, -2),
            &blocks.slot_chunks(&v_slots),
        ),
        2,
    ) + start.linear.kv.unsqueeze(2);
    let k_before = exclusive_cumsum(&phi_k_chunks.sum_dim_intlist(-2, false, p.acc), 2)
        + start.linear.k_sum.unsqueeze(2);

    let q = blocks.query_chunks(&prepare(x.q, p.operand, h)); // (b, h, n, C, d)
    let phi_q = blocks.query_chunks(&prepare(x.phi_q, p.operand, h)); // (b, h, n, C, f)
    let (window_mask, linear_mask) = blocks.masks(&window, device); // (n, C, K)

    // Scores come back rounded to the operand dtype (as in eager bf16 attention); the max, the
    // exponentials and every sum below are in `acc`.
    let scores = p.mm(&q, &blocks.local(&k_slots).transpose(-1, -2)) / (s.head_dim as f64).sqrt();
    let scores = scores.masked_fill(&window_mask.logical_not(), f64::NEG_INFINITY); // (b, h, n, C, K)
    let max = scores.amax([-1i64].as_slice(), true);
    let a_window = (scores - max).exp() * gammas(x.window_factors, h, p.acc, 5);
    let a_linear = p
        .mm(&phi_q, &blocks.local(&phi_k_slots).transpose(-1, -2))
        .masked_fill(&linear_mask.logical_not(), 0.0);
    let a = a_window + a_linear;

    // (b, h, n, C, d_v) and (b, h, n, C, 1)
    let num = p.mm(&a, &blocks.local(&v_slots)) + p.mm_state(&phi_q, &kv_before);
    let den = a.sum_dim_intlist(-1, true, p.acc) + p.mm_state(&phi_q, &k_before.unsqueeze(-1));
    let y = blocks.unchunk(&(num / den));

    let end = start.advance(
        &x.k.to_kind(p.acc),
        &x.phi_k.to_kind(p.acc),
        &x.v.to_kind(p.acc),
        h,
        &window,
        p,
    );
    Ok((y.to_kind(x.v.kind()), end))
}
