//! Chunked form for training and prefill. Query chunk j sees, as explicit scores, only its local
//! block of keys (its own C tokens plus enough earlier chunks to cover every window); all keys
//! before that block are, for every query of the chunk, outside the window, so they enter as
//! linear sums carried across chunks. Cost O(L·(C + w)·d + L·f·d), memory linear in L. For f16 /
//! bf16 inputs the matmuls take operands in the input dtype, the sums stay in f32.
//!
//! A call without state ([`Call::fresh_output`]: training, scoring, a first prefill) splits the
//! sums instead: the window part, `exp(s − m)` over the local blocks, and the linear part, plain
//! causal linear attention over the keys far enough back (for `sw` the keys delayed by w tokens,
//! for `tk` the terrace blocks two back), meet only in per-token sums. The window factor γ then
//! scales per-token sums rather than block scores, and the linear scores are C × C per chunk
//! instead of C × block: when q and k need no gradient (attention transfer), nothing of the
//! block size enters the backward pass.
//!
//! Sinks: the call's sink keys and values are appended to every local block with their own mask
//! (softmax only), and the sink tokens' key features are zeroed before anything reads them, so no
//! linear sum, in a block or carried, holds a sink. The fused kernels take the sinks themselves
//! (as window keys of every query, with their key features left unread), so they get the raw
//! features.
use super::{check_inputs, gammas, LolcatsConfig, LolcatsInputs, LolcatsState, Shapes};
use crate::error::{Error, Result};
use crate::ops::window::{without_sinks, LocalBlocks, WindowShape};
use crate::tensors::{
    ceil_div, exclusive_cumsum, pad_seq, prefix_sums, prepare, repeat_heads, Precision,
};
use linearize_torch_ext::lolcats as fused;
use tch::{Kind, Tensor};

/// Runs the sequence on from `state` (empty when `None`) and returns the output (b, h, L, d_v) and
/// the state after the last token. From the empty state, with `cfg.fused`, the output comes from
/// the fused CUDA kernels where they apply ([`chunked_output`]).
pub fn chunked(
    x: &LolcatsInputs,
    cfg: &LolcatsConfig,
    state: Option<&LolcatsState>,
) -> Result<(Tensor, LolcatsState)> {
    let call = Call::new(x, cfg, state)?;
    let fused = match state {
        None => fused_output(x, cfg)?,
        Some(_) => None,
    };
    let phi_k = without_sinks(x.phi_k, call.start.pos, cfg.sinks);
    let x = &LolcatsInputs {
        phi_k: &phi_k,
        ..*x
    };
    let y = fused.unwrap_or_else(|| call.output(x));
    let end = call.start.advance(
        &x.k.to_kind(call.p.acc),
        &x.phi_k.to_kind(call.p.acc),
        &x.v.to_kind(call.p.acc),
        call.s.heads,
        cfg,
        call.p,
    );
    Ok((y, end))
}

/// [`chunked`]'s output from an empty state, without building the state after the last token
/// (training needs only the output). With `cfg.fused`, calls that the fused CUDA kernels support
/// (bf16, a window of whole 64-token chunks, one feature map per query head) take them, sinks
/// or not.
pub fn chunked_output(x: &LolcatsInputs, cfg: &LolcatsConfig) -> Result<Tensor> {
    let call = Call::new(x, cfg, None)?;
    if let Some(y) = fused_output(x, cfg)? {
        return Ok(y);
    }
    let phi_k = without_sinks(x.phi_k, 0, cfg.sinks);
    Ok(call.output(&LolcatsInputs {
        phi_k: &phi_k,
        ..*x
    }))
}

/// The fused kernels' output from the empty state, or `None` when they do not apply (or
/// `cfg.fused` is off). `x.phi_k` keeps its sink rows: the kernels leave them out of the linear
/// terms. The caller has checked the inputs.
fn fused_output(x: &LolcatsInputs, cfg: &LolcatsConfig) -> Result<Option<Tensor>> {
    if !cfg.fused {
        return Ok(None);
    }
    let window = match cfg.window_shape {
        WindowShape::Sw => fused::Window::Sw(cfg.window_size),
        WindowShape::Tk => fused::Window::Tk(cfg.window_size),
    };
    let gammas = x.window_factors.to_kind(Kind::Float).sigmoid(); // (h)
    let inputs = fused::LolcatsInputs {
        q: x.q,
        k: x.k,
        v: x.v,
        phi_q: x.phi_q,
        phi_k: x.phi_k,
        gammas: &gammas,
    };
    if fused::unsupported(&inputs, window).is_some() {
        return Ok(None);
    }
    fused::attention(&inputs, window, cfg.sinks)
        .map(Some)
        .map_err(Error::Kernel)
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
    /// Every sink key and value the call's queries can reach, the cached and the new ones
    /// (b, h, N', ·), heads repeated, in the operand dtype; N' = 0 without sinks.
    sink_k: Tensor,
    sink_v: Tensor,
}

impl Call {
    fn new(x: &LolcatsInputs, cfg: &LolcatsConfig, state: Option<&LolcatsState>) -> Result<Self> {
        cfg.validate()?;
        let s = check_inputs(x)?;
        let p = Precision::of("v", x.v)?;
        let window = cfg.window();
        let start = LolcatsState::initial(state, &s, cfg, (p.acc, x.v.device()))?;
        let blocks = LocalBlocks::new(&window, cfg.chunk_size, s.len, start.cached(), start.pos)?;
        let joining = (cfg.sinks - start.pos).clamp(0, s.len);
        let new = |t: &Tensor| t.narrow(2, 0, joining).to_kind(p.acc);
        let sinks = start
            .sinks
            .advance(&new(x.k), &new(x.v), start.pos, cfg.sinks);
        let operand = |t: &Tensor| repeat_heads(&t.to_kind(p.operand), s.heads);
        Ok(Self {
            sink_k: operand(&sinks.k),
            sink_v: operand(&sinks.v),
            s,
            p,
            fresh: state.is_none(),
            start,
            blocks,
            cfg: *cfg,
        })
    }

    fn sinks(&self) -> i64 {
        self.sink_k.size()[2]
    }

    /// Local blocks (b, h, n, K, x) with the sink rows (b, h, N', x) appended to each.
    fn with_sinks(&self, block: Tensor, sinks: &Tensor) -> Tensor {
        if self.sinks() == 0 {
            return block;
        }
        self.blocks.with_sinks(&block, sinks)
    }

    /// `(window, linear)` masks (n, C, K + N') over the local blocks with the sinks appended:
    /// a sink is a softmax key of the queries whose window lies past it, never a linear one.
    fn masks(&self, device: tch::Device) -> (Tensor, Tensor) {
        self.blocks
            .masks_with_sink_rows(&self.cfg.window(), self.cfg.sinks, self.sinks(), device)
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

    /// The output (b, h, L, d_v). A fresh call (f16 excepted: its sums can outgrow f16 and need
    /// the scaled state products) splits window and linear parts ([`Call::fresh_output`]) for
    /// `tk`, and for `sw` when the scores need no gradient (attention transfer, inference); `sw`
    /// with gradients through q and k (LoRA) measured faster with one normaliser over the local
    /// block's window and linear scores (docs/BENCHMARKS.md, session 6), the form every call
    /// from a state takes, with keys joined to the cache in slots.
    fn output(&self, x: &LolcatsInputs) -> Tensor {
        let fresh = self.fresh && self.p.operand != Kind::Half;
        let scores_need_grad = x.q.requires_grad() || x.k.requires_grad();
        if fresh && (self.cfg.window_shape == WindowShape::Tk || !scores_need_grad) {
            self.fresh_output(x)
        } else if fresh {
            self.block_output(x, self.fresh_keys(x))
        } else {
            self.block_output(x, self.slot_keys(x))
        }
    }

    /// `t` (b, h', L, ·) in query chunks (b, h, n, C, ·) of the operand dtype, heads repeated.
    fn chunks(&self, t: &Tensor) -> Tensor {
        self.blocks
            .query_chunks(&prepare(t, self.p.operand, self.s.heads))
    }

    /// A fresh call's keys straight from its chunks (b, h, n, C, ·): the blocks by
    /// [`LocalBlocks::local_from_chunks`], the keys before block j (the chunks before
    /// j − history) by one prefix matmul.
    fn fresh_keys(&self, x: &LolcatsInputs) -> Keys {
        let (p, blocks) = (self.p, &self.blocks);
        let (k, phi_k, v) = (self.chunks(x.k), self.chunks(x.phi_k), self.chunks(x.v));
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

    /// A fresh call: `y = (γ·W_num + L_num) / (γ·W_den + L_den)` with the window part `W` from
    /// the local blocks and the linear part `L` from the keys outside every window.
    fn fresh_output(&self, x: &LolcatsInputs) -> Tensor {
        let (p, blocks, h) = (self.p, &self.blocks, self.s.heads);
        let v = blocks.local_from_chunks(&self.chunks(x.v)); // (b, h, n, K, d_v)
        let (w_num, w_den) = self.window_part(x, &v); // (b, h, L, d_v), (b, h, L, 1)
        let (l_num, l_den) = match self.cfg.window_shape {
            WindowShape::Sw => self.delayed_linear_part(x, &v),
            WindowShape::Tk => self.terrace_linear_part(x),
        };
        let gamma = gammas(x.window_factors, h, p.acc, 4);
        let num = &gamma * w_num + l_num;
        let den = gamma * w_den + l_den;
        (num * den.reciprocal()).to_kind(x.v.kind())
    }

    /// `Σ exp(s − m)·v` and `Σ exp(s − m)` over each query's window (b, h, L, ·), `m` the
    /// window's largest score, from the local value blocks `v`. The weights are rounded once to
    /// the operand dtype; both sums read the same rounded weights.
    fn window_part(&self, x: &LolcatsInputs, v: &Tensor) -> (Tensor, Tensor) {
        let (s, p, blocks) = (&self.s, self.p, &self.blocks);
        let q = self.chunks(x.q); // (b, h, n, C, d)
        let k = blocks.local_from_chunks(&self.chunks(x.k));
        let k = self.with_sinks(k, &self.sink_k); // (b, h, n, K + N', d)
        let v = self.with_sinks(v.shallow_clone(), &self.sink_v);
        let (window_mask, _) = self.masks(x.v.device()); // (n, C, K + N')
        let mut scores = p.mm_operand(&q, &k.transpose(-1, -2));
        scores /= (s.head_dim as f64).sqrt();
        let _ = scores.masked_fill_(&window_mask.logical_not(), f64::NEG_INFINITY);
        let max = scores.amax([-1i64].as_slice(), true).to_kind(p.acc);
        let mut weights = &scores - max; // (b, h, n, C, K) in acc
        let weights = weights.exp_().to_kind(p.operand);
        (
            blocks.unchunk(&p.mm_operand(&weights, &v)),
            blocks.unchunk(&weights.sum_dim_intlist(-1, true, p.acc)),
        )
    }

    /// `sw`: the keys outside the window of query t are those at t − w and before, so the linear
    /// part is causal linear attention (diagonal included) over the keys and values delayed by
    /// w positions, chunk by chunk: C × C scores within a chunk, sums carried across chunks.
    /// When w is a whole number of chunks, the delayed value chunks are the first chunk of each
    /// local value block `v_blocks` (views, no copy).
    fn delayed_linear_part(&self, x: &LolcatsInputs, v_blocks: &Tensor) -> (Tensor, Tensor) {
        let (p, blocks, h) = (self.p, &self.blocks, self.s.heads);
        let (len, w, c) = (self.s.len, self.cfg.window_size, blocks.chunk);
        let delayed = |t: &Tensor| {
            let t = pad_seq(&t.to_kind(p.operand), w.min(len), 0).narrow(2, 0, len);
            repeat_heads(&blocks.query_chunks(&t), h)
        };
        let phi_k = delayed(x.phi_k); // (b, h, n, C, f)
        let v = if w % c == 0 && w / c == blocks.history {
            v_blocks.narrow(3, 0, c)
        } else {
            delayed(x.v)
        }; // (b, h, n, C, d_v)
        let phi_q = self.chunks(x.phi_q); // (b, h, n, C, f)
                                          // One transposed view for both products: their gradients meet in one layout.
        let phi_k_t = phi_k.transpose(-1, -2);
        let mut scores = p.mm_operand(&phi_q, &phi_k_t); // (b, h, n, C, C)
        let _ = scores.tril_(0);
        let kv_before = prefix_sums(&p.mm_operand(&phi_k_t, &v), 1);
        let k_before = prefix_sums(&phi_k.sum_dim_intlist(-2, false, p.acc), 1);
        let num = p.mm_operand(&scores, &v) + p.mm_state(&phi_q, &kv_before);
        let den =
            scores.sum_dim_intlist(-1, true, p.acc) + p.mm_state(&phi_q, &k_before.unsqueeze(-1));
        (blocks.unchunk(&num), blocks.unchunk(&den))
    }

    /// `tk`: the keys outside the window of a query in terrace block B (of w tokens) are the
    /// blocks before B − 1, the same for the whole block: one linear sum per block.
    fn terrace_linear_part(&self, x: &LolcatsInputs) -> (Tensor, Tensor) {
        let (p, h) = (self.p, self.s.heads);
        let (len, w) = (self.s.len, self.cfg.window_size);
        let n = ceil_div(len, w);
        let in_blocks = |t: &Tensor| {
            let size = t.size();
            pad_seq(&t.to_kind(p.operand), 0, n * w - len)
                .reshape([size[0], size[1], n, w, size[3]])
        };
        let phi_k = repeat_heads(&in_blocks(x.phi_k), h); // (b, h, n, w, f)
        let v = repeat_heads(&in_blocks(x.v), h); // (b, h, n, w, d_v)
        let phi_q = in_blocks(&prepare(x.phi_q, p.operand, h)); // (b, h, n, w, f)
        let kv_before = prefix_sums(&p.mm_operand(&phi_k.transpose(-1, -2), &v), 2);
        let k_before = prefix_sums(&phi_k.sum_dim_intlist(-2, false, p.acc), 2);
        let tokens = |t: Tensor| {
            let size = t.size();
            t.reshape([size[0], size[1], n * w, size[4]])
                .narrow(2, 0, len)
        };
        (
            tokens(p.mm_state(&phi_q, &kv_before)),
            tokens(p.mm_state(&phi_q, &k_before.unsqueeze(-1))),
        )
    }

    /// One normaliser over the window and linear scores of each chunk's local block of `keys`,
    /// plus the linear sums before the block.
    fn block_output(&self, x: &LolcatsInputs, keys: Keys) -> Tensor {
        let (s, p, blocks, h) = (&self.s, self.p, &self.blocks, self.s.heads);
        let q = self.chunks(x.q); // (b, h, n, C, d)
        let phi_q = self.chunks(x.phi_q); // (b, h, n, C, f)
        let (window_mask, linear_mask) = self.masks(x.v.device()); // (n, C, K + N')
                                                                   // The sink rows' features are never read (masked as linear keys).
        let sink_phi = {
            let s = self.sink_k.size();
            Tensor::zeros(
                [s[0], s[1], s[2], self.s.feature_dim],
                (keys.phi_k.kind(), keys.phi_k.device()),
            )
        };
        let keys = Keys {
            k: self.with_sinks(keys.k, &self.sink_k),
            phi_k: self.with_sinks(keys.phi_k, &sink_phi),
            v: self.with_sinks(keys.v, &self.sink_v),
            ..keys
        };

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
