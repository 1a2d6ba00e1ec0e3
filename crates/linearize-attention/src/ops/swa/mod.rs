//! Sliding-window softmax attention (Liger's local half), optionally with sink tokens
//! (StreamingLLM): `y_t = Σ_{s in S(t)} softmax_s(q_t·k_s/√d) v_s`, `S(t)` the window
//! `t-w < s <= t` joined with the first `sinks` positions `s < min(sinks, t+1)`.
//!
//! Inputs: `q` (b, h, L, d), `k` (b, h_k, L, d) (both after RoPE), `v` (b, h_v, L, d_v), `h_k` and
//! `h_v` dividing `h`. Output (b, h, L, d_v) in `v`'s dtype, computed in f32 (f64 for f64).
mod chunked;
mod naive;
mod recurrent;

pub use chunked::chunked;
pub use naive::naive;
pub(crate) use recurrent::check_step;
pub use recurrent::{recurrent, step};

use super::window::{cache_in_order, to_ring, validate_sinks, RingSlot, SinkCache, Window};
use crate::error::{at_least_one, Result};
use crate::tensors::{compute_kind, shape, Dims};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Settings of the sliding-window kernels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwaConfig {
    /// w: the query and the w-1 tokens before it.
    pub window_size: i64,
    /// Query tokens per chunk in the chunked form.
    pub chunk_size: i64,
    /// The first `sinks` tokens stay visible to every query (0: none).
    pub sinks: i64,
}

impl Default for SwaConfig {
    fn default() -> Self {
        Self {
            window_size: 64,
            chunk_size: 64,
            sinks: 0,
        }
    }
}

impl SwaConfig {
    pub fn window(&self) -> Window {
        Window::sliding(self.window_size)
    }

    pub fn validate(&self) -> Result<()> {
        self.window().validate()?;
        validate_sinks(self.sinks)?;
        at_least_one("chunk_size", self.chunk_size)?;
        Ok(())
    }
}

/// The last `m <= w-1` tokens' keys and values (at their own head counts; once `m = w-1`, a ring:
/// see [`super::window::to_ring`]), the sink tokens' and the number of tokens seen. Produced by [`chunked`] and carried on by [`step`] / [`recurrent`].
#[derive(Debug)]
pub struct SwaState {
    pub k: Tensor,
    pub v: Tensor,
    pub sinks: SinkCache,
    pub pos: i64,
}

impl SwaState {
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
            v: f(&self.v),
            sinks: self.sinks.map_tensors(f),
            pos: self.pos,
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        vec![&self.k, &self.v, &self.sinks.k, &self.sinks.v]
    }

    /// `state` checked against the call, converted to its compute dtype and its cache in order,
    /// or the empty state.
    pub(crate) fn initial(
        state: Option<&Self>,
        s: &Shapes,
        cfg: &SwaConfig,
        opts: (Kind, Device),
    ) -> Result<Self> {
        let k_shape = [s.batch, s.k_heads, s.head_dim];
        let v_shape = [s.batch, s.v_heads, s.value_dim];
        let Some(state) = state else {
            return Ok(Self {
                k: Tensor::zeros([s.batch, s.k_heads, 0, s.head_dim], opts),
                v: Tensor::zeros([s.batch, s.v_heads, 0, s.value_dim], opts),
                sinks: SinkCache::empty(k_shape, v_shape, opts),
                pos: 0,
            });
        };
        state.check(s, cfg)?;
        let ordered = |t: &Tensor| cache_in_order(t, opts.0, cfg.window().reach(), state.pos);
        Ok(Self {
            k: ordered(&state.k),
            v: ordered(&state.v),
            sinks: state
                .sinks
                .checked(k_shape, v_shape, state.pos, cfg.sinks, opts.0)?,
            pos: state.pos,
        })
    }

    /// Checks the state against a call's sizes and its window.
    pub(crate) fn check(&self, s: &Shapes, cfg: &SwaConfig) -> Result<()> {
        let window = cfg.window();
        let m = self.cached();
        for (name, t, heads, dim) in [
            ("state.k", &self.k, s.k_heads, s.head_dim),
            ("state.v", &self.v, s.v_heads, s.value_dim),
        ] {
            if t.size() != [s.batch, heads, m, dim] {
                return Err(shape(name, &format!("{:?}", [s.batch, heads, m, dim]), t));
            }
        }
        window.check_cache(m, self.pos)?;
        let k_shape = [s.batch, s.k_heads, s.head_dim];
        let v_shape = [s.batch, s.v_heads, s.value_dim];
        self.sinks.check(k_shape, v_shape, self.pos, cfg.sinks)
    }

    /// The state after appending `k`, `v` (b, ·, n, ·) to its ordered cache: only the last
    /// `reach` tokens stay in the window cache (a ring once full); those before position `sinks`
    /// join the sink cache.
    pub(crate) fn advance(&self, k: &Tensor, v: &Tensor, cfg: &SwaConfig) -> Self {
        let reach = cfg.window().reach();
        let added = k.size()[2];
        let pos = self.pos + added;
        let sinks = self.sinks.advance(k, v, self.pos, cfg.sinks);
        let (k, v) = (Tensor::cat(&[&self.k, k], 2), Tensor::cat(&[&self.v, v], 2));
        let total = k.size()[2];
        let keep = total.min(reach);
        let last = |t: &Tensor| {
            let t = t.narrow(2, total - keep, keep);
            match keep == reach {
                true => to_ring(&t, pos),
                false => t,
            }
        };
        Self {
            k: last(&k),
            v: last(&v),
            sinks,
            pos,
        }
    }

    /// Moves the state to the compute dtype where it is not there yet (a copy on the first step
    /// after a prefill in another dtype, none after).
    pub(crate) fn ready(&mut self, kind: Kind) {
        for t in [
            &mut self.k,
            &mut self.v,
            &mut self.sinks.k,
            &mut self.sinks.v,
        ] {
            if t.kind() != kind {
                *t = t.to_kind(kind);
            }
        }
    }

    /// Appends one token `k`, `v` (b, ·, 1, ·) to a full cache in place, over the token leaving
    /// the window (see [`RingSlot`] for `position`); the sink cache must be complete. A decoding
    /// step's update.
    pub(crate) fn push(&mut self, k: &Tensor, v: &Tensor, position: Option<&Tensor>) {
        let reach = self.cached();
        if reach > 0 {
            let slot = RingSlot::of(reach, self.pos, position);
            slot.write(&mut self.k, k);
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
    pub k_heads: i64,
    pub v_heads: i64,
}

pub(crate) fn check_inputs(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Shapes> {
    let qd = Dims::of("q", q)?;
    let kd = qd.check_companion("k", k)?;
    kd.check_dim("k", k, qd.dim)?;
    let vd = qd.check_companion("v", v)?;
    compute_kind("q", q)?;
    Ok(Shapes {
        batch: qd.batch,
        heads: qd.heads,
        len: qd.len,
        head_dim: qd.dim,
        value_dim: vd.dim,
        k_heads: kd.heads,
        v_heads: vd.heads,
    })
}
