//! Chunked form for training and prefill. Query chunk j sees, as explicit scores, only its local
//! block of keys (its own C tokens plus enough earlier chunks to cover every window); all keys
//! before that block are, for every query of the chunk, outside the window, so they enter as
//! linear sums carried across chunks. Cost O(L·(C + w)·d + L·f·d), memory linear in L. For f16 /
//! bf16 inputs the matmuls take operands in the input dtype, the sums stay in f32.
use super::{check_inputs, gammas, LolcatsConfig, LolcatsInputs, LolcatsState, Shapes};
use crate::error::Result;
use crate::ops::window::LocalBlocks;
use crate::tensors::{exclusive_cumsum, prefix_sums, prepare, repeat_heads, Precision};
use tch::{Kind, Tensor};

/// Runs the sequence on from `state` (empty when `None`) and returns the output (b, h, L, d_v) and
/// the state after the last token.
pub fn chunked(
    x: &LolcatsInputs,
    cfg: &LolcatsConfig,
    state: Option<&LolcatsState>,
) -> Result<(Tensor, LolcatsState)> {
    let call = Call::new(x, cfg, state)?;
    let y = call.output(x);
    let end = call.start.advance(
        &x.k.to_kind(call.p.acc),
        &x.phi_k.to_kind(call.p.acc),
        &x.v.to_kind(call.p.acc),
        call.s.heads,
        &cfg.window(),
        call.p,
    );
    Ok((y, end))
}

/// [`chunked`]'s output from an empty state, without building the state after the last token
/// (training needs only the output).
pub fn chunked_output(x: &LolcatsInputs, cfg: &LolcatsConfig) -> Result<Tensor> {
    Ok(Call::new(x, cfg, None)?.output(x))
}

/// One call's checked sizes, dtypes, starting state and block layout.
struct Call {
    s: Shapes,
    p: Precision,
    start: LolcatsState,
    /// Whether the call starts from the empty state (no cache to join, no sums to add).
    fresh: bool,
    blocks: LocalBlocks,
    cfg: LolcatsConfig,
}

impl Call {
    fn new(x: &LolcatsInputs, cfg: &LolcatsConfig, state: Option<&LolcatsState>) -> Result<Self> {
        cfg.validate()?;
        let s = check_inputs(x)?;
        let p = Precision::of("v", x.v)?;
        let window = cfg.window();
        let start = LolcatsState::initial(state, &s, &window, (p.acc, x.v.device()))?;
        let blocks = LocalBlocks::new(&window, cfg.chunk_size, s.len, start.cached(), start.pos)?;
        Ok(Self {
            s,
            p,
            fresh: state.is_none(),
            start,
            blocks,
            cfg: *cfg,
        })
    }

    /// The local blocks and linear sums: from the chunks themselves for a fresh call (f16
    /// excepted), else from slots that join the cache to the new tokens.
    fn keys(&self, x: &LolcatsInputs) -> Keys {
        if self.fresh && self.p.operand != Kind::Half {
            self.fresh_keys(x)
        } else {
            self.slot_keys(x)
        }
    }

    /// Keys laid out in slots (b, h, S, ·) after the cached ones; local blocks cut from them.
    fn slot_keys(&self, x: &LolcatsInputs) -> Keys {
        let (p, blocks, h) = (self.p, &self.blocks, self.s.heads);
        // Only matmuls read the slots, so they are laid out in the operand dtype (the cache
        // holds values of that dtype).
        let slots = |cache: &Tensor, new: &Tensor| {
            let joined = if self.fresh {
                new.to_kind(p.operand)
            } else {
                Tensor::cat(&[cache.to_kind(p.operand), new.to_kind(p.operand)], 2)
            };
            repeat_heads(&blocks.slot_keys(&joined), h)
        };
        let k_slots = slots(&self.start.k, x.k);
        let phi_k_slots = slots(&self.start.phi_k, x.phi_k);
        let v_slots = slots(&self.start.v, x.v);

        // Linear sums over the keys before each chunk's local block (b, h, n, f, d_v) and
        // (b, h, n, f), summed across chunks in `acc`.
        let phi_k_chunks = blocks.slot_chunks(&phi_k_slots);
        let chunk_kv = p.mm_operand(
            &phi_k_chunks.transpose(-1, -2),
            &blocks.slot_chunks(&v_slots),
        );
        // f16 sums can outgrow f16: they are formed in f32 and scaled for the matmul
        // (`mm_state`). Otherwise one matmul by a strictly lower-triangular matrix forms them,
        // accumulated in f32 and rounded once to the operand dtype the next matmul reads.
        let kv_sums = if p.operand == Kind::Half {
            exclusive_cumsum(&chunk_kv, 2, p.acc)
        } else {
            prefix_sums(&chunk_kv, 1)
        };
        let k_sums = exclusive_cumsum(&phi_k_chunks.sum_dim_intlist(-2, false, p.acc), 2, p.acc);
        // The carried sums are f32: adding them promotes bf16 chunk sums to f32 (not in place,
        // which would round the total to bf16).
        let (kv_before, k_before) = if self.fresh {
            (kv_sums, k_sums)
        } else {
            (
                kv_sums + self.start.linear.kv.unsqueeze(2),
                k_sums + self.start.linear.k_sum.unsqueeze(2),
            )
        };
        Keys {
            k: blocks.local(&k_slots),
            phi_k: blocks.local(&phi_k_slots),
            v: blocks.local(&v_slots),
            kv_before,
            k_before,
        }
    }

    /// A fresh call's keys straight from its chunks (b, h, n, C, ·), views of the inputs: the
    /// blocks by [`LocalBlocks::local_from_chunks`], the keys before block j (the chunks before
    /// j − history) by one prefix matmul. No slot padding, slicing or scan: their backward
    /// passes were most of this kernel's.
    fn fresh_keys(&self, x: &LolcatsInputs) -> Keys {
        let (p, blocks, h) = (self.p, &self.blocks, self.s.heads);
        let chunks = |t: &Tensor| repeat_heads(&blocks.query_chunks(&t.to_kind(p.operand)), h);
        let (k, phi_k, v) = (chunks(x.k), chunks(x.phi_k), chunks(x.v));
        let hist = blocks.history;
        let chunk_kv = p.mm_operand(&phi_k.transpose(-1, -2), &v); // (b, h, n, f, d_v)
        Keys {
            kv_before: prefix_sums(&chunk_kv, hist + 1),
            k_before: prefix_sums(&phi_k.sum_dim_intlist(-2, false, p.acc), hist + 1),
            k: blocks.local_from_chunks(&k),
            phi_k: blocks.local_from_chunks(&phi_k),
            v: blocks.local_from_chunks(&v),
        }
    }

    fn output(&self, x: &LolcatsInputs) -> Tensor {
        let (s, p, blocks, h) = (&self.s, self.p, &self.blocks, self.s.heads);
        let window = self.cfg.window();
        let keys = self.keys(x);

        let q = blocks.query_chunks(&prepare(x.q, p.operand, h)); // (b, h, n, C, d)
        let phi_q = blocks.query_chunks(&prepare(x.phi_q, p.operand, h)); // (b, h, n, C, f)
        let (window_mask, linear_mask) = blocks.masks(&window, x.v.device()); // (n, C, K)

        // Scores stay in the operand dtype (as in eager bf16 attention); the max, the
        // exponentials and every sum below are in `acc`. γ enters through the max,
        // γ·exp(s − m) = exp(s − (m − log γ)), which saves a pass over the scores.
        let mut scores = p.mm_operand(&q, &keys.k.transpose(-1, -2));
        scores /= (s.head_dim as f64).sqrt();
        let _ = scores.masked_fill_(&window_mask.logical_not(), f64::NEG_INFINITY); // (b, h, n, C, K)
        let shift = scores.amax([-1i64].as_slice(), true).to_kind(p.acc)
            - gammas(x.window_factors, h, p.acc, 5).log();
        let mut a_window = &scores - shift;
        let _ = a_window.exp_();
        // The weights go into the value matmul in the operand dtype (the sum is formed in `acc`
        // and rounded once); the normaliser sums the same rounded weights, so numerator and
        // denominator agree.
        let mut a = p.mm_operand(&phi_q, &keys.phi_k.transpose(-1, -2));
        let _ = a.masked_fill_(&linear_mask.logical_not(), 0.0);
        a += &a_window;

        // (b, h, n, C, d_v) and (b, h, n, C, 1)
        let num = p.mm_operand(&a, &keys.v) + p.mm_state(&phi_q, &keys.kv_before);
        let den =
            a.sum_dim_intlist(-1, true, p.acc) + p.mm_state(&phi_q, &keys.k_before.unsqueeze(-1));
        // The normaliser is small (one value per query): multiplying by its reciprocal keeps
        // the backward to one pass over the numerator.
        blocks
            .unchunk(&(num * den.reciprocal()))
            .to_kind(x.v.kind())
    }
}

/// Every query chunk's local block of keys and the linear sums over the keys before it.
struct Keys {
    /// (b, h, n, K, d)
    k: Tensor,
    /// (b, h, n, K, f)
    phi_k: Tensor,
    /// (b, h, n, K, d_v)
    v: Tensor,
    /// (b, h, n, f, d_v)
    kv_before: Tensor,
    /// (b, h, n, f)
    k_before: Tensor,
}
