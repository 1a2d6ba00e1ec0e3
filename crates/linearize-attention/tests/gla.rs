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
        fused: true,
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
        ..cfg()
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

/// The fused kernels leave calls they do not cover (here: the CPU) to the libtorch kernels, and
/// say why; the output is then `chunked`'s.
#[test]
fn fused_kernels_decline_what_they_do_not_cover() {
    use linearize_torch_ext::gla as fused;
    seed(36);
    let x = inputs(1, 70, Kind::Float, 0.0);
    let g = x.gates();
    let why = fused::unsupported(&x.q, &x.k, &x.v, &g).expect("the CPU is not covered");
    assert!(why.contains("CUDA"), "{why}");
    let off = GlaConfig {
        fused: false,
        ..cfg()
    };
    let with = gla::chunked_output(&x.q, &x.k, &x.v, &g, &cfg()).unwrap();
    let without = gla::chunked_output(&x.q, &x.k, &x.v, &g, &off).unwrap();
    let (chunked, _) = gla::chunked(&x.q, &x.k, &x.v, &g, &cfg(), None).unwrap();
    assert!(with.equal(&without) && with.equal(&chunked));
}

/// The fused CUDA kernels against the naive form in f64 on the same rounded inputs: output and
/// gradients to q, k, v and the log-gates, in bf16 and f16, with GQA (separate key, value and
/// gate head counts), ragged lengths, both compiled head sizes, and decays from Liger's
/// (logsigmoid(N(0, 1)) / 16) to log-gates of down to -10 per token. Outputs by their largest
/// error; gradients by rms(error) / rms (flash-linear-attention's measure) and by the largest
/// error. On a GPU machine: `cargo test --release -p linearize-attention --test gla -- --ignored`.
#[test]
#[ignore = "needs a CUDA device"]
fn fused_kernels_match_naive_on_cuda() {
    use linearize_torch_ext::gla as fused;
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device: this test is for a GPU machine"
    );
    let dev = tch::Device::Cuda(0);
    let cases = [
        // batch, heads, key, value and gate heads, length, head size, dtype, strongest log-gate
        (2, 4, 2, 1, 2, 300, 64, Kind::BFloat16, None),
        (1, 4, 4, 4, 4, 1000, 128, Kind::BFloat16, None),
        (1, 2, 1, 2, 1, 257, 128, Kind::BFloat16, Some(10.0)),
        (2, 8, 2, 2, 8, 640, 128, Kind::Half, None),
        (1, 3, 1, 3, 3, 129, 64, Kind::Half, Some(3.0)),
        (1, 2, 2, 2, 2, 64, 64, Kind::BFloat16, Some(1.0)),
    ];
    for (i, (b, h, hk, hv, hg, len, d, kind, strongest)) in cases.into_iter().enumerate() {
        seed(60 + i as i64);
        let low = |heads: i64| {
            Tensor::randn([b, heads, len, d], (Kind::Float, dev))
                .to_kind(kind)
                .set_requires_grad(true)
        };
        // Liger's inputs: softmaxed projections.
        let q = (Tensor::randn([b, h, len, d], (Kind::Float, dev)) * 2.0)
            .softmax(-1, Kind::Float)
            .to_kind(kind)
            .set_requires_grad(true);
        let (k, v) = (low(hk), low(hv));
        let raw = Tensor::randn([b, hg, len, d], (Kind::Float, dev));
        let g = match strongest {
            None => raw.log_sigmoid() / 16.0,
            // Many gates near one, some strong.
            Some(s) => raw.rand_like().pow_tensor_scalar(3) * -s,
        }
        .set_requires_grad(true);
        assert_eq!(fused::unsupported(&q, &k, &v, &g), None, "case {i}");
        let y = gla::chunked_output(&q, &k, &v, &g, &GlaConfig::default()).unwrap();
        assert_eq!(y.kind(), kind, "case {i}: output dtype");

        let f64_leaf = |t: &Tensor| t.detach().to_kind(Kind::Double).set_requires_grad(true);
        let ours = [&q, &k, &v, &g];
        let theirs = ours.map(f64_leaf);
        let reference = gla::naive(&theirs[0], &theirs[1], &theirs[2], &theirs[3]).unwrap();
        let what = format!("case {i} (b {b}, h {h}/{hk}/{hv}/{hg}, L {len}, d {d}, {kind:?})");
        let max_err = |a: &Tensor, e: &Tensor| {
            (a.to_kind(Kind::Double) - e).abs().max().double_value(&[])
                / e.abs().max().double_value(&[]).max(1e-12)
        };
        let err = max_err(&y, &reference);
        assert!(err < 2e-2, "{what}: output: relative error {err:e}");
        let probe = reference.randn_like();
        let got = grads(&y, &probe.to_kind(kind), &ours);
        let want = grads(&reference, &probe, &theirs.each_ref());
        for (name, (a, e)) in ["q", "k", "v", "log-gates"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            let (rms, max) = (rms_err(a, e), max_err(a, e));
            assert!(
                rms < 2e-2 && max < 5e-2,
                "{what}: grad {name}: rms error {rms:e}, largest {max:e}"
            );
        }
    }
}
