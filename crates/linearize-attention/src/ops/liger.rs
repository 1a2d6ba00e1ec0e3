//! Liger attention (Lan et al., 2025): `0.5 · sliding-window softmax + 0.5 · GLA`, no new
//! parameters. The GLA half reuses the attention projections before RoPE: `q~ = softmax_d(q)`,
//! `k~ = softmax_d(k)`, log-gates `g = logsigmoid(k) / 16` (the raw key projection); the window
//! half (w = 64) uses q and k after RoPE.
//!
//! Sinks (`sinks = N`) join the window half only: keys `s < N` stay softmax keys of every query.
//! The GLA half sums over every token, the window's included, by Liger's design (the two halves
//! are separate mixtures, not one normaliser split between softmax and linear keys), so it keeps
//! the sink tokens as it keeps the window's: nothing is counted twice within either half.
//!
//! Inputs ([`LigerInputs`]): `q` (b, h, L, d) and `k` (b, h_k, L, d) before RoPE, `q_rope`,
//! `k_rope` of the same shapes after it, `v` (b, h_v, L, d_v). Output (b, h, L, d_v) in `v`'s
//! dtype. Each form combines the same form of [`super::swa`] and [`super::gla`].
use super::gla::{self, GlaConfig, GlaState};
use super::swa::{self, SwaConfig, SwaState};
use crate::error::Result;
use crate::tensors::compute_kind;
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Settings of the Liger kernels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LigerConfig {
    /// Sliding-window size of the softmax half.
    pub window_size: i64,
    /// Divides logsigmoid(k) to give the log-gates (Liger: 16).
    pub gate_normalizer: f64,
    /// Query tokens per chunk of the window half; tokens per chunk of the GLA half.
    pub chunk_size: i64,
    /// Sub-chunk of the GLA half (see [`GlaConfig`]).
    pub sub_chunk: i64,
    /// Sink tokens of the window half (see [`SwaConfig::sinks`]).
    pub sinks: i64,
    /// Whether whole sequences take the fused CUDA kernels for the GLA half where they apply
    /// (see [`GlaConfig::fused`] and [`chunked_output`]).
    pub fused: bool,
}

impl Default for LigerConfig {
    fn default() -> Self {
        Self {
            window_size: 64,
            gate_normalizer: 16.0,
            chunk_size: 64,
            sub_chunk: 16,
            sinks: 0,
            fused: true,
        }
    }
}

impl LigerConfig {
    /// The settings of the window half.
    pub fn swa_config(&self) -> SwaConfig {
        SwaConfig {
            window_size: self.window_size,
            chunk_size: self.chunk_size,
            sinks: self.sinks,
        }
    }

    fn gla(&self) -> GlaConfig {
        GlaConfig {
            chunk_size: self.chunk_size,
            sub_chunk: self.sub_chunk,
            fused: self.fused,
        }
    }
}

/// One call's tensors (see the module docs for shapes).
pub struct LigerInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub q_rope: &'a Tensor,
    pub k_rope: &'a Tensor,
    pub v: &'a Tensor,
}

/// The window cache of the softmax half and the GLA state.
#[derive(Debug)]
pub struct LigerState {
    pub window: SwaState,
    pub gla: GlaState,
}

impl LigerState {
    pub fn shallow_clone(&self) -> Self {
        self.map_tensors(&Tensor::shallow_clone)
    }

    /// The same state with `f` applied to each of its tensors (copies, repeats along the batch,
    /// moves).
    pub fn map_tensors(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        Self {
            window: self.window.map_tensors(f),
            gla: self.gla.map_tensors(f),
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut all = self.window.tensors();
        all.extend(self.gla.tensors());
        all
    }
}

/// The GLA half's inputs: `(softmax_d(q), softmax_d(k), logsigmoid(k) / normalizer)` in the
/// compute dtype.
pub fn gla_inputs(
    q: &Tensor,
    k: &Tensor,
    gate_normalizer: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let kind = compute_kind("q", q)?;
    let (q, k) = (q.to_kind(kind), k.to_kind(kind));
    Ok((
        q.softmax(-1, kind),
        k.softmax(-1, kind),
        k.log_sigmoid() / gate_normalizer,
    ))
}

/// The two halves' average, taken in the compute dtype and returned in `v`'s.
fn mix(window: Tensor, gla: Tensor, v: &Tensor) -> Result<Tensor> {
    let kind = compute_kind("v", v)?;
    Ok(((window.to_kind(kind) + gla.to_kind(kind)) * 0.5).to_kind(v.kind()))
}

fn upcast(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_kind(compute_kind("v", x)?))
}

pub fn naive(x: &LigerInputs, cfg: &LigerConfig) -> Result<Tensor> {
    let v = upcast(x.v)?;
    let (q, k, g) = gla_inputs(x.q, x.k, cfg.gate_normalizer)?;
    let window = swa::naive(x.q_rope, x.k_rope, &v, &cfg.swa_config())?;
    mix(window, gla::naive(&q, &k, &v, &g)?, x.v)
}

/// Runs the sequence on from `state` (empty when `None`); returns the output and the final state.
/// `v` goes in its own dtype, so that f16 / bf16 inputs get both halves' low-precision matmuls.
pub fn chunked(
    x: &LigerInputs,
    cfg: &LigerConfig,
    state: Option<&LigerState>,
) -> Result<(Tensor, LigerState)> {
    let (q, k, g) = gla_inputs(x.q, x.k, cfg.gate_normalizer)?;
    let (window, window_state) = swa::chunked(
        x.q_rope,
        x.k_rope,
        x.v,
        &cfg.swa_config(),
        state.map(|s| &s.window),
    )?;
    let (linear, gla_state) = gla::chunked(&q, &k, x.v, &g, &cfg.gla(), state.map(|s| &s.gla))?;
    Ok((
        mix(window, linear, x.v)?,
        LigerState {
            window: window_state,
            gla: gla_state,
        },
    ))
}

/// [`chunked`]'s output from the empty state, without the final state (training, scoring); the
/// GLA half takes the fused CUDA kernels where they apply ([`gla::chunked_output`]).
pub fn chunked_output(x: &LigerInputs, cfg: &LigerConfig) -> Result<Tensor> {
    let (q, k, g) = gla_inputs(x.q, x.k, cfg.gate_normalizer)?;
    let (window, _) = swa::chunked(x.q_rope, x.k_rope, x.v, &cfg.swa_config(), None)?;
    let linear = gla::chunked_output(&q, &k, x.v, &g, &cfg.gla())?;
    mix(window, linear, x.v)
}

/// Adds one token (len 1) to `state` in place and returns its output (b, h, 1, d_v); `position`
/// as in [`swa::step`] (CUDA graphs).
pub fn step(
    state: &mut LigerState,
    x: &LigerInputs,
    cfg: &LigerConfig,
    position: Option<&Tensor>,
) -> Result<Tensor> {
    let v = upcast(x.v)?;
    let (q, k, g) = gla_inputs(x.q, x.k, cfg.gate_normalizer)?;
    // Both halves advance or neither does: both are checked before either moves.
    let swa_cfg = cfg.swa_config();
    swa::check_step(&state.window, x.q_rope, x.k_rope, &v, &swa_cfg)?;
    gla::check_step(&state.gla, &q, &k, &v, &g)?;
    let window = swa::step(
        &mut state.window,
        x.q_rope,
        x.k_rope,
        &v,
        &swa_cfg,
        position,
    )?;
    let linear = gla::step(&mut state.gla, &q, &k, &v, &g)?;
    mix(window, linear, x.v)
}

/// Runs a whole sequence token by token, from `state` (empty when `None`).
pub fn recurrent(
    x: &LigerInputs,
    cfg: &LigerConfig,
    state: Option<LigerState>,
) -> Result<(Tensor, LigerState)> {
    let v = upcast(x.v)?;
    let (q, k, g) = gla_inputs(x.q, x.k, cfg.gate_normalizer)?;
    let (window_state, gla_state) = match state {
        Some(s) => (Some(s.window), Some(s.gla)),
        None => (None, None),
    };
    let (window, window_state) =
        swa::recurrent(x.q_rope, x.k_rope, &v, &cfg.swa_config(), window_state)?;
    let (linear, gla_state) = gla::recurrent(&q, &k, &v, &g, gla_state)?;
    Ok((
        mix(window, linear, x.v)?,
        LigerState {
            window: window_state,
            gla: gla_state,
        },
    ))
}
