//! Gated DeltaNet behind a softmax window: exact softmax over the last `w` tokens and the sinks,
//! plus a gated delta-rule memory of the tokens that have left the window (issue #22). For
//! query t, with W(t) = {t−w < s <= t} ∪ {s < sinks} (LoLCATs' `sw` window and its sinks):
//!
//! ```text
//! o_t = Σ_{s in W(t)} softmax_s(q_t·k_s/√d) v_s  +  λ_h · e^{G_t − G_{t−w}} q̂_t S_{t−w}
//! S_s = α_s (I − β_s k̂_sᵀ k̂_s) S_{s−1} + β_s k̂_sᵀ v_s,   α_s = e^{g_s},  G_t = Σ_{r<=t} g_r
//! ```
//!
//! The first term is [`super::swa`] (its own normaliser, over the window and the sinks only); the
//! second reads the [`super::gated_deltanet`] state after token t−w, which holds exactly the
//! tokens no longer in t's window (none for t < w), aged by the gates of the w tokens since, as
//! it would be had every token been written at its own position and read now. Sinks never enter
//! the memory: their β is zeroed (they are the first tokens, so the memory is empty while they
//! pass and their decays act on nothing). `λ_h` is a learned scale per head (see
//! [`DELTA_SCALE_INIT`]). Only the sliding window: with LoLCATs' terrace (`tk`) the keys that
//! leave the window leave a block at a time, which the one shifted state read below does not
//! express.
//!
//! The chunked form is Gated DeltaNet's own chunked kernel on shifted queries:
//! `e^{G_{s+w} − G_s} q̂_{s+w} S_s` is the standard output at position s for the query sequence
//! `q'_s = e^{G_{s+w} − G_s} q̂_{s+w}`, so the delta term is that output shifted right by w.
//!
//! Inputs ([`GdnWindowInputs`]): the softmax's `q` (b, h, L, d), `k` (b, h_k, L, d) (after RoPE)
//! and `v` (b, h_v, L, d_v); the memory's unit `delta_q` (b, h, L, d_k) and `delta_k`
//! (b, h_k', L, d_k), log-decays `g` (b, h_g, L), all `<= 0`, and `beta` (b, h_β, L) in [0, 1];
//! `delta_scale` (h). Head counts divide h (GQA). Output (b, h, L, d_v) in `v`'s dtype.
mod chunked;
mod naive;
mod recurrent;

pub use chunked::chunked;
pub use naive::naive;
pub use recurrent::{recurrent, step};

use super::gated_deltanet::{self, GatedDeltaNetConfig, GatedDeltaNetState};
use super::gla;
use super::swa::{self, SwaConfig, SwaState};
use super::window::{cache_in_order, to_ring, validate_sinks, Window};
use crate::error::{at_least_one, Error, Result};
use crate::tensors::{compute_kind, shape};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The untrained per-head scale λ of the delta term. Not zero: with λ = 0 the gradients of every
/// other delta parameter (gates, and whatever produces q̂ and k̂) would be zero until λ moves,
/// and a stage-1 step from there is a guess. Small, so that the untrained layer stays close to
/// the window-and-sinks softmax it starts from (the untrained memory holds an unweighted
/// superposition of old values, which at full scale would add about one value's norm to every
/// output), while Adam's steps, whose size does not depend on the gradient's, move the gates at
/// full rate from the first step.
pub const DELTA_SCALE_INIT: f64 = 0.1;

/// Settings of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GdnWindowConfig {
    /// w: the query and the w−1 tokens before it are softmax keys.
    pub window_size: i64,
    /// Tokens per chunk of both chunked kernels (the window's query chunks, the delta rule's).
    pub chunk_size: i64,
    /// The first `sinks` tokens are softmax keys of every query and never enter the memory.
    pub sinks: i64,
}

impl Default for GdnWindowConfig {
    fn default() -> Self {
        Self {
            window_size: 64,
            chunk_size: 64,
            sinks: 0,
        }
    }
}

impl GdnWindowConfig {
    pub fn window(&self) -> Window {
        Window::sliding(self.window_size)
    }

    /// The settings of the softmax term.
    pub fn swa(&self) -> SwaConfig {
        SwaConfig {
            window_size: self.window_size,
            chunk_size: self.chunk_size,
            sinks: self.sinks,
        }
    }

    /// The settings of the delta term.
    pub fn gdn(&self) -> GatedDeltaNetConfig {
        GatedDeltaNetConfig {
            chunk_size: self.chunk_size,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.window().validate()?;
        validate_sinks(self.sinks)?;
        at_least_one("chunk_size", self.chunk_size)?;
        Ok(())
    }
}

/// One call's tensors (see the module docs for shapes).
pub struct GdnWindowInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub delta_q: &'a Tensor,
    pub delta_k: &'a Tensor,
    pub g: &'a Tensor,
    pub beta: &'a Tensor,
    pub delta_scale: &'a Tensor,
}

/// Checked sizes of one call: the softmax term's and the delta term's.
pub(crate) struct Shapes {
    pub window: swa::Shapes,
    pub delta: gla::Shapes,
}

impl Shapes {
    fn heads(&self) -> i64 {
        self.window.heads
    }
}

pub(crate) fn check_inputs(x: &GdnWindowInputs) -> Result<Shapes> {
    let window = swa::check_inputs(x.q, x.k, x.v)?;
    let delta = gated_deltanet::check_inputs(x.delta_q, x.delta_k, x.v, x.g, x.beta)?;
    if (delta.batch, delta.heads, delta.len) != (window.batch, window.heads, window.len) {
        let expected = format!(
            "(batch {}, heads {}, len {}, d_k), as q",
            window.batch, window.heads, window.len
        );
        return Err(shape("delta_q", &expected, x.delta_q));
    }
    if x.delta_scale.size() != [window.heads] {
        return Err(shape(
            "delta_scale",
            &format!("[{}] (one per query head)", window.heads),
            x.delta_scale,
        ));
    }
    compute_kind("delta_scale", x.delta_scale)?;
    Ok(Shapes { window, delta })
}

/// `beta` (b, h_β, n) of the tokens from position `pos` with the sink positions' (`< sinks`)
/// zeroed: a sink writes nothing into the memory.
pub(crate) fn without_sink_writes(beta: &Tensor, pos: i64, sinks: i64) -> Tensor {
    let len = beta.size()[2];
    let n = (sinks - pos).clamp(0, len);
    if n == 0 {
        return beta.shallow_clone();
    }
    Tensor::cat(
        &[
            beta.narrow(2, 0, n).zeros_like(),
            beta.narrow(2, n, len - n),
        ],
        2,
    )
}

/// What a layer remembers: the window's cache of the last `m <= w−1` tokens' keys and values and
/// the sinks' ([`SwaState`], which also counts the tokens seen); the same tokens' memory keys
/// `delta_k` (b, h_k', m, d_k), log-decays `g` (b, h_g, m) and write strengths `beta`
/// (b, h_β, m) (zero for sinks), in the same slots (a ring once full, see
/// [`super::window::to_ring`]); and the delta-rule state `delta` after the last token that left
/// the window. Produced by [`chunked`], carried on by [`step`] / [`recurrent`].
#[derive(Debug)]
pub struct GdnWindowState {
    pub window: SwaState,
    pub delta_k: Tensor,
    pub g: Tensor,
    pub beta: Tensor,
    pub delta: GatedDeltaNetState,
}

impl GdnWindowState {
    /// Tokens in the window cache.
    pub fn cached(&self) -> i64 {
        self.window.cached()
    }

    /// Tokens seen.
    pub fn pos(&self) -> i64 {
        self.window.pos
    }

    pub fn shallow_clone(&self) -> Self {
        self.map_tensors(&Tensor::shallow_clone)
    }

    /// The same state with `f` applied to each of its tensors (copies, repeats along the batch,
    /// moves).
    pub fn map_tensors(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        Self {
            window: self.window.map_tensors(f),
            delta_k: f(&self.delta_k),
            g: f(&self.g),
            beta: f(&self.beta),
            delta: self.delta.map_tensors(f),
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut all = self.window.tensors();
        all.extend([&self.delta_k, &self.g, &self.beta]);
        all.extend(self.delta.tensors());
        all
    }

    /// The memory's cached keys, log-decays and write strengths of `state` in order, oldest
    /// first, and its delta-rule state, all in `opts`' dtype, checked against the call; empty
    /// ones without a state. (The window's own cache is [`swa::chunked`]'s to order.)
    pub(crate) fn ordered_memory(
        state: Option<&Self>,
        s: &Shapes,
        x: &GdnWindowInputs,
        cfg: &GdnWindowConfig,
        opts: (Kind, Device),
    ) -> Result<[Tensor; 4]> {
        let Some(state) = state else {
            let empty = |t: &Tensor| {
                let mut size = t.size();
                size[2] = 0;
                Tensor::zeros(&size, opts)
            };
            return Ok([
                empty(x.delta_k),
                empty(x.g),
                empty(x.beta),
                GatedDeltaNetState::initial(None, &s.delta, opts)?.s,
            ]);
        };
        state.check(s, x, cfg)?;
        let ordered = |t: &Tensor| cache_in_order(t, opts.0, cfg.window().reach(), state.pos());
        Ok([
            ordered(&state.delta_k),
            ordered(&state.g),
            ordered(&state.beta),
            state.delta.s.to_kind(opts.0),
        ])
    }

    /// Checks the state against a call's sizes and its window.
    pub(crate) fn check(
        &self,
        s: &Shapes,
        x: &GdnWindowInputs,
        cfg: &GdnWindowConfig,
    ) -> Result<()> {
        self.window.check(&s.window, &cfg.swa())?;
        let m = self.cached();
        // The delta state holds every token before the cache: a cache short of the window's
        // reach (a state made for a smaller window) would leave tokens in neither.
        let full = self.pos().min(cfg.window().reach());
        if m != full {
            return Err(Error::Value {
                tensor: "state.window.k",
                message: format!(
                    "window cache of {m} tokens at position {}; a window of {} holds {full}",
                    self.pos(),
                    cfg.window_size
                ),
            });
        }
        for (name, t, like) in [
            ("state.delta_k", &self.delta_k, x.delta_k),
            ("state.g", &self.g, x.g),
            ("state.beta", &self.beta, x.beta),
        ] {
            let mut want = like.size();
            want[2] = m;
            if t.size() != want {
                return Err(shape(
                    name,
                    &format!("{want:?} (one entry per cached token, {m})"),
                    t,
                ));
            }
        }
        self.delta.check(&s.delta)
    }

    /// Moves the state to the compute dtype where it is not there yet (a copy on the first step
    /// after a prefill in another dtype, none after).
    pub(crate) fn ready(&mut self, kind: Kind) {
        self.window.ready(kind);
        for t in [
            &mut self.delta_k,
            &mut self.g,
            &mut self.beta,
            &mut self.delta.s,
        ] {
            if t.kind() != kind {
                *t = t.to_kind(kind);
            }
        }
    }
}

/// The last `min(reach, m + n)` tokens of the ordered cache `cached` (b, ·, m, ..) followed by
/// `new` (b, ·, n, ..), laid out as a ring once there are `reach` of them, the last at position
/// `pos − 1`: the window cache's own layout ([`SwaState`]).
pub(crate) fn keep_last(cached: &Tensor, new: &Tensor, reach: i64, pos: i64) -> Tensor {
    let joined = Tensor::cat(&[cached, &new.to_kind(cached.kind())], 2);
    let total = joined.size()[2];
    let keep = total.min(reach);
    let last = joined.narrow(2, total - keep, keep);
    match keep == reach {
        true => to_ring(&last, pos),
        false => last,
    }
}
