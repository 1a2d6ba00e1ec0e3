//! Chunked form for training and prefill, on LoLCATs' block layout ([`LocalBlocks`]): query
//! chunk j sees, as explicit scores, its local block of keys (its own C tokens plus enough
//! earlier chunks to cover every window, the cache first when continuing from a state); every
//! key before that block is a linear key of every query of the chunk, held in a decayed sum
//! carried across chunks. One normaliser over the block's window terms, its linear terms and the
//! carried sum, as in LoLCATs' block form; the window terms take `exp(s − m)` with `m` the
//! window's max, the linear terms are not scaled by it.
//!
//! Decays stay in log space and every exponent is at most 0, so outputs and gradients stay
//! finite for any gate strength. With c0 the start of the query's chunk and `A_t` the log-gates
//! summed from c0 through t:
//! - a key s of the block before c0 decays to query t by `exp(A_t + Σ_{s<r<c0} g_r)`, two sums
//!   over their own spans; a key of the query's own chunk by `exp(A_t − A_s)`, the one
//!   difference, of sums over at most C tokens (masked to `-inf` before the exponential where s
//!   is not a linear key, so future entries never overflow);
//! - the sum carried into block j holds the keys before it, decayed to the slot before the block,
//!   and reaches query t by `exp(Σ_{history} g + A_t)`;
//! - each chunk adds its keys decayed to its end by `exp(Σ_{r>s} g_r)` (summed from the end), and
//!   the carried sum decays by the chunk's whole gate: one fused update per chunk.
//!
//! Cost O(L·(C + w)·(d + f) + L·f·d_v), memory linear in L; no matrix larger than C × block. The
//! values carry a column of ones, so each matmul yields numerator and normaliser together (from
//! the same rounded weights). For f16 / bf16 inputs the matmuls take operands in the input dtype;
//! gates, decays, maxima and sums stay in f32.
use super::{check_gates, check_inputs, LizardConfig, LizardInputs, LizardState};
use crate::error::Result;
use crate::ops::lolcats::{gammas, Shapes};
use crate::ops::window::{without_sinks, LocalBlocks};
use crate::tensors::{prepare, repeat_heads, Precision};
use tch::{Kind, Tensor};

/// Runs the sequence on from `state` (empty when `None`) and returns the output (b, h, L, d_v)
/// and the state after the last token.
pub fn chunked(
    x: &LizardInputs,
    cfg: &LizardConfig,
    state: Option<&LizardState>,
) -> Result<(Tensor, LizardState)> {
    let call = Call::new(x, cfg, state)?;
    let y = call.output(x);
    let end = call.start.advance(
        &x.k.to_kind(call.p.acc),
        &call.phi_k.to_kind(call.p.acc),
        &x.v.to_kind(call.p.acc),
        x.log_gates,
        call.s.heads,
        cfg,
        call.p,
    );
    Ok((y, end))
}

/// [`chunked`]'s output from the empty state, without building the state after the last token
/// (training needs only the output).
pub fn chunked_output(x: &LizardInputs, cfg: &LizardConfig) -> Result<Tensor> {
    Ok(Call::new(x, cfg, None)?.output(x))
}

/// One call's checked sizes, dtypes, starting state and block layout.
struct Call {
    s: Shapes,
    p: Precision,
    start: LizardState,
    blocks: LocalBlocks,
    cfg: LizardConfig,
    /// The new tokens' key features with the sink rows zeroed.
    phi_k: Tensor,
    /// Every sink key and value the call's queries can reach, cached and new (b, h, N', ·),
    /// heads repeated, in the operand dtype; N' = 0 without sinks.
    sink_k: Tensor,
    sink_v: Tensor,
}

impl Call {
    fn new(x: &LizardInputs, cfg: &LizardConfig, state: Option<&LizardState>) -> Result<Self> {
        cfg.validate()?;
        let s = check_inputs(x)?;
        check_gates(x.log_gates)?;
        let p = Precision::of("v", x.v)?;
        let start = LizardState::initial(state, &s, cfg, (p.acc, x.v.device()))?;
        let blocks = LocalBlocks::new(
            &cfg.window(),
            cfg.chunk_size,
            s.len,
            start.cached(),
            start.pos,
        )?;
        let joining = (cfg.sinks - start.pos).clamp(0, s.len);
        let new = |t: &Tensor| t.narrow(2, 0, joining).to_kind(p.acc);
        let sinks = start
            .sinks
            .advance(&new(x.k), &new(x.v), start.pos, cfg.sinks);
        let operand = |t: &Tensor| repeat_heads(&t.to_kind(p.operand), s.heads);
        Ok(Self {
            phi_k: without_sinks(x.phi_k, start.pos, cfg.sinks),
            sink_k: operand(&sinks.k),
            sink_v: with_ones(&operand(&sinks.v)),
            s,
            p,
            start,
            blocks,
            cfg: *cfg,
        })
    }

    /// `[cache ; new]` (b, h', m + L, x) laid out in slots (b, h, S, x), heads repeated.
    fn slots(&self, cache: &Tensor, new: &Tensor, kind: Kind) -> Tensor {
        let joined = Tensor::cat(&[cache.to_kind(kind), new.to_kind(kind)], 2);
        repeat_heads(&self.blocks.slot_keys(&joined), self.s.heads)
    }

    fn output(&self, x: &LizardInputs) -> Tensor {
        let (s, p, blocks, h) = (&self.s, self.p, &self.blocks, self.s.heads);
        let (n, c) = (blocks.chunks, blocks.chunk);
        let k_slots = self.slots(&self.start.k, x.k, p.operand);
        let phi_slots = self.slots(&self.start.phi_k, &self.phi_k, p.operand);
        let v_slots = with_ones(&self.slots(&self.start.v, x.v, p.operand)); // (b, h, S, d_v+1)
                                                                             // Padding slots get gate 1 (log 0): they decay nothing.
        let g_slots = self
            .slots(
                &self.start.log_gates.unsqueeze(-1),
                &x.log_gates.unsqueeze(-1),
                p.acc,
            )
            .squeeze_dim(-1); // (b, h, S)

        // The sums carried into each block: chunk i of the slots (the first n of them are the
        // keys before blocks 0..n) adds its keys decayed to its end.
        let g_chunks = g_slots.narrow(2, 0, n * c).reshape([s.batch, h, n, c]);
        let phi_chunks = blocks.slot_chunks(&phi_slots); // (b, h, n, C, f)
        let to_end = super::decay_after(&g_chunks, p.acc).exp().unsqueeze(-1); // (b, h, n, C, 1)
        let updates = p.mm(
            &(phi_chunks.to_kind(p.acc) * to_end).transpose(-1, -2),
            &blocks.slot_chunks(&v_slots),
        ); // (b, h, n, f, d_v+1)
        let chunk_decay = g_chunks
            .sum_dim_intlist(-1, false, p.acc)
            .exp()
            .unsqueeze(-1)
            .unsqueeze(-1); // (b, h, n, 1, 1)
                            // Per-chunk views through `unbind`, whose backward stacks the gradients once.
        let mut carried = Tensor::cat(
            &[
                &self.start.linear.kv,
                &self.start.linear.k_sum.unsqueeze(-1),
            ],
            -1,
        ); // (b, h, f, d_v+1)
        let mut before = Vec::with_capacity(n as usize);
        for (update, decay) in updates.unbind(2).iter().zip(chunk_decay.unbind(2)) {
            let next = update + decay * &carried;
            before.push(carried);
            carried = next;
        }
        let before = Tensor::stack(&before, 2); // (b, h, n, f, d_v+1)

        // Log-decays to each query of block j, split at its chunk's start c0: `from_start` the
        // gates from c0 through the query (b, h, n, C), `to_start` those from just after each
        // history key to c0 (b, h, n, hist·C), `history` all of the history's (b, h, n, 1). Each
        // is a sum over its own span, so a strong gate early in the block costs the later,
        // weakly decayed terms no precision.
        let g_blocks = blocks.local(&g_slots.unsqueeze(-1)).squeeze_dim(-1); // (b, h, n, K)
        let hist_len = blocks.history * c;
        let g_hist = g_blocks.narrow(3, 0, hist_len);
        let from_start = g_blocks.narrow(3, hist_len, c).cumsum(-1, p.acc);
        let to_start = match hist_len {
            0 => g_hist.shallow_clone(), // a window of one token reaches no history
            _ => super::decay_after(&g_hist, p.acc),
        };
        let history = g_hist.sum_dim_intlist(-1, true, p.acc);

        let (window_mask, linear_mask) = blocks.masks_with_sink_rows(
            &self.cfg.window(),
            self.cfg.sinks,
            self.sink_k.size()[2],
            x.v.device(),
        ); // (n, C, K + N')
        let block_len = blocks.block_len();
        let chunks = |t: &Tensor| blocks.query_chunks(&prepare(t, p.operand, h));
        let (q, phi_q) = (chunks(x.q), chunks(x.phi_q)); // (b, h, n, C, ·)

        // Window terms: γ·exp(s − m) = exp(s − (m − log γ)), over the block and the sinks.
        let keys = blocks.with_sinks(&blocks.local(&k_slots), &self.sink_k);
        let mut scores = p.mm_operand(&q, &keys.transpose(-1, -2));
        scores /= (s.head_dim as f64).sqrt();
        let _ = scores.masked_fill_(&window_mask.logical_not(), f64::NEG_INFINITY);
        let shift = scores.amax([-1i64].as_slice(), true).to_kind(p.acc)
            - gammas(x.window_factors, h, p.acc, 5).log();
        let a_window = (&scores - shift).exp(); // (b, h, n, C, K + N') in acc

        // Linear terms within the block, decayed; the sink rows have none.
        let linear_mask = linear_mask.narrow(2, 0, block_len);
        let q_log = from_start.unsqueeze(-1); // (b, h, n, C, 1)
        let decay = Tensor::cat(
            &[
                &q_log + to_start.unsqueeze(-2),
                &q_log - from_start.unsqueeze(-2),
            ],
            -1,
        )
        .masked_fill(&linear_mask.logical_not(), f64::NEG_INFINITY)
        .exp(); // (b, h, n, C, K)
        let a_linear = p.mm(&phi_q, &blocks.local(&phi_slots).transpose(-1, -2)) * decay;
        let a_linear = match self.sink_k.size()[2] {
            0 => a_linear,
            sinks => a_linear.constant_pad_nd([0, sinks]),
        };
        let a = a_window + a_linear;

        let values = blocks.with_sinks(&blocks.local(&v_slots), &self.sink_v);
        let reach_query = (history + from_start).exp().unsqueeze(-1); // (b, h, n, C, 1)
        let out = p.mm(&a, &values) + p.mm_state(&phi_q, &before) * reach_query; // (b, h, n, C, d_v+1)
        let d_v = s.value_dim;
        let y = out.narrow(-1, 0, d_v) * out.narrow(-1, d_v, 1).reciprocal();
        blocks.unchunk(&y).to_kind(x.v.kind())
    }
}

/// `v` (.., d_v) with a column of ones appended (.., d_v + 1): a matmul by it yields the weighted
/// values and the weights' sum together.
fn with_ones(v: &Tensor) -> Tensor {
    let mut size = v.size();
    *size.last_mut().expect("4-d values") = 1;
    Tensor::cat(&[v, &Tensor::ones(&size, (v.kind(), v.device()))], -1)
}
