//! Lizard-style gated attention (Van Nguyen et al., 2025): LoLCATs' softmax window (and sinks)
//! with one shared normaliser, whose linear terms decay by a learned, data-dependent scalar gate
//! per head and token. For query t, with W(t) the window (`sw` or `tk`, as LoLCATs) plus the
//! first `sinks` tokens:
//!
//! ```text
//! a_ts = γ_h · exp(q_t·k_s/√d − m_t)                  s in W(t), m_t = max_{s in W(t)} q_t·k_s/√d
//! a_ts = φq_t·φk_s · Π_{r=s+1..t} α_r                  s < t, s not in W(t)
//! y_t  = Σ_s a_ts v_s / Σ_s a_ts
//! α_r  = exp(g_r),  g_r = logsigmoid(w_h·k̂_r + b_h) / gate_normalizer   (one per head and token)
//! ```
//!
//! γ_h = sigmoid(window factor) as in [`super::lolcats`]; with every gate α = 1 (g = 0) the
//! method is LoLCATs exactly. A key's decay runs from just after its own position to the query,
//! so a key that has just left the window enters the linear sum decayed by the gates of the
//! tokens in between, as it would had it been a linear key all along. The softmax terms are not
//! decayed: the window is exact attention, the gate only ages what the state holds.
//!
//! The gate ([`LizardGates`]) reads `k̂_r`, the head's raw key (before RoPE) scaled to unit norm.
//! Lizard computes its gate from the layer input x; the attention core is handed only the
//! teacher's projections, and the key `x W_k` is the part of x the head writes into its state,
//! so "how long to keep what this token writes" is a function of what it writes. Before RoPE,
//! the gate does not depend on position; at unit norm, an AdamW step moves the gate's
//! pre-activation by at most lr·√d, whatever the key's scale. The weight starts at zero and the
//! bias at [`GATE_BIAS_INIT`], so every gate starts near 1 (long memory: per-token decay
//! ≈ 1 − 4e-4 with the default `gate_normalizer` 16, a half-life of about 1700 tokens).
//!
//! Sinks (`sinks = N`) are softmax keys under the same max and γ, never linear keys (their key
//! features are zeroed before any sum), as in LoLCATs.
//!
//! Inputs ([`LizardInputs`]): LoLCATs' `q`, `k`, `v`, `phi_q`, `phi_k`, `window_factors` and the
//! log-gates `log_gates` (b, h, L), all `<= 0`, one per query head. Output (b, h, L, d_v) in
//! `v`'s dtype.
mod chunked;
mod naive;
mod recurrent;

pub use chunked::{chunked, chunked_output};
pub use naive::naive;
pub use recurrent::{recurrent, step};

use super::gated_deltanet::l2_normalize;
use super::linear_attn::LinearState;
use super::lolcats::{self, LolcatsInputs, Shapes};
use super::window::{
    cache_in_order, to_ring, validate_sinks, RingSlot, SinkCache, Window, WindowShape,
};
use crate::error::{at_least_one, Error, Result};
use crate::tensors::{compute_kind, exclusive_cumsum, repeat_heads, shape, Precision};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

/// The untrained gates' pre-activation: logsigmoid(5) / 16 ≈ −4.2e-4 per token.
pub const GATE_BIAS_INIT: f64 = 5.0;

/// Settings of the Lizard kernels.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LizardConfig {
    /// `sw` (last w tokens) or `tk` (terrace).
    pub window_shape: WindowShape,
    /// w, tokens per window (or terrace block).
    pub window_size: i64,
    /// Query tokens per chunk in the chunked form.
    pub chunk_size: i64,
    /// The first `sinks` tokens are softmax keys of every query (0: none).
    pub sinks: i64,
}

impl Default for LizardConfig {
    fn default() -> Self {
        Self {
            window_shape: WindowShape::Tk,
            window_size: 64,
            chunk_size: 64,
            sinks: 0,
        }
    }
}

impl LizardConfig {
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

/// The trainable gate projection of one layer, under its path: `gate_proj.weight` (h, d) and
/// `gate_proj.bias` (h), one scalar gate per query head.
#[derive(Debug)]
pub struct LizardGates {
    pub weight: Tensor,
    pub bias: Tensor,
    pub gate_normalizer: f64,
}

impl LizardGates {
    /// The untrained gates: zero weight, bias [`GATE_BIAS_INIT`] (every gate near 1); the
    /// weight's gradient carries k̂, so stage 1 moves it from the first step.
    pub fn new(path: &nn::Path, heads: i64, head_dim: i64, gate_normalizer: f64) -> Self {
        let path = path.sub("gate_proj");
        Self {
            weight: path.zeros("weight", &[heads, head_dim]),
            bias: path.var("bias", &[heads], nn::Init::Const(GATE_BIAS_INIT)),
            gate_normalizer,
        }
    }

    pub fn shallow_clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            gate_normalizer: self.gate_normalizer,
        }
    }

    /// The log-gates (b, h, L) in f32 (f64 for f64 keys) from the raw keys `k_raw`
    /// (b, h_k, L, d) before RoPE, h_k dividing h.
    pub fn forward(&self, k_raw: &Tensor) -> Result<Tensor> {
        let [heads, dim] = self.weight.size()[..] else {
            unreachable!("gate_proj.weight is built 2-d")
        };
        let size = k_raw.size();
        if size.len() != 4 || size[3] != dim || size[1] < 1 || heads % size[1] != 0 {
            return Err(shape(
                "k_raw",
                &format!("(batch, heads dividing {heads}, len, {dim})"),
                k_raw,
            ));
        }
        let kind = compute_kind("k_raw", k_raw)?;
        let unit = l2_normalize(&repeat_heads(&k_raw.to_kind(kind), heads))?; // (b, h, L, d)
        let logits = unit
            .matmul(&self.weight.to_kind(kind).unsqueeze(-1))
            .squeeze_dim(-1)
            + self.bias.to_kind(kind).reshape([1, heads, 1]); // (b, h, L)
        Ok(logits.log_sigmoid() / self.gate_normalizer)
    }
}

/// One call's tensors (see the module docs for shapes).
pub struct LizardInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub phi_q: &'a Tensor,
    pub phi_k: &'a Tensor,
    pub log_gates: &'a Tensor,
    pub window_factors: &'a Tensor,
}

impl<'a> LizardInputs<'a> {
    /// The same call without its gates: LoLCATs' inputs.
    pub(crate) fn lolcats(&self) -> LolcatsInputs<'a> {
        LolcatsInputs {
            q: self.q,
            k: self.k,
            v: self.v,
            phi_q: self.phi_q,
            phi_k: self.phi_k,
            window_factors: self.window_factors,
        }
    }
}

/// What a Lizard layer remembers: the last `m <= reach` tokens' keys, key features (zero for
/// sinks), values (at their own head counts) and log-gates (b, h, m) (once `m = reach`, a ring:
/// see [`super::window::to_ring`]); the linear sums over every
/// token before them but the sinks, decayed to the last of those tokens (`linear.kv`
/// Σ decay·φk_sᵀ v_s (b, h, f, d_v), `linear.k_sum` Σ decay·φk_s (b, h, f)); the sink tokens'
/// keys and values; and the number of tokens seen. Produced by [`chunked`], carried on by
/// [`step`] / [`recurrent`].
#[derive(Debug)]
pub struct LizardState {
    pub k: Tensor,
    pub phi_k: Tensor,
    pub v: Tensor,
    pub log_gates: Tensor,
    pub linear: LinearState,
    pub sinks: SinkCache,
    pub pos: i64,
}

impl LizardState {
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
            log_gates: f(&self.log_gates),
            linear: self.linear.map_tensors(f),
            sinks: self.sinks.map_tensors(f),
            pos: self.pos,
        }
    }

    pub fn tensors(&self) -> Vec<&Tensor> {
        let mut all = vec![&self.k, &self.phi_k, &self.v, &self.log_gates];
        all.extend(self.linear.tensors());
        all.extend([&self.sinks.k, &self.sinks.v]);
        all
    }

    /// `state` checked against the call and converted to its compute dtype, or the empty state.
    pub(crate) fn initial(
        state: Option<&Self>,
        s: &Shapes,
        cfg: &LizardConfig,
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
                log_gates: Tensor::zeros([s.batch, s.heads, 0], opts),
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
            log_gates: ordered(&state.log_gates),
            linear: state.linear.for_call(&lin, opts.0)?,
            sinks: state
                .sinks
                .checked(k_shape, v_shape, state.pos, cfg.sinks, opts.0)?,
            pos: state.pos,
        })
    }

    /// Checks the state against a call's sizes and its window.
    pub(crate) fn check(&self, s: &Shapes, cfg: &LizardConfig) -> Result<()> {
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
        if self.log_gates.size() != [s.batch, s.heads, m] {
            return Err(shape(
                "state.log_gates",
                &format!("{:?}", [s.batch, s.heads, m]),
                &self.log_gates,
            ));
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
            log_gates,
            linear,
            sinks,
            ..
        } = self;
        for t in [
            k,
            phi_k,
            v,
            log_gates,
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

    /// The state after appending `k`, `phi_k`, `v` (b, ·, n, ·) and `log_gates` (b, h, n): the
    /// last `reach` tokens stay, the ones before join the linear sums, which first decay by every
    /// leaving token's gate, while each leaving token enters decayed by the gates after it (up to
    /// the last leaving one). `phi_k` must have its sink rows zeroed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn advance(
        &self,
        k: &Tensor,
        phi_k: &Tensor,
        v: &Tensor,
        log_gates: &Tensor,
        heads: i64,
        cfg: &LizardConfig,
        p: Precision,
    ) -> Self {
        let added = k.size()[2];
        let sinks = self.sinks.advance(k, v, self.pos, cfg.sinks);
        let (k, phi_k, v, g) = (
            Tensor::cat(&[&self.k, k], 2),
            Tensor::cat(&[&self.phi_k, phi_k], 2),
            Tensor::cat(&[&self.v, v], 2),
            Tensor::cat(&[&self.log_gates, &log_gates.to_kind(p.acc)], 2),
        );
        let total = k.size()[2];
        let reach = cfg.window().reach();
        let keep = total.min(reach);
        let leaving = total - keep;
        let linear = if leaving == 0 {
            self.linear.shallow_clone()
        } else {
            let g_out = g.narrow(2, 0, leaving); // (b, h, n_out)
            let after = decay_after(&g_out, p.acc); // (b, h, n_out)
            let whole = g_out.sum_dim_intlist(-1, false, p.acc).exp(); // (b, h)
            let phi = repeat_heads(&phi_k.narrow(2, 0, leaving), heads).to_kind(p.acc)
                * after.exp().unsqueeze(-1); // (b, h, n_out, f)
            let values = repeat_heads(&v.narrow(2, 0, leaving), heads);
            LinearState {
                kv: &self.linear.kv * whole.reshape([whole.size()[0], heads, 1, 1])
                    + p.mm(&phi.transpose(-1, -2), &values),
                k_sum: &self.linear.k_sum * whole.unsqueeze(-1)
                    + phi.sum_dim_intlist(-2, false, p.acc),
            }
        };
        let pos = self.pos + added;
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
            log_gates: last(&g),
            linear,
            sinks,
            pos,
        }
    }

    /// Appends one token `k`, `phi_k`, `v` (b, ·, 1, ·) and `log_gate` (b, h, 1), not a sink, to
    /// a full cache in place: the linear sums decay by the gate of the token in its slot
    /// ([`RingSlot`], `position` as there), which leaves the window and joins them (heads
    /// repeated to `heads`), and the new token takes its slot. A decoding step's update: nothing
    /// of the state's size is allocated.
    pub(crate) fn push(&mut self, new: [&Tensor; 4], heads: i64, position: Option<&Tensor>) {
        let [k, phi_k, v, log_gate] = new;
        let reach = self.cached();
        let slot = (reach > 0).then(|| RingSlot::of(reach, self.pos, position));
        // Without a cache (a one-token window) the token leaves the window as it comes.
        let leaving = |cache: &Tensor, token: &Tensor| match &slot {
            Some(slot) => slot.read(cache),
            None => token.shallow_clone(),
        };
        let decay = leaving(&self.log_gates, log_gate).exp(); // (b, h, 1)
        let _ = self.linear.kv.g_mul_(&decay.unsqueeze(-1));
        let _ = self.linear.k_sum.g_mul_(&decay);
        self.linear.absorb_token(
            &repeat_heads(&leaving(&self.phi_k, phi_k), heads),
            &repeat_heads(&leaving(&self.v, v), heads),
        );
        if let Some(slot) = &slot {
            slot.write(&mut self.k, k);
            slot.write(&mut self.phi_k, phi_k);
            slot.write(&mut self.v, v);
            slot.write(&mut self.log_gates, log_gate);
        }
        self.pos += 1;
    }
}

/// For log-gates `g` (.., n): `Σ_{r > s} g_r` at each s, the log-decay from each token to the
/// last (its own gate excluded), summed from the end so that no difference of large sums loses
/// precision.
pub(crate) fn decay_after(g: &Tensor, kind: Kind) -> Tensor {
    let last = g.dim() as i64 - 1;
    exclusive_cumsum(&g.flip([last]), last, kind).flip([last])
}

/// Checks the call against LoLCATs' rules and the gates' shape (b, h, L).
pub(crate) fn check_inputs(x: &LizardInputs) -> Result<Shapes> {
    let s = lolcats::check_inputs(&x.lolcats())?;
    if x.log_gates.size() != [s.batch, s.heads, s.len] {
        return Err(shape(
            "log_gates",
            &format!(
                "{:?} (one per query head and token)",
                [s.batch, s.heads, s.len]
            ),
            x.log_gates,
        ));
    }
    compute_kind("log_gates", x.log_gates)?;
    Ok(s)
}

/// Refuses log-gates that are positive or not finite (one host read): a gate above 1 would grow
/// the linear sums without bound. The one-token step skips this check so that decoding never
/// waits for the device.
pub(crate) fn check_gates(log_gates: &Tensor) -> Result<()> {
    let bad = log_gates
        .gt(0.0)
        .logical_or(&log_gates.isfinite().logical_not())
        .any()
        .int64_value(&[]);
    if bad != 0 {
        return Err(Error::Value {
            tensor: "log_gates",
            message: "must be finite and <= 0 (log of a gate in (0, 1])".into(),
        });
    }
    Ok(())
}
