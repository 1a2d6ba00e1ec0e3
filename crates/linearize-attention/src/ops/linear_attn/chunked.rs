//! Chunked form for training and prefill: causal C x C products inside a chunk, a running state
//! (f x d) and normaliser (f) across chunks, all chunks at once through batched matmuls. For
//! f16 / bf16 inputs the matmuls take operands in the input dtype while the sums stay in f32
//! (`tensors::Precision`).
use super::{check_inputs, LinearAttnConfig, LinearState};
use crate::error::{Error, Result};
use crate::tensors::{ceil_div, exclusive_cumsum, pad_seq, prepare, Precision};
use linearize_torch_ext::linear_attn as fused;
use tch::{Kind, Tensor};

/// Runs the sequence on from `state` (the empty state when `None`) and returns the output
/// (b, h, L, d) and the state after the last token.
pub fn chunked(
    phi_q: &Tensor,
    phi_k: &Tensor,
    v: &Tensor,
    cfg: &LinearAttnConfig,
    state: Option<&LinearState>,
) -> Result<(Tensor, LinearState)> {
    cfg.validate()?;
    let s = check_inputs(phi_q, phi_k, v)?;
    let p = Precision::of("v", v)?;
    let init = LinearState::initial(state, &s, (p.acc, v.device()))?;
    let (b, h, c) = (s.batch, s.heads, cfg.chunk_size);
    let n = ceil_div(s.len, c);
    let chunks = |x: &Tensor| {
        let x = prepare(x, p.operand, h);
        let width = x.size()[3];
        pad_seq(&x, 0, n * c - s.len).reshape([b, h, n, c, width])
    };
    let (q, k, values) = (chunks(phi_q), chunks(phi_k), chunks(v)); // (b, h, n, C, f|d)

    // What each chunk adds to the state, and the state before each chunk (sums in `acc`).
    let kv_chunk = p.mm(&k.transpose(-1, -2), &values); // (b, h, n, f, d)
    let k_chunk = k.sum_dim_intlist(-2, false, p.acc); // (b, h, n, f)
    let kv_before = exclusive_cumsum(&kv_chunk, 2, kv_chunk.kind()) + init.kv.unsqueeze(2);
    let k_before = exclusive_cumsum(&k_chunk, 2, k_chunk.kind()) + init.k_sum.unsqueeze(2);

    let future = Tensor::ones([c, c], (Kind::Bool, v.device())).triu(1);
    let a = p.mm(&q, &k.transpose(-1, -2)).masked_fill(&future, 0.0); // (b, h, n, C, C)
                                                                      // (b, h, n, C, d) and (b, h, n, C, 1)
    let num = p.mm(&a, &values) + p.mm_state(&q, &kv_before);
    let den = a.sum_dim_intlist(-1, true, p.acc) + p.mm_state(&q, &k_before.unsqueeze(-1));
    let y = (num / (den + cfg.eps))
        .reshape([b, h, n * c, s.head_dim])
        .narrow(2, 0, s.len);

    let last = LinearState {
        kv: kv_before.select(2, n - 1) + kv_chunk.select(2, n - 1),
        k_sum: k_before.select(2, n - 1) + k_chunk.select(2, n - 1),
    };
    Ok((y.to_kind(v.kind()), last))
}

/// [`chunked`]'s output from the empty state, without the state after the last token (training
/// and scoring need only the output). With `cfg.fused`, calls that the fused CUDA kernels support
/// (CUDA, bf16 or f16 values, head size 64 or 128, feature width 64, 128 or 256) take them.
pub fn chunked_output(
    phi_q: &Tensor,
    phi_k: &Tensor,
    v: &Tensor,
    cfg: &LinearAttnConfig,
) -> Result<Tensor> {
    cfg.validate()?;
    check_inputs(phi_q, phi_k, v)?;
    if cfg.fused && fused::unsupported(phi_q, phi_k, v).is_none() {
        return fused::attention(phi_q, phi_k, v, cfg.eps).map_err(Error::Kernel);
    }
    Ok(chunked(phi_q, phi_k, v, cfg, None)?.0)
}
