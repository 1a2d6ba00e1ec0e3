//! LoLCATs attention (Zhang et al., 2024): softmax over a local window W(t) plus linear attention
//! over the keys before it, with one shared normaliser and a per-head window factor
//! `γ_h = sigmoid(w_h)`:
//!
//! ```text
//! a_ts = γ_h · exp(q_t·k_s/√d − m_t)   s in W(t), m_t = max_{s in W(t)} q_t·k_s/√d
//! a_ts = φq_t·φk_s                      s < t, s not in W(t)
//! y_t  = Σ_s a_ts v_s / Σ_s a_ts
//! ```
//!
//! As in LoLCATs' `hybrid_attention_quadratic`, the linear terms are not scaled by `exp(−m_t)`, so
//! the max is part of the function (and of its gradient), not only a stabiliser.
//!
//! Sinks (`sinks = N`, StreamingLLM): the keys `s < N` join W(t) for every query `t >= s`, so they
//! are softmax terms under the same max `m_t` (taken over the window and the sinks) and the same
//! factor γ_h, and never linear terms. Sharing γ keeps one learned balance between exact and
//! linear attention per head, with no new parameter; sharing the max keeps `a_ts` for a window
//! key independent of whether a sink happens to score higher, up to that common scale (a sink
//! that dominates, as sinks do in trained models, lowers `exp(s − m_t)` for every softmax key
//! alike, as it would in the teacher's softmax). The linear sums skip the sinks: their key
//! features are zeroed before any sum (the fused kernels mask them as they load them), so the
//! chunked, recurrent and fused paths agree.
//!
//! Inputs ([`LolcatsInputs`]): `q` (b, h, L, d) and `k` (b, h_k, L, d) after RoPE, `v`
//! (b, h_v, L, d_v), `phi_q` (b, h, L, f), `phi_k` (b, h_f, L, f), and the window-factor logits
//! `w` (h elements); `h_k`, `h_v`, `h_f` divide `h`. Output (b, h, L, d_v) in `v`'s dtype.
mod chunked;
mod naive;
mod recurrent;

pub use chunked::{chunked, chunked_output};
pub use naive::naive;
pub use recurrent::{recurrent, step};

use super::linear_attn::{self, LinearState};
use super::window::{
    cache_in_order, to_ring, validate_sinks, RingSlot, SinkCache, Window, WindowShape,
};
use crate::error::{at_least_one, Result};
use crate::tensors::{compute_kind, repeat_heads, shape, Dims, Precision};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

/// LoLCATs' initial window-factor logit: sigmoid(-2.1972) = 0.1.
pub const WINDOW_FACTOR_INIT: f64 = -2.1972;

/// Settings of the LoLCATs kernels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LolcatsConfig {
    /// `sw` (last w tokens) or `tk` (terrace).
    pub window_shape: WindowShape,
    /// w, tokens per window (or terrace block).
    pub window_size: i64,
    /// Query tokens per chunk in the chunked form.
    pub chunk_size: i64,
    /// Whether whole sequences take the fused CUDA kernels where they apply ([`chunked_output`]).
    pub fused: bool,
    /// The first `sinks` tokens are softmax keys of every query (0: none), in every form, the
    /// fused kernels included.
    pub sinks: i64,
}

impl Default for LolcatsConfig {
    fn default() -> Self {
        Self {
            window_shape: WindowShape::Sw,
            window_size: 64,
            chunk_size: 64,
            fused: true,
            sinks: 0,
        }
    }
}

impl LolcatsConfig {
    pub fn window(&self) -> Window {
        Window {
            shape: self.window_shape,
            size: self.window_size,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.window().validate()?;
        validate_sinks(self.sinks)?;
        at_least_one("chunk_size", self.chunk_size)?;
        Ok(())
    }
}

/// The trainable per-head window factors `w_h` (γ_h = sigmoid(w_h)), a variable named
/// `window_factors` of shape (h) under the given path.
#[derive(Debug)]
pub struct WindowFactors {
    pub logits: Tensor,
}

impl WindowFactors {
    pub fn new(path: &nn::Path, num_heads: i64) -> Self {
        let logits = path.var(
            "window_factors",
            &[num_heads],
            nn::Init::Const(WINDOW_FACTOR_INIT),
        );
        Self { logits }
    }
}

/// One call's tensors (see the module docs for shapes).
pub struct LolcatsInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub phi_q: &'a Tensor,
    pub phi_k: &'a Tensor,
    pub window_factors: &'a Tensor,
}

/// What a LoLCATs layer remembers: the last `m <= reach` tokens' keys, key features (zero for
/// sink tokens) and values (window cache, at their own head counts; once `m = reach`, a ring:
/// see [`super::window::to_ring`]), linear sums over every token
/// before them but the sinks, the sink tokens' keys and values, and the number of tokens seen.
/// Produced by [`chunked`] and carried on by [`step`] / [`recurrent`].
#[derive(Debug)]
pub struct LolcatsState {
    pub k: Tensor,
    pub phi_k: Tensor,
    pub v: Tensor,
    pub linear: LinearState,
    pub sinks: SinkCache,
    pub pos: i64,
}

impl LolcatsState {
    /// Tokens in the window cache.
    pub fn cached(&self) -> i64 {
        self.k.size()[2]
    }

    pub fn shallow_clone(&self) -> Self {
        self.map_tensors(&Tensor::shallow_clone)
    }

    /// The same state with `f` applied to each of its tensors (copies, repeats along the batch,
    /// moves).
    pub fn map_tensors(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        Self {
            k: f(&self.k),
            phi_k: f(&self.phi_k),
            v: f(&self.v),
            linear: self.linear.map_tensors(f),
            sinks: self.sinks.map_tensors(f),
            pos: self.pos,
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut all = vec![&self.k, &self.phi_k, &self.v];
        all.extend(self.linear.tensors());
        all.extend([&self.sinks.k, &self.sinks.v]);
        all
    }

    /// `state` checked against the call, converted to its compute dtype and its cache in order,
    /// or the empty state.
    pub(crate) fn initial(
        state: Option<&Self>,
        s: &Shapes,
        cfg: &LolcatsConfig,
        opts: (Kind, Device),
    ) -> Result<Self> {
        let lin = s.linear();
        let k_shape = [s.batch, s.k_heads, s.head_dim];
        let v_shape = [s.batch, s.v_heads, s.value_dim];
        let Some(state) = state else {
            let empty = |heads, dim| Tensor::zeros([s.batch, heads, 0, dim], opts);
            return Ok(Self {
                k: empty(s.k_heads, s.head_dim),
                phi_k: empty(s.phi_k_heads, s.feature_dim),
                v: empty(s.v_heads, s.value_dim),
                linear: LinearState::initial(None, &lin, opts)?,
                sinks: SinkCache::empty(k_shape, v_shape, opts),
                pos: 0,
            });
        };
        state.check(s, cfg)?;
        let ordered = |t: &Tensor| cache_in_order(t, opts.0, cfg.window().reach(), state.pos);
        Ok(Self {
            k: ordered(&state.k),
            phi_k: ordered(&state.phi_k),
            v: ordered(&state.v),
            linear: state.linear.for_call(&lin, opts.0)?,
            sinks: state
                .sinks
                .checked(k_shape, v_shape, state.pos, cfg.sinks, opts.0)?,
            pos: state.pos,
        })
    }

    /// Checks the state against a call's sizes and its window.
    pub(crate) fn check(&self, s: &Shapes, cfg: &LolcatsConfig) -> Result<()> {
        let m = self.cached();
        for (name, t, heads, dim) in [
            ("state.k", &self.k, s.k_heads, s.head_dim),
            ("state.phi_k", &self.phi_k, s.phi_k_heads, s.feature_dim),
            ("state.v", &self.v, s.v_heads, s.value_dim),
        ] {
            if t.size() != [s.batch, heads, m, dim] {
                return Err(shape(name, &format!("{:?}", [s.batch, heads, m, dim]), t));
            }
        }
        cfg.window().check_cache(m, self.pos)?;
        self.linear.check(&s.linear())?;
        let k_shape = [s.batch, s.k_heads, s.head_dim];
        let v_shape = [s.batch, s.v_heads, s.value_dim];
        self.sinks.check(k_shape, v_shape, self.pos, cfg.sinks)
    }

    /// Moves the state to the compute dtype where it is not there yet (a copy on the first step
    /// after a prefill in another dtype, none after).
    pub(crate) fn ready(&mut self, kind: Kind) {
        let Self {
            k,
            phi_k,
            v,
            linear,
            sinks,
            ..
        } = self;
        for t in [
            k,
            phi_k,
            v,
            &mut linear.kv,
            &mut linear.k_sum,
            &mut sinks.k,
            &mut sinks.v,
        ] {
            if t.kind() != kind {
                *t = t.to_kind(kind);
            }
        }
    }

    /// The state after appending `k`, `phi_k`, `v` (b, ·, n, ·) to its ordered cache: the last
    /// `reach` tokens stay (a ring once full), the ones before join the linear sums (products on
    /// `p.operand` operands), the ones before position `sinks` join the sink cache. `phi_k` must
    /// have its sink rows zeroed (`window::without_sinks`).
    pub(crate) fn advance(
        &self,
        k: &Tensor,
        phi_k: &Tensor,
        v: &Tensor,
        heads: i64,
        cfg: &LolcatsConfig,
        p: Precision,
    ) -> Self {
        let reach = cfg.window().reach();
        let added = k.size()[2];
        let pos = self.pos + added;
        let sinks = self.sinks.advance(k, v, self.pos, cfg.sinks);
        let (k, phi_k, v) = (
            Tensor::cat(&[&self.k, k], 2),
            Tensor::cat(&[&self.phi_k, phi_k], 2),
            Tensor::cat(&[&self.v, v], 2),
        );
        let total = k.size()[2];
        let keep = total.min(reach);
        let leaving = total - keep;
        let linear = self.linear.absorb(
            &repeat_heads(&phi_k.narrow(2, 0, leaving), heads),
            &repeat_heads(&v.narrow(2, 0, leaving), heads),
            p,
        );
        let last = |t: &Tensor| {
            let t = t.narrow(2, leaving, keep);
            match keep == reach {
                true => to_ring(&t, pos),
                false => t,
            }
        };
        Self {
            k: last(&k),
            phi_k: last(&phi_k),
            v: last(&v),
            linear,
            sinks,
            pos,
        }
    }

    /// Appends one token `k`, `phi_k`, `v` (b, ·, 1, ·), not a sink, to a full cache in place:
    /// the token in its slot ([`RingSlot`], `position` as there), leaving the window, joins the
    /// linear sums (heads repeated to `heads`), and the new one takes its slot. A decoding
    /// step's update: nothing of the state's size is allocated.
    pub(crate) fn push(
        &mut self,
        k: &Tensor,
        phi_k: &Tensor,
        v: &Tensor,
        heads: i64,
        position: Option<&Tensor>,
    ) {
        let reach = self.cached();
        if reach == 0 {
            // No cache (a one-token window): the token leaves the window as it comes.
            self.linear
                .absorb_token(&repeat_heads(phi_k, heads), &repeat_heads(v, heads));
        } else {
            let slot = RingSlot::of(reach, self.pos, position);
            self.linear.absorb_token(
                &repeat_heads(&slot.read(&self.phi_k), heads),
                &repeat_heads(&slot.read(&self.v), heads),
            );
            slot.write(&mut self.k, k);
            slot.write(&mut self.phi_k, phi_k);
            slot.write(&mut self.v, v);
        }
        self.pos += 1;
    }
}

/// Checked sizes of one call.
pub(crate) struct Shapes {
    pub batch: i64,
    pub heads: i64,
    pub len: i64,
    pub head_dim: i64,
    pub value_dim: i64,
    pub feature_dim: i64,
    pub k_heads: i64,
    pub phi_k_heads: i64,
    pub v_heads: i64,
}

impl Shapes {
    pub(crate) fn linear(&self) -> linear_attn::Shapes {
        linear_attn::Shapes {
            batch: self.batch,
            heads: self.heads,
            len: self.len,
            feature_dim: self.feature_dim,
            head_dim: self.value_dim,
        }
    }
}

pub(crate) fn check_inputs(x: &LolcatsInputs) -> Result<Shapes> {
    let q = Dims::of("q", x.q)?;
    let k = q.check_companion("k", x.k)?;
    k.check_dim("k", x.k, q.dim)?;
    let v = q.check_companion("v", x.v)?;
    let phi_q = q.check_companion("phi_q", x.phi_q)?;
    if phi_q.heads != q.heads {
        return Err(shape("phi_q", &format!("{} heads, as q", q.heads), x.phi_q));
    }
    let phi_k = q.check_companion("phi_k", x.phi_k)?;
    phi_k.check_dim("phi_k", x.phi_k, phi_q.dim)?;
    if x.window_factors.numel() != q.heads as usize {
        return Err(shape(
            "window_factors",
            &format!("{} elements (one per head)", q.heads),
            x.window_factors,
        ));
    }
    compute_kind("q", x.q)?;
    Ok(Shapes {
        batch: q.batch,
        heads: q.heads,
        len: q.len,
        head_dim: q.dim,
        value_dim: v.dim,
        feature_dim: phi_q.dim,
        k_heads: k.heads,
        phi_k_heads: phi_k.heads,
        v_heads: v.heads,
    })
}

/// γ_h = sigmoid(w_h), shaped to broadcast over (b, h, ...) tensors of `rank` dims.
pub(crate) fn gammas(window_factors: &Tensor, heads: i64, kind: Kind, rank: usize) -> Tensor {
    let mut shape = vec![1i64; rank];
    shape[1] = heads;
    window_factors.to_kind(kind).sigmoid().reshape(shape)
}
