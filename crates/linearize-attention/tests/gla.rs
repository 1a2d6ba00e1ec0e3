//! Gated linear attention: naive, chunked (log space) and recurrent forms agree, also for gates
//! that decay by 1e-6 per step or faster.
mod common;

use common::*;
use linearize_attention::ops::gla::{self, GlaConfig, GlaState};
use tch::{Kind, Tensor};

const D: i64 = 16;
const CHUNK: i64 = 16;

fn cfg() -> GlaConfig {
    GlaConfig {
        chunk_size: CHUNK,
        sub_chunk: 4,
    }
}

struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Gate logits; the log-gates are `logsigmoid(logits) / 16`, as Liger derives them.
    logits: Tensor,
}

fn inputs(batch: i64, len: i64, kind: Kind, logit_shift: f64) -> Inputs {
    Inputs {
        q: leaf(&[batch, 4, len, D], kind),
        k: leaf(&[batch, 2, len, D], kind),
        v: leaf(&[batch, 2, len, 8], kind),
        logits: (randn(&[batch, 2, len, D], kind) * 4.0 + logit_shift).set_requires_grad(true),
    }
}

impl Inputs {
    fn gates(&self) -> Tensor {
        self.logits.log_sigmoid() / 16.0
    }

    fn named(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
            ("gate logits", &self.logits),
        ]
    }
}

#[test]
fn chunked_matches_naive_forward_and_gradients() {
    seed(30);
    for kind in [Kind::Float, Kind::Double] {
        let tol = if kind == Kind::Float { 1e-5 } else { 1e-10 };
        for len in lengths(8, CHUNK) {
            for shift in [0.0, -60.0] {
                let x = inputs(2, len, kind, shift);
                let g = x.gates();
                let naive = gla::naive(&x.q, &x.k, &x.v, &g).unwrap();
                let (chunked, _) = gla::chunked(&x.q, &x.k, &x.v, &g, &cfg(), None).unwrap();
                assert_same_grads(
                    &format!("{kind:?} len {len} shift {shift}"),
                    &chunked,
                    &naive,
                    &x.named(),
                    tol,
                );
            }
        }
    }
}

#[test]
fn recurrent_matches_chunked_and_their_states_agree() {
    seed(31);
    for len in lengths(8, CHUNK) {
        let x = inputs(3, len, Kind::Float, 0.0);
        let g = x.gates();
        let (chunked, end_c) = gla::chunked(&x.q, &x.k, &x.v, &g, &cfg(), None).unwrap();
        let (recurrent, end_r) = gla::recurrent(&x.q, &x.k, &x.v, &g, None).unwrap();
        assert_close(&format!("len {len}"), &recurrent, &chunked, 1e-5);
        assert_close("state", &end_r.s, &end_c.s, 1e-5);
    }
}

#[test]
fn prefill_then_decode_matches_the_full_sequence() {
    seed(32);
    let len = 3 * CHUNK + 5;
    let x = inputs(2, len, Kind::Float, 0.0);
    let g = x.gates();
    let (full, _) = gla::chunked(&x.q, &x.k, &x.v, &g, &cfg(), None).unwrap();
    for split in [1, 5, CHUNK, CHUNK + 1, len - 1] {
        let part = |t: &Tensor, from: i64, n: i64| t.narrow(2, from, n);
        let rest = len - split;
        let head = |t: &Tensor| part(t, 0, split);
        let tail = |t: &Tensor| part(t, split, rest);
        let (y0, state) = gla::chunked(
            &head(&x.q),
            &head(&x.k),
            &head(&x.v),
            &head(&g),
            &cfg(),
            None,
        )
        .unwrap();
        let (decoded, _) = gla::recurrent(
            &tail(&x.q),
            &tail(&x.k),
            &tail(&x.v),
            &tail(&g),
            Some(state.shallow_clone()),
        )
        .unwrap();
        let (continued, _) = gla::chunked(
            &tail(&x.q),
            &tail(&x.k),
            &tail(&x.v),
            &tail(&g),
            &cfg(),
            Some(&state),
        )
        .unwrap();
        assert_close(
            &format!("split {split}: prefill"),
            &y0,
            &full.narrow(2, 0, split),
            1e-5,
        );
        assert_close(
            &format!("split {split}: decode"),
            &decoded,
            &full.narrow(2, split, rest),
            1e-5,
        );
        assert_close(
            &format!("split {split}: continued"),
            &continued,
            &full.narrow(2, split, rest),
            1e-5,
        );
    }
}

#[test]
fn gates_of_one_in_a_million_per_step_stay_finite() {
    seed(33);
    let len = 3 * CHUNK + 5;
    // alpha = 1e-6 per step exactly, at the default chunking and at the test chunking.
    for c in [GlaConfig::default(), cfg()] {
        let x = inputs(2, len, Kind::Float, 0.0);
        let g = (x.logits.zeros_like() + 1e-6f64.ln()).set_requires_grad(true);
        let (chunked, state) = gla::chunked(&x.q, &x.k, &x.v, &g, &c, None).unwrap();
        assert_finite("output", &chunked);
        assert_finite("state", &state.s);
        let probe = chunked.randn_like();
        for (name, grad) in
            ["q", "k", "v", "g"]
                .iter()
                .zip(grads(&chunked, &probe, &[&x.q, &x.k, &x.v, &g]))
        {
            assert_finite(&format!("grad {name}"), &grad);
        }
        let (recurrent, _) = gla::recurrent(&x.q, &x.k, &x.v, &g, None).unwrap();
        assert_close(
            "1e-6 gates: chunked vs recurrent",
            &chunked,
            &recurrent,
            1e-5,
        );
    }
}

#[test]
fn extreme_gates_stay_finite_and_exact() {
    seed(34);
    // Key logits around -2000: log-gates near -125 per step (alpha ~ 1e-54).
    let x = inputs(1, 2 * CHUNK + 3, Kind::Float, -2000.0);
    let g = x.gates();
    let (chunked, _) = gla::chunked(&x.q, &x.k, &x.v, &g, &GlaConfig::default(), None).unwrap();
    let naive = gla::naive(&x.q, &x.k, &x.v, &g).unwrap();
    assert_finite("output", &chunked);
    assert_same_grads("extreme gates", &chunked, &naive, &x.named(), 1e-5);
}

#[test]
fn defaults_chunked_matches_naive() {
    seed(35);
    let x = inputs(1, 150, Kind::Float, 0.0);
    let g = x.gates();
    let naive = gla::naive(&x.q, &x.k, &x.v, &g).unwrap();
    let (chunked, _) = gla::chunked(&x.q, &x.k, &x.v, &g, &GlaConfig::default(), None).unwrap();
    assert_close("defaults", &chunked, &naive, 1e-5);
}

#[test]
fn bf16_inputs_accumulate_in_f32() {
    seed(36);
    let x = inputs(2, 3 * CHUNK + 5, Kind::Float, 0.0);
    let g = x.gates().detach();
    let (reference, _) = gla::chunked(&x.q, &x.k, &x.v, &g, &cfg(), None).unwrap();
    let bf = |t: &Tensor| t.detach().to_kind(Kind::BFloat16);
    let (out, state) =
        gla::chunked(&bf(&x.q), &bf(&x.k), &bf(&x.v), &bf(&g), &cfg(), None).unwrap();
    assert_eq!((out.kind(), state.s.kind()), (Kind::BFloat16, Kind::Float));
    assert_close("bf16 vs f32", &out, &reference, 3e-2);
}

#[test]
fn positive_log_gates_are_rejected() {
    let x = inputs(1, 4, Kind::Float, 0.0);
    let g = x.gates().abs() + 0.1;
    let err = gla::chunked(&x.q, &x.k, &x.v, &g, &cfg(), None)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("log_gates:"), "{err}");
    let bad = GlaConfig {
        chunk_size: 10,
        sub_chunk: 4,
    };
    let err = gla::chunked(&x.q, &x.k, &x.v, &x.gates(), &bad, None)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("chunk_size / sub_chunk"), "{err}");
    let wrong = GlaState {
        s: Tensor::zeros([1, 4, 8, 8], (Kind::Float, tch::Device::Cpu)),
    };
    let err = gla::chunked(&x.q, &x.k, &x.v, &x.gates(), &cfg(), Some(&wrong))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("state.s:"), "{err}");
}

/// Output and gradient bound of the f16 / bf16 chunked form against the f32 naive form on the
/// same values: the rounding of the log-gates, of the matmul operands (decayed q and k, the
/// carried state) and results (bf16 keeps 8 significant bits) and of the output.
const LOW_PRECISION_TOL: f64 = 3e-2;

#[test]
fn low_precision_chunked_matches_the_f32_naive_with_gradients() {
    seed(37);
    for low in LOW_PRECISION {
        // Moderate gates, and strong ones (alpha about 0.02 per step).
        for shift in [0.0, -60.0] {
            let x = inputs(2, 3 * CHUNK + 5, Kind::Float, shift);
            let (q, q32) = rounded(&x.q, low);
            let (k, k32) = rounded(&x.k, low);
            let (v, v32) = rounded(&x.v, low);
            let (logits, logits32) = rounded(&x.logits, low);
            let gates = |logits: &Tensor| logits.log_sigmoid() / 16.0;
            let (out, state) = gla::chunked(&q, &k, &v, &gates(&logits), &cfg(), None).unwrap();
            assert_eq!(state.s.kind(), Kind::Float);
            let reference = gla::naive(&q32, &k32, &v32, &gates(&logits32)).unwrap();
            assert_matches_f32_reference(
                &format!("{low:?} shift {shift}"),
                &out,
                &[("q", &q), ("k", &k), ("v", &v), ("gate logits", &logits)],
                &reference,
                &[&q32, &k32, &v32, &logits32],
                LOW_PRECISION_TOL,
            );
        }
    }
}

#[test]
fn low_precision_strongly_decaying_gates_stay_finite() {
    seed(38);
    let len = 3 * CHUNK + 5;
    for low in LOW_PRECISION {
        // alpha = 1e-6 per step, at the default chunking and at the test chunking.
        for c in [GlaConfig::default(), cfg()] {
            let what = format!("{low:?} 1e-6 gates, chunk {}", c.chunk_size);
            let x = inputs(2, len, Kind::Float, 0.0);
            let (q, q32) = rounded(&x.q, low);
            let (k, k32) = rounded(&x.k, low);
            let (v, v32) = rounded(&x.v, low);
            let (g, g32) = rounded(&(x.logits.zeros_like() + 1e-6f64.ln()), low);
            let (out, state) = gla::chunked(&q, &k, &v, &g, &c, None).unwrap();
            assert_finite("state", &state.s);
            let reference = gla::naive(&q32, &k32, &v32, &g32).unwrap();
            let grads = low_precision_grads(
                &what,
                &out,
                &[("q", &q), ("k", &k), ("v", &v), ("g", &g)],
                &reference,
                &[&q32, &k32, &v32, &g32],
                LOW_PRECISION_TOL,
            );
            for (name, (low_grad, ref_grad)) in ["q", "k", "v"].iter().zip(&grads) {
                assert_close(
                    &format!("{what}: grad {name}"),
                    low_grad,
                    ref_grad,
                    LOW_PRECISION_TOL,
                );
            }
            // Per position, the gate gradient is the q-side minus the k-side sum of products that
            // also make up q's and k's gradients; at alpha = 1e-6 they cancel to about 1e-5, so
            // its error is measured against q's gradient. Rounding either side's sums to bf16
            // (rather than keeping the diagonal blocks in f32) left 7e-3 of it.
            let (g_low, g_ref) = &grads[3];
            let err = (g_low.to_kind(Kind::Float) - g_ref)
                .abs()
                .max()
                .double_value(&[]);
            let scale = grads[0].1.abs().max().double_value(&[]);
            assert!(
                err <= 1e-4 * scale,
                "{what}: grad g off by {err:e}, q's gradient reaches {scale:e}"
            );
        }
    }
}
