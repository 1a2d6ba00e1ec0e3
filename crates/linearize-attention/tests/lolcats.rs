//! LoLCATs sliding-window + linear attention: naive, chunked and recurrent forms agree, for both
//! window shapes, with and without sink tokens, and the naive form is the formula `ops::lolcats`
//! documents.
mod common;

use common::*;
use linearize_attention::feature_map::{FeatureMap, FeatureMapConfig, FeatureMapInit};
use linearize_attention::ops::lolcats::{
    self, LolcatsConfig, LolcatsInputs, LolcatsState, WindowFactors,
};
use linearize_attention::ops::window::WindowShape;
use tch::{nn, Device, Kind, Tensor};

const D: i64 = 16;
const W: i64 = 8;
const CHUNK: i64 = 16;
const HEADS: i64 = 4;
const KV_HEADS: i64 = 2;

struct Setup {
    vs: nn::VarStore,
    map_q: FeatureMap,
    map_k: FeatureMap,
    factors: WindowFactors,
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

fn setup(batch: i64, len: i64, kind: Kind) -> Setup {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg = FeatureMapConfig::Hedgehog {
        feature_dim: 8,
        half_space: false,
        bias: false,
        init: FeatureMapInit::Kaiming,
    };
    let map_q = FeatureMap::new(&(vs.root() / "feature_map_q"), HEADS, D, &cfg).unwrap();
    let map_k = FeatureMap::new(&(vs.root() / "feature_map_k"), HEADS, D, &cfg).unwrap();
    let mut factors = WindowFactors::new(&vs.root(), HEADS);
    // Spread the factors so every head mixes differently.
    tch::no_grad(|| {
        factors
            .logits
            .copy_(&Tensor::from_slice(&[-2.1972f32, -1.0, 0.0, 1.5]))
    });
    if kind == Kind::Double {
        vs.double();
    }
    Setup {
        vs,
        map_q,
        map_k,
        factors,
        q: leaf(&[batch, HEADS, len, D], kind),
        k: leaf(&[batch, KV_HEADS, len, D], kind),
        v: leaf(&[batch, KV_HEADS, len, D], kind),
    }
}

struct Features {
    phi_q: Tensor,
    phi_k: Tensor,
}

impl Setup {
    fn features(&self) -> Features {
        Features {
            phi_q: self.map_q.forward(&self.q).unwrap(),
            phi_k: self.map_k.forward(&self.k).unwrap(),
        }
    }

    fn inputs<'a>(&'a self, f: &'a Features) -> LolcatsInputs<'a> {
        LolcatsInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            phi_q: &f.phi_q,
            phi_k: &f.phi_k,
            window_factors: &self.factors.logits,
        }
    }

    fn params(&self) -> Vec<(String, Tensor)> {
        self.vs.variables().into_iter().collect()
    }

    /// q, k, v through `f` (a dtype change, a detach) with their features.
    fn sequence_with(&self, f: impl Fn(&Tensor) -> Tensor) -> Sequence {
        let (q, k, v) = (f(&self.q), f(&self.k), f(&self.v));
        let (phi_q, phi_k) = (
            self.map_q.forward(&q).unwrap(),
            self.map_k.forward(&k).unwrap(),
        );
        Sequence {
            q,
            k,
            v,
            phi_q,
            phi_k,
        }
    }

    /// The setup's q, k, v with the features `f`.
    fn sequence(&self, f: &Features) -> Sequence {
        Sequence {
            q: self.q.shallow_clone(),
            k: self.k.shallow_clone(),
            v: self.v.shallow_clone(),
            phi_q: f.phi_q.shallow_clone(),
            phi_k: f.phi_k.shallow_clone(),
        }
    }

    /// `x` with the setup's window factors, as one call's inputs.
    fn inputs_of<'a>(&'a self, x: &'a Sequence) -> LolcatsInputs<'a> {
        LolcatsInputs {
            q: &x.q,
            k: &x.k,
            v: &x.v,
            phi_q: &x.phi_q,
            phi_k: &x.phi_k,
            window_factors: &self.factors.logits,
        }
    }
}

/// The five per-token tensors of a call (b, heads, L, ·).
struct Sequence {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: Tensor,
    phi_k: Tensor,
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
        }
    }
}

fn cfg(shape: WindowShape) -> LolcatsConfig {
    LolcatsConfig {
        window_shape: shape,
        window_size: W,
        chunk_size: CHUNK,
        fused: true,
        sinks: 0,
    }
}

const SHAPES: [WindowShape; 2] = [WindowShape::Sw, WindowShape::Tk];

/// Sink counts: one, a few, and more than a terrace window spans.
const SINKS: [i64; 3] = [1, 3, 2 * W + 3];

fn with_sinks(shape: WindowShape, sinks: i64) -> LolcatsConfig {
    LolcatsConfig {
        sinks,
        ..cfg(shape)
    }
}

#[test]
fn naive_is_the_design_formula() {
    seed(10);
    let (len, d) = (6i64, 3i64);
    let q = randn(&[1, 2, len, d], Kind::Double);
    let k = randn(&[1, 1, len, d], Kind::Double);
    let v = randn(&[1, 1, len, 2], Kind::Double);
    let phi_q = randn(&[1, 2, len, 4], Kind::Double).exp();
    let phi_k = randn(&[1, 1, len, 4], Kind::Double).exp();
    let w = Tensor::from_slice(&[-0.5f64, 1.0]);
    // Sinks join the window's softmax terms (same max, same γ) and leave the linear ones.
    for (shape, sinks) in SHAPES.iter().flat_map(|&s| [(s, 0), (s, 1), (s, 3)]) {
        let cfg = LolcatsConfig {
            window_shape: shape,
            window_size: 2,
            chunk_size: 4,
            fused: true,
            sinks,
        };
        let x = LolcatsInputs {
            q: &q,
            k: &k,
            v: &v,
            phi_q: &phi_q,
            phi_k: &phi_k,
            window_factors: &w,
        };
        let y = lolcats::naive(&x, &cfg).unwrap();
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
                let weight = |s: i64| {
                    if in_window(s) {
                        gamma * (score(s) - m).exp()
                    } else {
                        (0..4)
                            .map(|i| at(&phi_q, h, t, i) * at(&phi_k, 0, s, i))
                            .sum::<f64>()
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
fn chunked_matches_naive_forward_and_gradients() {
    seed(11);
    for kind in [Kind::Float, Kind::Double] {
        let tol = if kind == Kind::Float { 1e-5 } else { 1e-10 };
        for shape in SHAPES {
            for len in lengths(W, CHUNK) {
                let s = setup(2, len, kind);
                let f = s.features();
                let naive = lolcats::naive(&s.inputs(&f), &cfg(shape)).unwrap();
                let (chunked, _) = lolcats::chunked(&s.inputs(&f), &cfg(shape), None).unwrap();
                let params = s.params();
                let mut inputs: Vec<(&str, &Tensor)> = vec![("q", &s.q), ("k", &s.k), ("v", &s.v)];
                inputs.extend(params.iter().map(|(n, t)| (n.as_str(), t)));
                assert_same_grads(
                    &format!("{kind:?} {shape:?} len {len}"),
                    &chunked,
                    &naive,
                    &inputs,
                    tol,
                );
            }
        }
    }
}

#[test]
fn attention_transfer_gradients_match_the_naive_form() {
    // Attention transfer: q, k, v are the teacher's (no gradient); only the feature maps and the
    // window factors train. The chunked form then takes its split path for both window shapes.
    seed(12);
    for shape in SHAPES {
        for len in lengths(W, CHUNK) {
            let s = setup(2, len, Kind::Float);
            let sequence = s.sequence_with(Tensor::detach);
            let x = s.inputs_of(&sequence);
            let naive = lolcats::naive(&x, &cfg(shape)).unwrap();
            let chunked = lolcats::chunked_output(&x, &cfg(shape)).unwrap();
            let params = s.params();
            let inputs: Vec<(&str, &Tensor)> =
                params.iter().map(|(n, t)| (n.as_str(), t)).collect();
            assert_same_grads(
                &format!("{shape:?} len {len}"),
                &chunked,
                &naive,
                &inputs,
                1e-5,
            );
        }
    }
}

#[test]
fn the_output_alone_is_the_chunked_output_with_the_same_gradients() {
    seed(20);
    for kind in [Kind::Float, Kind::BFloat16] {
        for shape in SHAPES {
            let s = setup(2, 3 * CHUNK + 5, Kind::Float);
            let sequence = s.sequence_with(|t| t.to_kind(kind));
            let x = s.inputs_of(&sequence);
            let (full, _) = lolcats::chunked(&x, &cfg(shape), None).unwrap();
            let alone = lolcats::chunked_output(&x, &cfg(shape)).unwrap();
            let params = s.params();
            let mut inputs: Vec<(&str, &Tensor)> = vec![("q", &s.q), ("k", &s.k), ("v", &s.v)];
            inputs.extend(params.iter().map(|(n, t)| (n.as_str(), t)));
            assert_same_grads(&format!("{kind:?} {shape:?}"), &alone, &full, &inputs, 0.0);
        }
    }
}

#[test]
fn chunks_smaller_than_the_window() {
    seed(12);
    for shape in SHAPES {
        for chunk in [1, 3, 5] {
            let s = setup(1, 2 * W + 3, Kind::Double);
            let f = tch::no_grad(|| s.features());
            let naive = lolcats::naive(&s.inputs(&f), &cfg(shape)).unwrap();
            let small = LolcatsConfig {
                chunk_size: chunk,
                ..cfg(shape)
            };
            let (chunked, _) = lolcats::chunked(&s.inputs(&f), &small, None).unwrap();
            assert_close(&format!("{shape:?} chunk {chunk}"), &chunked, &naive, 1e-10);
        }
    }
}

fn assert_same_state(what: &str, a: &LolcatsState, b: &LolcatsState) {
    assert_eq!(a.pos, b.pos, "{what}: pos");
    assert_close(&format!("{what}: k cache"), &a.k, &b.k, 1e-6);
    assert_close(&format!("{what}: phi_k cache"), &a.phi_k, &b.phi_k, 1e-6);
    assert_close(&format!("{what}: v cache"), &a.v, &b.v, 1e-6);
    assert_close(
        &format!("{what}: linear kv"),
        &a.linear.kv,
        &b.linear.kv,
        1e-5,
    );
    assert_close(
        &format!("{what}: linear k_sum"),
        &a.linear.k_sum,
        &b.linear.k_sum,
        1e-5,
    );
}

#[test]
fn recurrent_matches_chunked_and_their_states_agree() {
    seed(13);
    for shape in SHAPES {
        for len in lengths(W, CHUNK) {
            let s = setup(3, len, Kind::Float);
            let f = tch::no_grad(|| s.features());
            let (chunked, end_c) =
                tch::no_grad(|| lolcats::chunked(&s.inputs(&f), &cfg(shape), None)).unwrap();
            let (recurrent, end_r) =
                tch::no_grad(|| lolcats::recurrent(&s.inputs(&f), &cfg(shape), None)).unwrap();
            assert_close(&format!("{shape:?} len {len}"), &recurrent, &chunked, 1e-5);
            assert_same_state(&format!("{shape:?} len {len}"), &end_r, &end_c);
            assert_eq!(end_c.cached(), len.min(cfg(shape).window().reach()));
        }
    }
}

#[test]
fn prefill_then_decode_matches_the_full_sequence() {
    seed(14);
    let len = 3 * CHUNK + 5;
    for shape in SHAPES {
        let s = setup(2, len, Kind::Float);
        let f = tch::no_grad(|| s.features());
        let (full, _) =
            tch::no_grad(|| lolcats::chunked(&s.inputs(&f), &cfg(shape), None)).unwrap();
        let sequence = s.sequence(&f);
        for split in [1, 5, W, W + 3, CHUNK + 1, len - 1] {
            let (first, rest) = (
                sequence.narrow(0, split),
                sequence.narrow(split, len - split),
            );
            let (head, tail) = (s.inputs_of(&first), s.inputs_of(&rest));
            tch::no_grad(|| {
                let (y0, state) = lolcats::chunked(&head, &cfg(shape), None).unwrap();
                let (decoded, _) =
                    lolcats::recurrent(&tail, &cfg(shape), Some(state.shallow_clone())).unwrap();
                let (continued, _) = lolcats::chunked(&tail, &cfg(shape), Some(&state)).unwrap();
                let what = format!("{shape:?} split {split}");
                assert_close(
                    &format!("{what}: prefill"),
                    &y0,
                    &full.narrow(2, 0, split),
                    1e-5,
                );
                assert_close(
                    &format!("{what}: decode"),
                    &decoded,
                    &full.narrow(2, split, len - split),
                    1e-5,
                );
                assert_close(
                    &format!("{what}: continued"),
                    &continued,
                    &full.narrow(2, split, len - split),
                    1e-5,
                );
            });
        }
    }
}

#[test]
fn defaults_chunked_matches_naive() {
    seed(15);
    for shape in SHAPES {
        let s = setup(1, 200, Kind::Float);
        let f = tch::no_grad(|| s.features());
        let cfg = LolcatsConfig {
            window_shape: shape,
            ..Default::default()
        };
        assert_eq!((cfg.window_size, cfg.chunk_size), (64, 64));
        let naive = lolcats::naive(&s.inputs(&f), &cfg).unwrap();
        let (chunked, _) = lolcats::chunked(&s.inputs(&f), &cfg, None).unwrap();
        assert_same_grads(
            &format!("defaults {shape:?}"),
            &chunked,
            &naive,
            &[("q", &s.q), ("k", &s.k), ("v", &s.v)],
            1e-5,
        );
    }
}

#[test]
fn window_factors_start_at_a_tenth() {
    let vs = nn::VarStore::new(Device::Cpu);
    let factors = WindowFactors::new(&(vs.root() / "layer"), 3);
    let gamma = factors.logits.sigmoid();
    assert_close(
        "gamma",
        &gamma,
        &Tensor::from_slice(&[0.1f32, 0.1, 0.1]),
        1e-4,
    );
    assert!(vs.variables().contains_key("layer.window_factors"));
}

#[test]
fn bf16_inputs_accumulate_in_f32() {
    seed(16);
    let s = setup(2, 3 * CHUNK + 5, Kind::Float);
    let f = tch::no_grad(|| s.features());
    let cfg = cfg(WindowShape::Sw);
    let (reference, _) = tch::no_grad(|| lolcats::chunked(&s.inputs(&f), &cfg, None)).unwrap();
    let bf = |x: &Tensor| x.detach().to_kind(Kind::BFloat16);
    let (q, k, v, pq, pk) = (bf(&s.q), bf(&s.k), bf(&s.v), bf(&f.phi_q), bf(&f.phi_k));
    let x = LolcatsInputs {
        q: &q,
        k: &k,
        v: &v,
        phi_q: &pq,
        phi_k: &pk,
        window_factors: &s.factors.logits,
    };
    let (out, state) = lolcats::chunked(&x, &cfg, None).unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    assert_eq!(state.linear.kv.kind(), Kind::Float);
    assert_close("bf16 vs f32", &out, &reference, 3e-2);
}

#[test]
fn a_state_from_another_window_is_rejected() {
    seed(17);
    let s = setup(1, 20, Kind::Float);
    let f = tch::no_grad(|| s.features());
    let (_, state) =
        tch::no_grad(|| lolcats::chunked(&s.inputs(&f), &cfg(WindowShape::Tk), None)).unwrap();
    let err = lolcats::chunked(&s.inputs(&f), &cfg(WindowShape::Sw), Some(&state))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("state.k:"), "{err}");
}

/// Output and gradient bound of the f16 / bf16 chunked form against the f32 naive form on the
/// same values: the rounding of the feature maps' outputs, of the matmul operands and results
/// and of the output (bf16 keeps 8 significant bits).
const LOW_PRECISION_TOL: f64 = 3e-2;

/// Bound on q's and k's gradients by [`rms_err`]. The scores come back from the matmul rounded,
/// so where two window scores lie within rounding of each other the max picks another key than
/// in f32 (or splits a tie), and the max's share of the gradient goes to that key: a few rows
/// differ by O(1) (2e-2 by rms in this test, 5e-2 by max; 3e-3 with f32 scores). LoLCATs' own
/// bf16 code rounds its scores the same way.
const LOW_PRECISION_QK_RMS_TOL: f64 = 5e-2;

#[test]
fn low_precision_chunked_matches_the_f32_naive_with_gradients() {
    seed(18);
    for low in LOW_PRECISION {
        for shape in SHAPES {
            let s = setup(2, 3 * CHUNK + 5, Kind::Float);
            let (q, q32) = rounded(&s.q, low);
            let (k, k32) = rounded(&s.k, low);
            let (v, v32) = rounded(&s.v, low);
            let run = |q: &Tensor, k: &Tensor, v: &Tensor| {
                let (phi_q, phi_k) = (s.map_q.forward(q).unwrap(), s.map_k.forward(k).unwrap());
                let x = LolcatsInputs {
                    q,
                    k,
                    v,
                    phi_q: &phi_q,
                    phi_k: &phi_k,
                    window_factors: &s.factors.logits,
                };
                if q.kind() == Kind::Float {
                    lolcats::naive(&x, &cfg(shape)).unwrap()
                } else {
                    let (y, state) = lolcats::chunked(&x, &cfg(shape), None).unwrap();
                    assert_eq!(state.linear.kv.kind(), Kind::Float);
                    y
                }
            };
            let (out, reference) = (run(&q, &k, &v), run(&q32, &k32, &v32));
            let params = s.params();
            let mut low_inputs: Vec<(&str, &Tensor)> = vec![("q", &q), ("k", &k), ("v", &v)];
            low_inputs.extend(params.iter().map(|(n, t)| (n.as_str(), t)));
            let mut ref_inputs = vec![&q32, &k32, &v32];
            ref_inputs.extend(params.iter().map(|(_, t)| t));
            let what = format!("{low:?} {shape:?}");
            let grads = low_precision_grads(
                &what,
                &out,
                &low_inputs,
                &reference,
                &ref_inputs,
                LOW_PRECISION_TOL,
            );
            for ((name, _), (g, r)) in low_inputs.iter().zip(&grads) {
                let what = format!("{what}: grad {name}");
                if ["q", "k"].contains(name) {
                    let err = rms_err(g, r);
                    assert!(err <= LOW_PRECISION_QK_RMS_TOL, "{what}: rms error {err:e}");
                } else {
                    assert_close(&what, g, r, LOW_PRECISION_TOL);
                }
            }
        }
    }
}

#[test]
fn f16_linear_sums_beyond_the_f16_range_stay_accurate() {
    seed(19);
    // Values near 1000 over 1000 tokens: the linear sums reach about 1e5, past f16's 65504, while
    // every output (an average of values) stays near 1000.
    let len = 1000;
    let s = setup(1, len, Kind::Float);
    let f = tch::no_grad(|| s.features());
    let half = |x: &Tensor| x.detach().to_kind(Kind::Half);
    let v = (randn(&[1, KV_HEADS, len, D], Kind::Float) * 10.0 + 1000.0).to_kind(Kind::Half);
    let (q, k, pq, pk) = (half(&s.q), half(&s.k), half(&f.phi_q), half(&f.phi_k));
    let x = LolcatsInputs {
        q: &q,
        k: &k,
        v: &v,
        phi_q: &pq,
        phi_k: &pk,
        window_factors: &s.factors.logits,
    };
    let (out, _) = tch::no_grad(|| lolcats::chunked(&x, &cfg(WindowShape::Sw), None)).unwrap();
    assert_finite("output", &out);
    let float = |x: &Tensor| x.to_kind(Kind::Float);
    let (q, k, v, pq, pk) = (float(&q), float(&k), float(&v), float(&pq), float(&pk));
    let x = LolcatsInputs {
        q: &q,
        k: &k,
        v: &v,
        phi_q: &pq,
        phi_k: &pk,
        window_factors: &s.factors.logits,
    };
    let reference = tch::no_grad(|| lolcats::naive(&x, &cfg(WindowShape::Sw))).unwrap();
    assert_close("f16 vs f32", &out, &reference, 1e-3);
}

#[test]
fn steps_at_a_device_position_ignore_a_frozen_host_count() {
    // Under a CUDA graph the host count stays at its value at capture while the position on the
    // device advances: with the position given, every step must still match the full pass. The
    // terrace window (tk) depends on the absolute position, so a stale count would show. The
    // prefix fills the window cache first, as a graph's capture needs.
    seed(16);
    let len = 4 * W + 3;
    let prefix = 2 * W + 1;
    for shape in SHAPES {
        let s = setup(2, len, Kind::Float);
        let f = tch::no_grad(|| s.features());
        let (full, _) =
            tch::no_grad(|| lolcats::chunked(&s.inputs(&f), &cfg(shape), None)).unwrap();
        let sequence = s.sequence(&f);
        let first = sequence.narrow(0, prefix);
        let prefill = s.inputs_of(&first);
        tch::no_grad(|| {
            let (_, mut state) = lolcats::chunked(&prefill, &cfg(shape), None).unwrap();
            let frozen = state.pos;
            for t in prefix..len {
                let token = sequence.narrow(t, 1);
                let one = s.inputs_of(&token);
                state.pos = frozen;
                let position = Tensor::from(t);
                let y = lolcats::step(&mut state, &one, &cfg(shape), Some(&position)).unwrap();
                assert_close(
                    &format!("{shape:?} token {t}"),
                    &y,
                    &full.narrow(2, t, 1),
                    1e-5,
                );
            }
        });
    }
}

/// The fused CUDA kernels against the naive form in f64 on the same bf16 inputs: output and
/// gradients to every input (or, as attention transfer calls them, to φq, φk and the window
/// factors only), for both window shapes, with GQA, ragged lengths, windows of one to three
/// chunks, every compiled head and feature size, and without and with sinks (one, four, and more
/// than a chunk of them; the sinks' key features are random, which the kernels must ignore). On a
/// GPU machine:
/// `cargo test --release -p linearize-attention --test lolcats -- --ignored`.
#[test]
#[ignore = "needs a CUDA device"]
fn fused_kernels_match_naive_on_cuda() {
    use linearize_torch_ext::lolcats as fused;
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device: this test is for a GPU machine"
    );
    let dev = Device::Cuda(0);
    let sizes = [
        // batch, heads, kv heads, length, head size, features, window, q/k/v gradients, sinks
        (2, 4, 2, 300, 64, 128, 64, true, 0),
        (2, 4, 2, 300, 64, 128, 64, false, 0),
        (1, 4, 1, 200, 128, 128, 128, true, 0),
        (1, 2, 2, 50, 128, 64, 64, false, 0),
        (2, 8, 2, 1024, 128, 256, 64, true, 0),
        (1, 3, 1, 329, 64, 64, 192, true, 0),
        (2, 4, 2, 300, 64, 128, 64, true, 4),
        (2, 4, 2, 300, 64, 128, 64, false, 4),
        (1, 2, 2, 50, 128, 64, 64, true, 4),
        (2, 8, 2, 1024, 128, 256, 64, true, 1),
        (1, 3, 1, 329, 64, 64, 192, true, 4),
        (1, 4, 2, 700, 64, 128, 128, false, 70),
    ];
    let cases = SHAPES
        .iter()
        .flat_map(|&shape| sizes.map(|size| (shape, size)));
    for (i, (shape, (b, h, hk, len, d, f, w, qkv_grads, sinks))) in cases.enumerate() {
        seed(40 + i as i64);
        let bf16 = |shape: &[i64]| {
            Tensor::randn(shape, (Kind::Float, dev))
                .to_kind(Kind::BFloat16)
                .set_requires_grad(qkv_grads)
        };
        let features = |shape: &[i64]| {
            Tensor::randn(shape, (Kind::Float, dev))
                .softmax(-1, Kind::Float)
                .to_kind(Kind::BFloat16)
                .set_requires_grad(true)
        };
        let (q, k, v) = (
            bf16(&[b, h, len, d]),
            bf16(&[b, hk, len, d]),
            bf16(&[b, hk, len, d]),
        );
        let (phi_q, phi_k) = (features(&[b, h, len, f]), features(&[b, h, len, f]));
        let logits = (Tensor::rand([h], (Kind::Float, dev)) * 3.0 - 2.0).set_requires_grad(true);
        let cfg = LolcatsConfig {
            window_shape: shape,
            window_size: w,
            chunk_size: 64,
            fused: true,
            sinks,
        };
        let window = match shape {
            WindowShape::Sw => fused::Window::Sw(w),
            WindowShape::Tk => fused::Window::Tk(w),
        };
        let gammas = logits.sigmoid();
        let call = fused::LolcatsInputs {
            q: &q,
            k: &k,
            v: &v,
            phi_q: &phi_q,
            phi_k: &phi_k,
            gammas: &gammas,
        };
        assert_eq!(fused::unsupported(&call, window), None, "case {i}");
        let inputs = LolcatsInputs {
            q: &q,
            k: &k,
            v: &v,
            phi_q: &phi_q,
            phi_k: &phi_k,
            window_factors: &logits,
        };
        let y = lolcats::chunked_output(&inputs, &cfg).unwrap();
        // A prefill (which also builds the state) takes the same kernels.
        let (prefill, _) = lolcats::chunked(&inputs, &cfg, None).unwrap();
        assert!(prefill.equal(&y), "case {i}: prefill output differs");

        let f64_leaf = |t: &Tensor| {
            t.detach()
                .to_kind(Kind::Double)
                .set_requires_grad(t.requires_grad())
        };
        let ours = [&q, &k, &v, &phi_q, &phi_k, &logits];
        let theirs = ours.map(f64_leaf);
        let reference = lolcats::naive(
            &LolcatsInputs {
                q: &theirs[0],
                k: &theirs[1],
                v: &theirs[2],
                phi_q: &theirs[3],
                phi_k: &theirs[4],
                window_factors: &theirs[5],
            },
            &cfg,
        )
        .unwrap();
        let what = format!(
            "case {i} ({shape:?}, b {b}, h {h}/{hk}, L {len}, d {d}, f {f}, w {w}, sinks {sinks})"
        );
        assert_close(&format!("{what}: output"), &y, &reference, 2e-2);
        let names = ["q", "k", "v", "phi_q", "phi_k", "window factors"];
        let trained: Vec<usize> = (0..6).filter(|&j| ours[j].requires_grad()).collect();
        assert_eq!(trained.len(), if qkv_grads { 6 } else { 3 });
        let probe = reference.randn_like();
        let got = grads(
            &y,
            &probe.to_kind(Kind::BFloat16),
            &trained.iter().map(|&j| ours[j]).collect::<Vec<_>>(),
        );
        let want = grads(
            &reference,
            &probe,
            &trained.iter().map(|&j| &theirs[j]).collect::<Vec<_>>(),
        );
        for (j, (g, e)) in trained.iter().zip(got.iter().zip(&want)) {
            let err = (g.to_kind(Kind::Double) - e).abs().max().double_value(&[])
                / e.abs().max().double_value(&[]).max(1e-6);
            assert!(
                err < 3e-2,
                "{what}: grad {}: relative error {err:e}",
                names[*j]
            );
        }
    }
}

/// The fused kernels leave calls they do not cover to the libtorch kernels, and say why.
#[test]
fn fused_kernels_decline_what_they_do_not_cover() {
    use linearize_torch_ext::lolcats as fused;
    seed(3);
    let s = setup(1, 70, Kind::Float);
    let f = s.features();
    let gammas = s.factors.logits.sigmoid();
    let call = fused::LolcatsInputs {
        q: &s.q,
        k: &s.k,
        v: &s.v,
        phi_q: &f.phi_q,
        phi_k: &f.phi_k,
        gammas: &gammas,
    };
    let why = fused::unsupported(&call, fused::Window::Sw(64)).expect("the CPU is not covered");
    assert!(why.contains("CUDA"), "{why}");
    let mut cfg = cfg(WindowShape::Sw);
    let with = lolcats::chunked_output(&s.inputs(&f), &cfg).unwrap();
    cfg.fused = false;
    let without = lolcats::chunked_output(&s.inputs(&f), &cfg).unwrap();
    assert!(with.equal(&without));
}

#[test]
fn sinks_chunked_matches_naive_forward_and_gradients() {
    seed(50);
    for kind in [Kind::Float, Kind::Double] {
        let tol = if kind == Kind::Float { 1e-5 } else { 1e-10 };
        for shape in SHAPES {
            for sinks in SINKS {
                for len in lengths(W, CHUNK) {
                    for chunk in [5, CHUNK] {
                        let c = LolcatsConfig {
                            chunk_size: chunk,
                            ..with_sinks(shape, sinks)
                        };
                        let s = setup(2, len, kind);
                        let f = s.features();
                        let naive = lolcats::naive(&s.inputs(&f), &c).unwrap();
                        let (chunked, _) = lolcats::chunked(&s.inputs(&f), &c, None).unwrap();
                        let params = s.params();
                        let mut inputs: Vec<(&str, &Tensor)> =
                            vec![("q", &s.q), ("k", &s.k), ("v", &s.v)];
                        inputs.extend(params.iter().map(|(n, t)| (n.as_str(), t)));
                        assert_same_grads(
                            &format!("{kind:?} {shape:?} sinks {sinks} len {len} chunk {chunk}"),
                            &chunked,
                            &naive,
                            &inputs,
                            tol,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn sinks_attention_transfer_gradients_match_the_naive_form() {
    // The split path of a fresh call (q, k, v without gradient) with sinks.
    seed(51);
    for shape in SHAPES {
        for sinks in SINKS {
            for len in lengths(W, CHUNK) {
                let s = setup(2, len, Kind::Float);
                let sequence = s.sequence_with(Tensor::detach);
                let x = s.inputs_of(&sequence);
                let c = with_sinks(shape, sinks);
                let naive = lolcats::naive(&x, &c).unwrap();
                let chunked = lolcats::chunked_output(&x, &c).unwrap();
                let params = s.params();
                let inputs: Vec<(&str, &Tensor)> =
                    params.iter().map(|(n, t)| (n.as_str(), t)).collect();
                assert_same_grads(
                    &format!("{shape:?} sinks {sinks} len {len}"),
                    &chunked,
                    &naive,
                    &inputs,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn sinks_recurrent_and_prefill_then_decode_match_the_full_sequence() {
    seed(52);
    let len = 3 * CHUNK + 5;
    for shape in SHAPES {
        for sinks in SINKS {
            let c = with_sinks(shape, sinks);
            let s = setup(2, len, Kind::Float);
            let f = tch::no_grad(|| s.features());
            let sequence = s.sequence(&f);
            tch::no_grad(|| {
                let (full, end_c) = lolcats::chunked(&s.inputs(&f), &c, None).unwrap();
                let (recurrent, end_r) = lolcats::recurrent(&s.inputs(&f), &c, None).unwrap();
                let what = format!("{shape:?} sinks {sinks}");
                assert_close(&format!("{what}: recurrent"), &recurrent, &full, 1e-5);
                assert_same_state(&what, &end_r, &end_c);
                assert_eq!(end_c.sinks.len(), sinks);
                assert_close("sink keys", &end_c.sinks.k, &s.k.narrow(2, 0, sinks), 0.0);
                assert_close("sink values", &end_r.sinks.v, &end_c.sinks.v, 0.0);
                for split in [1, 2, 5, W, W + 3, 2 * W + 4, CHUNK + 1, len - 1] {
                    let (first, rest) = (
                        sequence.narrow(0, split),
                        sequence.narrow(split, len - split),
                    );
                    let (head, tail) = (s.inputs_of(&first), s.inputs_of(&rest));
                    let (y0, state) = lolcats::chunked(&head, &c, None).unwrap();
                    assert_eq!(state.sinks.len(), split.min(sinks));
                    let (decoded, _) =
                        lolcats::recurrent(&tail, &c, Some(state.shallow_clone())).unwrap();
                    let (continued, _) = lolcats::chunked(&tail, &c, Some(&state)).unwrap();
                    let what = format!("{what} split {split}");
                    let want = full.narrow(2, split, len - split);
                    assert_close(
                        &format!("{what}: prefill"),
                        &y0,
                        &full.narrow(2, 0, split),
                        1e-5,
                    );
                    assert_close(&format!("{what}: decode"), &decoded, &want, 1e-5);
                    assert_close(&format!("{what}: continued"), &continued, &want, 1e-5);
                }
            });
        }
    }
}

#[test]
fn sinks_change_the_output_only_where_a_sink_left_the_window() {
    // Queries whose window still holds every sink (t < w for sw) see the same keys either way.
    seed(53);
    let s = setup(1, 3 * W, Kind::Double);
    let f = tch::no_grad(|| s.features());
    let (plain, _) = lolcats::chunked(&s.inputs(&f), &cfg(WindowShape::Sw), None).unwrap();
    let (sinks, _) =
        lolcats::chunked(&s.inputs(&f), &with_sinks(WindowShape::Sw, 2), None).unwrap();
    assert_close(
        "inside",
        &sinks.narrow(2, 0, W),
        &plain.narrow(2, 0, W),
        1e-12,
    );
    assert!(rel_err(&sinks.narrow(2, W, 2 * W), &plain.narrow(2, W, 2 * W)) > 1e-6);
}

/// With sinks, a config that takes the fused CUDA kernels and one that takes the libtorch chunked
/// form (`fused: false`) give different roundings of the same function: both match the naive form
/// in f64, output and every gradient, both window shapes.
/// `cargo test --release -p linearize-attention --test lolcats -- --ignored`.
#[test]
#[ignore = "needs a CUDA device"]
fn sinks_fused_kernels_match_the_libtorch_chunked_form_on_cuda() {
    use linearize_torch_ext::lolcats as fused;
    assert!(tch::Cuda::is_available(), "no CUDA device");
    seed(54);
    let dev = Device::Cuda(0);
    let (b, h, hk, len, d, f) = (2, 4, 2, 333, 64, 128);
    let bf16 = |shape: &[i64]| {
        Tensor::randn(shape, (Kind::Float, dev))
            .to_kind(Kind::BFloat16)
            .set_requires_grad(true)
    };
    let (q, k, v) = (
        bf16(&[b, h, len, d]),
        bf16(&[b, hk, len, d]),
        bf16(&[b, hk, len, d]),
    );
    let feats = |shape: &[i64]| {
        Tensor::randn(shape, (Kind::Float, dev))
            .softmax(-1, Kind::Float)
            .to_kind(Kind::BFloat16)
            .set_requires_grad(true)
    };
    let (phi_q, phi_k) = (feats(&[b, h, len, f]), feats(&[b, h, len, f]));
    let logits = (Tensor::rand([h], (Kind::Float, dev)) * 3.0 - 2.0).set_requires_grad(true);
    let x = LolcatsInputs {
        q: &q,
        k: &k,
        v: &v,
        phi_q: &phi_q,
        phi_k: &phi_k,
        window_factors: &logits,
    };
    let leaves = [&q, &k, &v, &phi_q, &phi_k, &logits];
    let f64_leaves = leaves.map(|t| t.detach().to_kind(Kind::Double).set_requires_grad(true));
    let names = ["q", "k", "v", "phi_q", "phi_k", "window factors"];
    for shape in SHAPES {
        let fused_cfg = LolcatsConfig {
            window_shape: shape,
            window_size: 64,
            chunk_size: 64,
            fused: true,
            sinks: 4,
        };
        let unfused = LolcatsConfig {
            fused: false,
            ..fused_cfg
        };
        let gammas = logits.sigmoid();
        let call = fused::LolcatsInputs {
            q: &q,
            k: &k,
            v: &v,
            phi_q: &phi_q,
            phi_k: &phi_k,
            gammas: &gammas,
        };
        let window = match shape {
            WindowShape::Sw => fused::Window::Sw(64),
            WindowShape::Tk => fused::Window::Tk(64),
        };
        assert_eq!(fused::unsupported(&call, window), None, "{shape:?}");
        let y = lolcats::chunked_output(&x, &fused_cfg).unwrap();
        let want = lolcats::chunked_output(&x, &unfused).unwrap();
        assert!(
            !y.equal(&want),
            "{shape:?}: sinks did not take the fused kernels"
        );
        let reference = lolcats::naive(
            &LolcatsInputs {
                q: &f64_leaves[0],
                k: &f64_leaves[1],
                v: &f64_leaves[2],
                phi_q: &f64_leaves[3],
                phi_k: &f64_leaves[4],
                window_factors: &f64_leaves[5],
            },
            &unfused,
        )
        .unwrap();
        let probe = reference.randn_like();
        let expected = grads(&reference, &probe, &f64_leaves.each_ref());
        // The fused form is held to the error relative to each gradient's largest entry (as in
        // `fused_kernels_match_naive_on_cuda`), the libtorch form to the bf16 chunked tests'
        // `rel_err` (relative above 1, absolute below).
        let strict = |g: &Tensor, e: &Tensor| {
            (g.to_kind(Kind::Double) - e).abs().max().double_value(&[])
                / e.abs().max().double_value(&[]).max(1e-6)
        };
        for (form, out) in [("fused", &y), ("libtorch", &want)] {
            assert_close(&format!("{shape:?} {form}: output"), out, &reference, 2e-2);
            let got = grads(out, &probe.to_kind(Kind::BFloat16), &leaves);
            for ((name, g), e) in names.iter().zip(&got).zip(&expected) {
                let err = match form {
                    "fused" => strict(g, e),
                    _ => rel_err(g, e),
                };
                assert!(
                    err < 3e-2,
                    "{shape:?} {form}: grad {name}: relative error {err:e}"
                );
            }
        }
    }
}
