//! Gated DeltaNet behind a softmax window: the naive (per-token definition), chunked (window
//! SDPA + Gated DeltaNet's chunked kernel on shifted queries) and recurrent forms agree in values
//! and gradients, with and without sinks, for lengths around the window and the chunk, chunks
//! smaller than the window and a one-token window; decoding from a prefill continues the full
//! pass; strong decays and β near 1 stay finite; with the delta term off the output is the
//! window-and-sinks softmax exactly.
mod common;

use common::*;
use linearize_attention::ops::gated_deltanet::l2_normalize;
use linearize_attention::ops::gdn_window::{
    self, GdnWindowConfig, GdnWindowInputs, GdnWindowState,
};
use linearize_attention::ops::swa::{self, SwaConfig};
use tch::{Device, Kind, Tensor};

const D: i64 = 16;
const DV: i64 = 8;
const W: i64 = 8;
const CHUNK: i64 = 16;
const HEADS: i64 = 4;
const SINKS: [i64; 2] = [0, 3];

fn cfg(sinks: i64) -> GdnWindowConfig {
    GdnWindowConfig {
        window_size: W,
        chunk_size: CHUNK,
        sinks,
    }
}

/// Leaves for one call: 4 query heads; 2 key / value heads for the window and the memory keys;
/// log-decays for 4 heads and β for 2 (every GQA repeat is exercised). Memory queries and keys
/// are unit vectors, as the layer feeds them.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    delta_q: Tensor,
    delta_k: Tensor,
    g: Tensor,
    beta: Tensor,
    delta_scale: Tensor,
}

/// `g` uniform in [g_min, 0] per token, β uniform in [beta_min, 1], scales N(0, 1).
fn inputs(batch: i64, len: i64, kind: Kind, g_min: f64, beta_min: f64) -> Inputs {
    let leaf_of = |t: Tensor| t.detach().set_requires_grad(true);
    let uniform =
        |shape: &[i64], lo: f64, hi: f64| Tensor::rand(shape, (kind, Device::Cpu)) * (hi - lo) + lo;
    Inputs {
        q: leaf(&[batch, HEADS, len, D], kind),
        k: leaf(&[batch, 2, len, D], kind),
        v: leaf(&[batch, 2, len, DV], kind),
        delta_q: leaf_of(l2_normalize(&randn(&[batch, HEADS, len, D], kind)).unwrap()),
        delta_k: leaf_of(l2_normalize(&randn(&[batch, 2, len, D], kind)).unwrap()),
        g: leaf_of(uniform(&[batch, HEADS, len], g_min, 0.0)),
        beta: leaf_of(uniform(&[batch, 2, len], beta_min, 1.0)),
        delta_scale: leaf(&[HEADS], kind),
    }
}

impl Inputs {
    fn call(&self) -> GdnWindowInputs<'_> {
        GdnWindowInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            delta_q: &self.delta_q,
            delta_k: &self.delta_k,
            g: &self.g,
            beta: &self.beta,
            delta_scale: &self.delta_scale,
        }
    }

    fn named(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
            ("delta_q", &self.delta_q),
            ("delta_k", &self.delta_k),
            ("g", &self.g),
            ("beta", &self.beta),
            ("delta_scale", &self.delta_scale),
        ]
    }

    fn naive(&self, c: &GdnWindowConfig) -> Tensor {
        gdn_window::naive(&self.call(), c).unwrap()
    }

    fn chunked(
        &self,
        c: &GdnWindowConfig,
        state: Option<&GdnWindowState>,
    ) -> (Tensor, GdnWindowState) {
        gdn_window::chunked(&self.call(), c, state).unwrap()
    }

    fn recurrent(
        &self,
        c: &GdnWindowConfig,
        state: Option<GdnWindowState>,
    ) -> (Tensor, GdnWindowState) {
        gdn_window::recurrent(&self.call(), c, state).unwrap()
    }

    /// Tokens `from .. from + n` (as leaves of their own; the scales shared).
    fn part(&self, from: i64, n: i64) -> Self {
        let cut = |t: &Tensor| t.narrow(2, from, n).detach().set_requires_grad(true);
        Self {
            q: cut(&self.q),
            k: cut(&self.k),
            v: cut(&self.v),
            delta_q: cut(&self.delta_q),
            delta_k: cut(&self.delta_k),
            g: cut(&self.g),
            beta: cut(&self.beta),
            delta_scale: self.delta_scale.shallow_clone(),
        }
    }
}

fn assert_same_state(what: &str, a: &GdnWindowState, b: &GdnWindowState, tol: f64) {
    assert_eq!(a.pos(), b.pos(), "{what}: positions");
    for (name, x, y) in [
        ("window.k", &a.window.k, &b.window.k),
        ("window.v", &a.window.v, &b.window.v),
        ("sinks.k", &a.window.sinks.k, &b.window.sinks.k),
        ("sinks.v", &a.window.sinks.v, &b.window.sinks.v),
        ("delta_k", &a.delta_k, &b.delta_k),
        ("g", &a.g, &b.g),
        ("beta", &a.beta, &b.beta),
        ("delta.s", &a.delta.s, &b.delta.s),
    ] {
        assert_eq!(x.size(), y.size(), "{what}: state {name} shapes");
        if x.numel() > 0 {
            assert_close(&format!("{what}: state {name}"), x, y, tol);
        }
    }
}

#[test]
fn chunked_matches_naive_forward_and_gradients() {
    seed(50);
    for kind in [Kind::Float, Kind::Double] {
        let tol = if kind == Kind::Float { 2e-5 } else { 1e-10 };
        for sinks in SINKS {
            for len in lengths(W, CHUNK) {
                let x = inputs(2, len, kind, -1.0, 0.0);
                let c = cfg(sinks);
                let (chunked, _) = x.chunked(&c, None);
                assert_same_grads(
                    &format!("{kind:?} sinks {sinks} len {len}"),
                    &chunked,
                    &x.naive(&c),
                    &x.named(),
                    tol,
                );
            }
        }
    }
}

#[test]
fn chunks_smaller_than_the_window_and_a_one_token_window() {
    seed(51);
    for (window_size, chunk_size) in [(W, 4), (W, 3), (1, 5), (2, 1), (W, W)] {
        for sinks in SINKS {
            let c = GdnWindowConfig {
                window_size,
                chunk_size,
                sinks,
            };
            for len in [1, window_size, 3 * W + 2] {
                let x = inputs(1, len, Kind::Double, -1.0, 0.0);
                let (chunked, _) = x.chunked(&c, None);
                assert_same_grads(
                    &format!("w {window_size} chunk {chunk_size} sinks {sinks} len {len}"),
                    &chunked,
                    &x.naive(&c),
                    &x.named(),
                    1e-10,
                );
            }
        }
    }
}

#[test]
fn recurrent_matches_naive_and_chunked_and_their_states_agree() {
    seed(52);
    for sinks in SINKS {
        for len in lengths(W, CHUNK) {
            let x = inputs(2, len, Kind::Double, -1.0, 0.0);
            let c = cfg(sinks);
            let (chunked, end_c) = x.chunked(&c, None);
            let (recurrent, end_r) = x.recurrent(&c, None);
            let what = format!("sinks {sinks} len {len}");
            assert_same_grads(
                &format!("{what}: recurrent vs naive"),
                &recurrent,
                &x.naive(&c),
                &x.named(),
                1e-10,
            );
            assert_close(&what, &recurrent, &chunked, 1e-10);
            assert_same_state(&what, &end_r, &end_c, 1e-10);
        }
    }
}

#[test]
fn prefill_then_decode_matches_the_full_sequence() {
    seed(53);
    let len = 3 * CHUNK + 5;
    for sinks in SINKS {
        let c = cfg(sinks);
        let x = inputs(2, len, Kind::Float, -1.0, 0.0);
        let (full, end) = tch::no_grad(|| x.chunked(&c, None));
        for split in [1, 3, W - 1, W, W + 3, CHUNK + 1, len - 1] {
            let (head, tail) = (x.part(0, split), x.part(split, len - split));
            tch::no_grad(|| {
                let (y0, state) = head.chunked(&c, None);
                // Decoding under no_grad takes the in-place updates (rings, delta state).
                let (decoded, end_decoded) = tail.recurrent(&c, Some(state.shallow_clone()));
                let (continued, end_continued) = tail.chunked(&c, Some(&state));
                let what = format!("sinks {sinks} split {split}");
                let rest = full.narrow(2, split, len - split);
                assert_close(
                    &format!("{what}: prefill"),
                    &y0,
                    &full.narrow(2, 0, split),
                    1e-5,
                );
                assert_close(&format!("{what}: decode"), &decoded, &rest, 1e-5);
                assert_close(&format!("{what}: continued"), &continued, &rest, 1e-5);
                assert_same_state(&format!("{what}: decoded"), &end_decoded, &end, 1e-5);
                assert_same_state(&format!("{what}: continued"), &end_continued, &end, 1e-5);
            });
        }
    }
}

#[test]
fn prefill_gradients_reach_the_prefix_through_the_carried_state() {
    seed(54);
    let x = inputs(2, 2 * CHUNK + 3, Kind::Double, -0.1, 0.0);
    let c = cfg(2);
    let (head, tail) = (x.part(0, CHUNK + 3), x.part(CHUNK + 3, CHUNK));
    let (_, mid) = head.chunked(&c, None);
    let (y, _) = tail.chunked(&c, Some(&mid));
    let (full, _) = x.part(0, 2 * CHUNK + 3).chunked(&c, None);
    assert_close("continued", &y, &full.narrow(2, CHUNK + 3, CHUNK), 1e-10);
    // The prefix's first tokens are out of every tail query's window: only the memory carries
    // them.
    let probe = y.randn_like();
    let g = grads(&y, &probe, &[&head.delta_k, &head.v]);
    for (name, grad) in ["delta_k", "v"].iter().zip(&g) {
        let early = grad.narrow(2, 2, 4).abs().max().double_value(&[]);
        assert!(
            early > 1e-6,
            "prefix {name} gets no gradient through the state"
        );
    }
}

#[test]
fn strong_decays_and_beta_near_one_stay_finite_and_exact() {
    seed(55);
    let len = 3 * CHUNK + 5;
    // f64: g down to -20 per token and β in [0.999, 1].
    for sinks in SINKS {
        let c = cfg(sinks);
        let x = inputs(2, len, Kind::Double, -20.0, 0.999);
        let (chunked, state) = x.chunked(&c, None);
        assert_finite("state", &state.delta.s);
        assert_same_grads(
            &format!("f64 strong decays, sinks {sinks}"),
            &chunked,
            &x.naive(&c),
            &x.named(),
            1e-10,
        );
    }
    // f32, β exactly 1 and g exactly -20 everywhere, the default chunking.
    let x = inputs(2, len, Kind::Float, -1.0, 0.0);
    let fixed = |t: &Tensor, value: f64| (t.zeros_like() + value).set_requires_grad(true);
    let x = Inputs {
        g: fixed(&x.g, -20.0),
        beta: fixed(&x.beta, 1.0),
        ..x
    };
    let c = GdnWindowConfig {
        window_size: W,
        ..GdnWindowConfig::default()
    };
    let (chunked, state) = x.chunked(&c, None);
    assert_finite("state", &state.delta.s);
    let probe = chunked.randn_like();
    let named = x.named();
    let tensors: Vec<&Tensor> = named.iter().map(|(_, t)| *t).collect();
    for ((name, _), grad) in named.iter().zip(grads(&chunked, &probe, &tensors)) {
        assert_finite(&format!("grad {name}"), &grad);
    }
    assert_same_grads(
        "f32 g = -20, beta = 1",
        &chunked,
        &x.naive(&c),
        &named,
        2e-5,
    );
}

#[test]
fn with_the_delta_term_off_it_is_the_window_and_sinks_softmax_exactly() {
    seed(56);
    let len = 3 * CHUNK + 5;
    for sinks in SINKS {
        let c = cfg(sinks);
        let swa_cfg = SwaConfig {
            window_size: W,
            chunk_size: CHUNK,
            sinks,
        };
        let x = inputs(2, len, Kind::Float, -1.0, 0.0);
        let (window, _) = swa::chunked(&x.q, &x.k, &x.v, &swa_cfg, None).unwrap();
        // λ = 0, and separately β = 0 (nothing is ever written: the memory stays empty).
        let off = [
            Inputs {
                delta_scale: x.delta_scale.zeros_like(),
                ..x.part(0, len)
            },
            Inputs {
                beta: x.beta.zeros_like(),
                ..x.part(0, len)
            },
        ];
        for (what, x) in ["scale 0", "beta 0"].iter().zip(&off) {
            let (chunked, _) = x.chunked(&c, None);
            let (recurrent, _) = x.recurrent(&c, None);
            let what = format!("sinks {sinks} {what}");
            assert_eq!(
                (&chunked - &window).abs().max().double_value(&[]),
                0.0,
                "{what}: chunked"
            );
            assert_close(&format!("{what}: recurrent"), &recurrent, &window, 1e-6);
            assert_close(&format!("{what}: naive"), &x.naive(&c), &window, 1e-6);
        }
    }
}

#[test]
fn bf16_inputs_accumulate_in_f32() {
    seed(57);
    let x = inputs(2, 3 * CHUNK + 5, Kind::Float, -1.0, 0.0);
    let low = |t: &Tensor| t.detach().to_kind(Kind::BFloat16);
    let rounded = |t: &Tensor| low(t).to_kind(Kind::Float);
    let c = cfg(3);
    let (y_low, state) = gdn_window::chunked(
        &GdnWindowInputs {
            q: &low(&x.q),
            k: &low(&x.k),
            v: &low(&x.v),
            delta_q: &low(&x.delta_q),
            delta_k: &low(&x.delta_k),
            g: &x.g.detach(),
            beta: &x.beta.detach(),
            delta_scale: &x.delta_scale.detach(),
        },
        &c,
        None,
    )
    .unwrap();
    assert_eq!(y_low.kind(), Kind::BFloat16);
    assert_eq!(state.delta.s.kind(), Kind::Float);
    let reference = gdn_window::naive(
        &GdnWindowInputs {
            q: &rounded(&x.q),
            k: &rounded(&x.k),
            v: &rounded(&x.v),
            delta_q: &rounded(&x.delta_q),
            delta_k: &rounded(&x.delta_k),
            g: &x.g.detach(),
            beta: &x.beta.detach(),
            delta_scale: &x.delta_scale.detach(),
        },
        &c,
    )
    .unwrap();
    assert_close("bf16 vs f32 naive", &y_low, &reference, 3e-2);
}

#[test]
fn bad_inputs_and_states_are_rejected_with_the_tensor_named() {
    seed(58);
    let x = inputs(1, 2 * W, Kind::Float, -1.0, 0.0);
    let c = cfg(0);
    let err = |r: Result<(Tensor, GdnWindowState), linearize_attention::Error>| {
        r.map(|_| ()).unwrap_err().to_string()
    };
    let scale = Tensor::zeros([HEADS + 1], (Kind::Float, Device::Cpu));
    let e = err(gdn_window::chunked(
        &GdnWindowInputs {
            delta_scale: &scale,
            ..x.call()
        },
        &c,
        None,
    ));
    assert!(e.contains("delta_scale"), "{e}");
    let growing = x.g.detach().abs() + 0.5;
    let e = err(gdn_window::chunked(
        &GdnWindowInputs {
            g: &growing,
            ..x.call()
        },
        &c,
        None,
    ));
    assert!(e.contains("g:"), "{e}");
    // A state made for a window of 4 holds 3 cached tokens, not the 7 a window of 8 reads, and
    // one for a window of 8 more than a window of 4 keeps.
    let small = GdnWindowConfig {
        window_size: 4,
        ..c
    };
    for (made, used) in [(&small, &c), (&c, &small)] {
        let (_, state) = x.chunked(made, None);
        let e = err(gdn_window::chunked(&x.call(), used, Some(&state)));
        assert!(e.contains("state"), "{e}");
    }
    let e = GdnWindowConfig {
        window_size: 0,
        ..c
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("window size"), "{e}");
}
