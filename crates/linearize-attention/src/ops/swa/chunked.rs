//! Chunked form for training and prefill: each query chunk attends to its local block of keys
//! (its own chunk plus the earlier chunks its windows reach) through libtorch's
//! `scaled_dot_product_attention` with a banded mask, so cost and memory are O(L·(C + w)). Sink
//! keys join every block with their own mask (see [`crate::ops::window`]). f16 /
//! bf16 inputs reach SDPA in their own dtype: its kernels keep the softmax statistics in f32.
use super::{check_inputs, SwaConfig, SwaState};
use crate::error::Result;
use crate::ops::window::LocalBlocks;
use crate::tensors::{prepare, repeat_heads, Precision};
use tch::Tensor;

/// Runs the sequence on from `state` (empty when `None`) and returns the output (b, h, L, d_v) and
/// the state after the last token.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &SwaConfig,
    state: Option<&SwaState>,
) -> Result<(Tensor, SwaState)> {
    cfg.validate()?;
    let s = check_inputs(q, k, v)?;
    let p = Precision::of("v", v)?;
    let window = cfg.window();
    let start = SwaState::initial(state, &s, cfg, (p.acc, v.device()))?;
    let blocks = LocalBlocks::new(&window, cfg.chunk_size, s.len, start.cached(), start.pos)?;
    let (b, h, n) = (s.batch, s.heads, blocks.chunks);
    let end = start.advance(&k.to_kind(p.acc), &v.to_kind(p.acc), cfg);
    // Every sink key the call's queries can reach: the cached ones and the new ones.
    let sinks = end.sinks.len();

    let local = |cache: &Tensor, new: &Tensor, sink: &Tensor| {
        let joined = Tensor::cat(&[cache.to_kind(p.operand), new.to_kind(p.operand)], 2);
        let slots = blocks.slot_keys(&joined);
        let mut block = blocks.local(&repeat_heads(&slots, h)); // (b, h, n, K, ·)
        if sinks > 0 {
            block = blocks.with_sinks(&block, &repeat_heads(sink, h)); // (b, h, n, K+N, ·)
        }
        let width = block.size()[4];
        block.reshape([b * h, n, blocks.block_len() + sinks, width])
    };
    let queries = blocks.query_chunks(&prepare(q, p.operand, h)).reshape([
        b * h,
        n,
        blocks.chunk,
        s.head_dim,
    ]);
    let (mut mask, _) = blocks.masks(&window, cfg.sinks, v.device()); // (n, C, K)
    if sinks > 0 {
        mask = Tensor::cat(&[mask, blocks.sink_mask(&window, sinks, v.device())], 2);
    }

    let y = Tensor::scaled_dot_product_attention(
        &queries,
        &local(&start.k, k, &end.sinks.k),
        &local(&start.v, v, &end.sinks.v),
        Some(mask.unsqueeze(0)),
        0.0,
        false,
        None,
        false,
    ); // (b*h, n, C, d_v)
    let y = blocks.unchunk(&y.reshape([b, h, n, blocks.chunk, s.value_dim]));
    Ok((y.to_kind(v.kind()), end))
}
