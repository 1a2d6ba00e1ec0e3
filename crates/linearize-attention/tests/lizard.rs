//! Lizard gated window + linear attention: naive, chunked and recurrent forms agree (values and
//! gradients, the gate projection's included), for both window shapes, with and without sinks,
//! under strong decays; with every gate at 1 it is LoLCATs; and the naive form is the formula
//! `ops::lizard` documents.
mod common;

use common::*;
use linearize_attention::feature_map::{FeatureMap, FeatureMapConfig, FeatureMapInit};
use linearize_attention::ops::lizard::{
    self, LizardConfig, LizardGates, LizardInputs, LizardState, GATE_BIAS_INIT,
};
use linearize_attention::ops::lolcats::{self, LolcatsConfig, LolcatsInputs, WindowFactors};
use linearize_attention::ops::window::WindowShape;
use tch::{nn, Device, Kind, Tensor};

const D: i64 = 16;
const W: i64 = 8;
const CHUNK: i64 = 16;
const HEADS: i64 = 4;
const KV_HEADS: i64 = 2;

const SHAPES: [WindowShape; 2] = [WindowShape::Sw, WindowShape::Tk];
const SINKS: [i64; 2] = [0, 4];

fn cfg(shape: WindowShape, sinks: i64) -> LizardConfig {
    LizardConfig {
        window_shape: shape,
        window_size: W,
        chunk_size: CHUNK,
        sinks,
    }
}

struct Setup {
    vs: nn::VarStore,
    map_q: FeatureMap,
    map_k: FeatureMap,
    factors: WindowFactors,
    gates: LizardGates,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The raw keys the gates read (before RoPE in a model; any keys here).
    k_raw: Tensor,
}

/// A setup whose gates decay by about `exp(bias_scale · logsigmoid(·))` per token: random gate
/// weights so that every token and head decays differently.
fn setup(batch: i64, len: i64, kind: Kind, normalizer: f64) -> Setup {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let fm = FeatureMapConfig::Hedgehog {
        feature_dim: 8,
        half_space: false,
        bias: false,
        init: FeatureMapInit::Kaiming,
    };
    let map_q = FeatureMap::new(&(vs.root() / "feature_map_q"), HEADS, D, &fm).unwrap();
    let map_k = FeatureMap::new(&(vs.root() / "feature_map_k"), HEADS, D, &fm).unwrap();
    let mut factors = WindowFactors::new(&vs.root(), HEADS);
    let mut gates = LizardGates::new(&vs.root(), HEADS, D, normalizer);
    tch::no_grad(|| {
        factors
            .logits
            .copy_(&Tensor::from_slice(&[-2.1972f32, -1.0, 0.0, 1.5]));
        gates.weight.copy_(&(randn(&[HEADS, D], Kind::Float) * 2.0));
        gates
            .bias
            .copy_(&Tensor::from_slice(&[0.5f32, 1.0, 2.0, 3.0]));
    });
    if kind == Kind::Double {
        vs.double();
    }
    Setup {
        vs,
        map_q,
        map_k,
        factors,
        gates,
        q: leaf(&[batch, HEADS, len, D], kind),
        k: leaf(&[batch, KV_HEADS, len, D], kind),
        v: leaf(&[batch, KV_HEADS, len, D], kind),
        k_raw: leaf(&[batch, KV_HEADS, len, D], kind),
    }
}

/// The per-token tensors of a call (b, heads, L, ·), the log-gates (b, h, L).
struct Sequence {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: Tensor,
    phi_k: Tensor,
    g: Tensor,
}

impl Sequence {
    /// Tokens `from .. from + n` of every tensor.
    fn narrow(&self, from: i64, n: i64) -> Self {
        let part = |t: &Tensor| t.narrow(2, from, n);
        Self {
            q: part(&self.q),
            k: part(&self.k),
            v: part(&self.v),
            phi_q: part(&self.phi_q),
            phi_k: part(&self.phi_k),
            g: part(&self.g),
        }
    }

    fn with_gates(&self, g: Tensor) -> Self {
        Self {
            g,
            ..self.narrow(0, self.q.size()[2])
        }
    }
}

impl Setup {
    /// The setup's tensors through the feature maps and the gate projection.
    fn sequence(&self) -> Sequence {
        Sequence {
            q: self.q.shallow_clone(),
            k: self.k.shallow_clone(),
            v: self.v.shallow_clone(),
            phi_q: self.map_q.forward(&self.q).unwrap(),
            phi_k: self.map_k.forward(&self.k).unwrap(),
            g: self.gates.forward(&self.k_raw).unwrap(),
        }
    }

    fn inputs<'a>(&'a self, x: &'a Sequence) -> LizardInputs<'a> {
        LizardInputs {
            q: &x.q,
            k: &x.k,
            v: &x.v,
            phi_q: &x.phi_q,
            phi_k: &x.phi_k,
            log_gates: &x.g,
            window_factors: &self.factors.logits,
        }
    }

    /// Every input that takes a gradient: q, k, v, the raw keys and the parameters.
    fn grad_inputs(&self) -> Vec<(String, Tensor)> {
        let mut all: Vec<(String, Tensor)> = [("q", &self.q), ("k", &self.k), ("v", &self.v)]
            .into_iter()
            .chain([("k_raw", &self.k_raw)])
            .map(|(n, t)| (n.to_string(), t.shallow_clone()))
            .collect();
        all.extend(self.vs.variables());
        all
    }
}

fn assert_same(what: &str, a: &Tensor, b: &Tensor, s: &Setup, tol: f64) {
    let inputs = s.grad_inputs();
    let inputs: Vec<(&str, &Tensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    assert_same_grads(what, a, b, &inputs, tol);
}

#[test]
fn naive_is_the_design_formula() {
    seed(30);
    let (len, d, f) = (9i64, 3i64, 4i64);
    let q = randn(&[1, 2, len, d], Kind::Double);
    let k = randn(&[1, 1, len, d], Kind::Double);
    let v = randn(&[1, 1, len, 2], Kind::Double);
    let phi_q = randn(&[1, 2, len, f], Kind::Double).exp();
    let phi_k = randn(&[1, 1, len, f], Kind::Double).exp();
    let g = -randn(&[1, 2, len], Kind::Double).abs();
    let w = Tensor::from_slice(&[-0.5f64, 1.0]);
    for (shape, sinks) in SHAPES.iter().flat_map(|&s| [(s, 0), (s, 1), (s, 3)]) {
        let cfg = LizardConfig {
            window_shape: shape,
            window_size: 2,
            chunk_size: 4,
            sinks,
        };
        let x = LizardInputs {
            q: &q,
            k: &k,
            v: &v,
            phi_q: &phi_q,
            phi_k: &phi_k,
            log_gates: &g,
            window_factors: &w,
        };
        let y = lizard::naive(&x, &cfg).unwrap();
        let at = |t: &Tensor, h: i64, i: i64, j: i64| t.double_value(&[0, h, i, j]);
        for h in 0..2 {
            let gamma = 1.0 / (1.0 + (-w.double_value(&[h])).exp());
            for t in 0..len {
                let in_window = |s: i64| {
                    s < sinks
                        || match shape {
                            WindowShape::Sw => t - s < 2,
                            WindowShape::Tk => s >= (t / 2 - 1) * 2,
                        }
                };
                let score = |s: i64| {
                    (0..d)
                        .map(|i| at(&q, h, t, i) * at(&k, 0, s, i))
                        .sum::<f64>()
                        / (d as f64).sqrt()
                };
                let m = (0..=t)
                    .filter(|&s| in_window(s))
                    .map(score)
                    .fold(f64::NEG_INFINITY, f64::max);
                // Π_{r=s+1..t} α_r
                let decay = |s: i64| {
                    (s + 1..=t)
                        .map(|r| g.double_value(&[0, h, r]).exp())
                        .product::<f64>()
                };
                let weight = |s: i64| {
                    if in_window(s) {
                        gamma * (score(s) - m).exp()
                    } else {
                        (0..f)
                            .map(|i| at(&phi_q, h, t, i) * at(&phi_k, 0, s, i))
                            .sum::<f64>()
                            * decay(s)
                    }
                };
                let total: f64 = (0..=t).map(weight).sum();
                for j in 0..2 {
                    let want = (0..=t).map(|s| weight(s) * at(&v, 0, s, j)).sum::<f64>() / total;
                    let got = at(&y, h, t, j);
                    assert!(
                        (got - want).abs() < 1e-12,
                        "{shape:?} sinks {sinks} h {h} t {t} j {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn with_every_gate_at_one_it_is_lolcats() {
    seed(31);
    for shape in SHAPES {
        for sinks in SINKS {
            let s = setup(2, 3 * CHUNK + 5, Kind::Double, 1.0);
            let x = s.sequence();
            let x = x.with_gates(x.g.zeros_like());
            let lz = s.inputs(&x);
            let lc = LolcatsInputs {
                q: &x.q,
                k: &x.k,
                v: &x.v,
                phi_q: &x.phi_q,
                phi_k: &x.phi_k,
                window_factors: &s.factors.logits,
            };
            let lc_cfg = LolcatsConfig {
                window_shape: shape,
                window_size: W,
                chunk_size: CHUNK,
                fused: false,
                sinks,
            };
            let what = format!("{shape:?} sinks {sinks}");
            let want = lolcats::naive(&lc, &lc_cfg).unwrap();
            let naive = lizard::naive(&lz, &cfg(shape, sinks)).unwrap();
            assert_same(&format!("{what}: naive"), &naive, &want, &s, 1e-12);
            let (chunked, _) = lizard::chunked(&lz, &cfg(shape, sinks), None).unwrap();
            let (lc_chunked, _) = lolcats::chunked(&lc, &lc_cfg, None).unwrap();
            assert_same(
                &format!("{what}: chunked"),
                &chunked,
                &lc_chunked,
                &s,
                1e-12,
            );
            let (recurrent, _) =
                tch::no_grad(|| lizard::recurrent(&lz, &cfg(shape, sinks), None)).unwrap();
            assert_close(&format!("{what}: recurrent"), &recurrent, &want, 1e-12);
        }
    }
}

#[test]
fn chunked_matches_naive_forward_and_gradients() {
    seed(32);
    for kind in [Kind::Float, Kind::Double] {
        let tol = if kind == Kind::Float { 1e-5 } else { 1e-10 };
        for shape in SHAPES {
            for sinks in SINKS {
                for len in lengths(W, CHUNK) {
                    let s = setup(2, len, kind, 1.0);
                    let x = s.sequence();
                    let c = cfg(shape, sinks);
                    let naive = lizard::naive(&s.inputs(&x), &c).unwrap();
                    let (chunked, _) = lizard::chunked(&s.inputs(&x), &c, None).unwrap();
                    let what = format!("{kind:?} {shape:?} sinks {sinks} len {len}");
                    assert_same(&what, &chunked, &naive, &s, tol);
                    let alone = lizard::chunked_output(&s.inputs(&x), &c).unwrap();
                    assert_close(&format!("{what}: output alone"), &alone, &chunked, 0.0);
                }
            }
        }
    }
}

#[test]
fn chunks_smaller_than_the_window_and_a_one_token_window() {
    seed(33);
    for shape in SHAPES {
        for (window, chunk) in [(W, 1), (W, 3), (W, 5), (1, 4), (1, CHUNK)] {
            let s = setup(1, 2 * W + 3, Kind::Double, 1.0);
            let x = s.sequence();
            let c = LizardConfig {
                window_size: window,
                chunk_size: chunk,
                ..cfg(shape, 4)
            };
            let what = format!("{shape:?} window {window} chunk {chunk}");
            let naive = lizard::naive(&s.inputs(&x), &c).unwrap();
            let (chunked, _) = lizard::chunked(&s.inputs(&x), &c, None).unwrap();
            assert_same(&what, &chunked, &naive, &s, 1e-10);
            let (recurrent, _) =
                tch::no_grad(|| lizard::recurrent(&s.inputs(&x), &c, None)).unwrap();
            assert_close(&format!("{what}: recurrent"), &recurrent, &naive, 1e-10);
        }
    }
}

#[test]
fn strong_decays_stay_finite_and_exact() {
    // A third of the tokens reset the memory with log-gates of −30 to −100 (decays past f32's
    // range within a token or two), the others keep it (log-gates near 0): every exponent the
    // chunked form takes is a sum over a forward span, so nothing overflows, and the weak spans
    // between resets keep the linear terms large enough to check.
    seed(34);
    for kind in [Kind::Float, Kind::Double] {
        for shape in SHAPES {
            let s = setup(1, 3 * CHUNK + 5, kind, 1.0);
            let x = s.sequence();
            let size = x.g.size();
            let weak = -(randn(&size, kind).abs() * 0.05);
            let strong = -(randn(&size, kind).abs() * 35.0 + 30.0);
            let reset = Tensor::rand(size.as_slice(), (kind, Device::Cpu)).lt(1.0 / 3.0);
            let strong = strong.where_self(&reset, &weak);
            let x = x.with_gates(strong.set_requires_grad(true));
            let c = cfg(shape, 4);
            // The naive form sums the log-gates from the start (to ~−2000 here), so its f32
            // differences lose ~1e-4 of each decay: the reference is f64 in both cases.
            let x64 = Sequence {
                q: x.q.to_kind(Kind::Double),
                k: x.k.to_kind(Kind::Double),
                v: x.v.to_kind(Kind::Double),
                phi_q: x.phi_q.to_kind(Kind::Double),
                phi_k: x.phi_k.to_kind(Kind::Double),
                g: x.g.to_kind(Kind::Double),
            };
            let naive = lizard::naive(&s.inputs(&x64), &c).unwrap();
            let (chunked, _) = lizard::chunked(&s.inputs(&x), &c, None).unwrap();
            assert_finite("chunked", &chunked);
            let probe = chunked.randn_like();
            let got = grads(&chunked, &probe, &[&s.q, &s.k, &s.v, &x.g]);
            for g in &got {
                assert_finite("chunked gradient", g);
            }
            let tol = if kind == Kind::Float { 1e-5 } else { 1e-10 };
            let what = format!("{kind:?} {shape:?}");
            assert_close(&what, &chunked, &naive, tol);
            let want = grads(&naive, &probe, &[&s.q, &s.k, &s.v, &x.g]);
            for (name, (a, b)) in ["q", "k", "v", "g"].iter().zip(got.iter().zip(&want)) {
                assert_close(&format!("{what}: grad {name}"), a, b, tol);
            }
            let (recurrent, _) =
                tch::no_grad(|| lizard::recurrent(&s.inputs(&x), &c, None)).unwrap();
            assert_close(&format!("{what}: recurrent"), &recurrent, &naive, tol);
        }
    }
}

fn assert_same_state(what: &str, a: &LizardState, b: &LizardState) {
    assert_eq!(a.pos, b.pos, "{what}: pos");
    for (name, x, y) in [
        ("k cache", &a.k, &b.k),
        ("phi_k cache", &a.phi_k, &b.phi_k),
        ("v cache", &a.v, &b.v),
        ("log_gates cache", &a.log_gates, &b.log_gates),
        ("linear kv", &a.linear.kv, &b.linear.kv),
        ("linear k_sum", &a.linear.k_sum, &b.linear.k_sum),
        ("sink k", &a.sinks.k, &b.sinks.k),
        ("sink v", &a.sinks.v, &b.sinks.v),
    ] {
        assert_eq!(x.size(), y.size(), "{what}: {name} shape");
        if x.numel() > 0 {
            assert_close(&format!("{what}: {name}"), x, y, 1e-5);
        }
    }
}

#[test]
fn recurrent_matches_chunked_and_their_states_agree() {
    seed(35);
    for shape in SHAPES {
        for sinks in SINKS {
            for len in lengths(W, CHUNK) {
                let s = setup(3, len, Kind::Float, 1.0);
                let x = tch::no_grad(|| s.sequence());
                let c = cfg(shape, sinks);
                let (chunked, end_c) =
                    tch::no_grad(|| lizard::chunked(&s.inputs(&x), &c, None)).unwrap();
                let (recurrent, end_r) =
                    tch::no_grad(|| lizard::recurrent(&s.inputs(&x), &c, None)).unwrap();
                let what = format!("{shape:?} sinks {sinks} len {len}");
                assert_close(&what, &recurrent, &chunked, 1e-5);
                assert_same_state(&what, &end_r, &end_c);
                assert_eq!(end_c.cached(), len.min(c.window().reach()));
                assert_eq!(end_c.sinks.len(), len.min(sinks));
            }
        }
    }
}

#[test]
fn prefill_then_decode_matches_the_full_sequence() {
    seed(36);
    let len = 3 * CHUNK + 5;
    for shape in SHAPES {
        for sinks in SINKS {
            let s = setup(2, len, Kind::Float, 1.0);
            let x = tch::no_grad(|| s.sequence());
            let c = cfg(shape, sinks);
            let (full, _) = tch::no_grad(|| lizard::chunked(&s.inputs(&x), &c, None)).unwrap();
            for split in [1, 3, 5, W, W + 3, CHUNK + 1, len - 1] {
                let (first, rest) = (x.narrow(0, split), x.narrow(split, len - split));
                let (head, tail) = (s.inputs(&first), s.inputs(&rest));
                tch::no_grad(|| {
                    let (y0, state) = lizard::chunked(&head, &c, None).unwrap();
                    let (decoded, _) =
                        lizard::recurrent(&tail, &c, Some(state.shallow_clone())).unwrap();
                    let (continued, _) = lizard::chunked(&tail, &c, Some(&state)).unwrap();
                    let what = format!("{shape:?} sinks {sinks} split {split}");
                    let rest = full.narrow(2, split, len - split);
                    assert_close(
                        &format!("{what}: prefill"),
                        &y0,
                        &full.narrow(2, 0, split),
                        1e-5,
                    );
                    assert_close(&format!("{what}: decode"), &decoded, &rest, 1e-5);
                    assert_close(&format!("{what}: continued"), &continued, &rest, 1e-5);
                });
            }
        }
    }
}

#[test]
fn bf16_inputs_accumulate_in_f32() {
    seed(37);
    for shape in SHAPES {
        let s = setup(2, 3 * CHUNK + 5, Kind::Float, 1.0);
        let x = tch::no_grad(|| s.sequence());
        let c = cfg(shape, 4);
        let reference = tch::no_grad(|| lizard::naive(&s.inputs(&x), &c)).unwrap();
        let bf = |t: &Tensor| t.to_kind(Kind::BFloat16);
        let low = Sequence {
            q: bf(&x.q),
            k: bf(&x.k),
            v: bf(&x.v),
            phi_q: bf(&x.phi_q),
            phi_k: bf(&x.phi_k),
            g: x.g.shallow_clone(),
        };
        let (out, state) = tch::no_grad(|| lizard::chunked(&s.inputs(&low), &c, None)).unwrap();
        assert_eq!(out.kind(), Kind::BFloat16);
        assert_eq!(state.linear.kv.kind(), Kind::Float);
        assert_close(&format!("{shape:?} bf16 vs f32"), &out, &reference, 3e-2);
    }
}

#[test]
fn gates_start_near_one_and_reject_growth() {
    let vs = nn::VarStore::new(Device::Cpu);
    let gates = LizardGates::new(&(vs.root() / "layer"), HEADS, D, 16.0);
    assert!(vs.variables().contains_key("layer.gate_proj.weight"));
    assert!(vs.variables().contains_key("layer.gate_proj.bias"));
    let g = gates
        .forward(&randn(&[1, KV_HEADS, 5, D], Kind::Float))
        .unwrap();
    assert_eq!(g.size(), [1, HEADS, 5]);
    let want = -(1.0 + (-GATE_BIAS_INIT).exp()).ln() / 16.0;
    assert_close("untrained log-gate", &g, &g.full_like(want), 1e-6);
    assert!(want > -5e-4, "untrained gates forget too fast: {want}");

    let s = setup(1, 5, Kind::Float, 1.0);
    let x = tch::no_grad(|| s.sequence());
    let x = x.with_gates(x.g.ones_like() * 0.1);
    let err = lizard::chunked(&s.inputs(&x), &cfg(WindowShape::Sw, 0), None)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("log_gates:"), "{err}");
    let err = lizard::chunked(
        &s.inputs(&x.with_gates(x.g.narrow(1, 0, 2))),
        &cfg(WindowShape::Sw, 0),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("log_gates:"), "{err}");
}

#[test]
fn a_state_from_another_window_is_rejected() {
    seed(38);
    let s = setup(1, 20, Kind::Float, 1.0);
    let x = tch::no_grad(|| s.sequence());
    let (_, state) =
        tch::no_grad(|| lizard::chunked(&s.inputs(&x), &cfg(WindowShape::Tk, 0), None)).unwrap();
    let err = lizard::chunked(&s.inputs(&x), &cfg(WindowShape::Sw, 0), Some(&state))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("state.k:"), "{err}");
}
