//! Liger attention (0.5 sliding-window softmax + 0.5 GLA): the three forms agree, with and
//! without sink tokens, and the combination is the one `ops::liger` documents.
mod common;

use common::*;
use linearize_attention::ops::gla;
use linearize_attention::ops::liger::{self, LigerConfig, LigerInputs};
use linearize_attention::ops::swa::{self, SwaConfig};
use tch::{Kind, Tensor};

const D: i64 = 16;
const CHUNK: i64 = 16;
const W: i64 = 8;

fn cfg() -> LigerConfig {
    LigerConfig {
        window_size: W,
        chunk_size: CHUNK,
        sub_chunk: 4,
        ..Default::default()
    }
}

struct Qkv {
    q: Tensor,
    k: Tensor,
    q_rope: Tensor,
    k_rope: Tensor,
    v: Tensor,
}

fn qkv(batch: i64, len: i64, kind: Kind, key_shift: f64) -> Qkv {
    let k = (randn(&[batch, 2, len, D], kind) + key_shift).set_requires_grad(true);
    // Stand-ins for the rotated projections: any other tensors of the same shapes.
    Qkv {
        q: leaf(&[batch, 4, len, D], kind),
        k,
        q_rope: leaf(&[batch, 4, len, D], kind),
        k_rope: leaf(&[batch, 2, len, D], kind),
        v: leaf(&[batch, 2, len, 8], kind),
    }
}

impl Qkv {
    fn inputs(&self) -> LigerInputs<'_> {
        LigerInputs {
            q: &self.q,
            k: &self.k,
            q_rope: &self.q_rope,
            k_rope: &self.k_rope,
            v: &self.v,
        }
    }

    fn named(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("q", &self.q),
            ("k", &self.k),
            ("q_rope", &self.q_rope),
            ("k_rope", &self.k_rope),
            ("v", &self.v),
        ]
    }

    fn narrow(&self, from: i64, n: i64) -> Qkv {
        let part = |t: &Tensor| t.narrow(2, from, n);
        Qkv {
            q: part(&self.q),
            k: part(&self.k),
            q_rope: part(&self.q_rope),
            k_rope: part(&self.k_rope),
            v: part(&self.v),
        }
    }

    /// The inputs rounded to `low`, and f32 copies of the rounded values (both leaves).
    fn rounded(&self, low: Kind) -> (Qkv, Qkv) {
        let (q, q32) = rounded(&self.q, low);
        let (k, k32) = rounded(&self.k, low);
        let (q_rope, q_rope32) = rounded(&self.q_rope, low);
        let (k_rope, k_rope32) = rounded(&self.k_rope, low);
        let (v, v32) = rounded(&self.v, low);
        (
            Qkv {
                q,
                k,
                q_rope,
                k_rope,
                v,
            },
            Qkv {
                q: q32,
                k: k32,
                q_rope: q_rope32,
                k_rope: k_rope32,
                v: v32,
            },
        )
    }
}

#[test]
fn naive_is_half_window_softmax_plus_half_gla_of_softmaxed_projections() {
    seed(40);
    let x = qkv(1, 20, Kind::Double, 0.0);
    let y = liger::naive(&x.inputs(), &cfg()).unwrap();
    let window = swa::naive(
        &x.q_rope,
        &x.k_rope,
        &x.v,
        &SwaConfig {
            window_size: W,
            chunk_size: CHUNK,
            sinks: 0,
        },
    )
    .unwrap();
    let (q, k) = (x.q.softmax(-1, Kind::Double), x.k.softmax(-1, Kind::Double));
    let linear = gla::naive(&q, &k, &x.v, &(x.k.log_sigmoid() / 16.0)).unwrap();
    assert_close("combination", &y, &(window * 0.5 + linear * 0.5), 1e-12);
}

#[test]
fn sinks_join_the_window_half_only() {
    seed(48);
    let x = qkv(1, 20, Kind::Double, 0.0);
    let with = LigerConfig { sinks: 3, ..cfg() };
    let y = liger::naive(&x.inputs(), &with).unwrap();
    let window = swa::naive(&x.q_rope, &x.k_rope, &x.v, &with.swa_config()).unwrap();
    let (q, k) = (x.q.softmax(-1, Kind::Double), x.k.softmax(-1, Kind::Double));
    let linear = gla::naive(&q, &k, &x.v, &(x.k.log_sigmoid() / 16.0)).unwrap();
    assert_eq!(with.swa_config().sinks, 3);
    assert_close("combination", &y, &(window * 0.5 + linear * 0.5), 1e-12);
}

#[test]
fn sinks_forms_agree_with_gradients_and_prefill_then_decode_matches_the_full_sequence() {
    seed(49);
    for sinks in [1, 3, W + 5] {
        let c = LigerConfig { sinks, ..cfg() };
        for len in lengths(W, CHUNK) {
            let x = qkv(2, len, Kind::Float, 0.0);
            let naive = liger::naive(&x.inputs(), &c).unwrap();
            let (chunked, _) = liger::chunked(&x.inputs(), &c, None).unwrap();
            assert_same_grads(
                &format!("sinks {sinks} len {len}"),
                &chunked,
                &naive,
                &x.named(),
                1e-5,
            );
        }
        let len = 3 * CHUNK + 5;
        let x = qkv(2, len, Kind::Float, 0.0);
        tch::no_grad(|| {
            let (full, end) = liger::chunked(&x.inputs(), &c, None).unwrap();
            assert_eq!(end.window.sinks.len(), sinks);
            let (recurrent, _) = liger::recurrent(&x.inputs(), &c, None).unwrap();
            assert_close(
                &format!("sinks {sinks}: recurrent"),
                &recurrent,
                &full,
                1e-5,
            );
            for split in [2, W + 6, CHUNK + 1] {
                let (head, tail) = (x.narrow(0, split), x.narrow(split, len - split));
                let (y0, mut state) = liger::chunked(&head.inputs(), &c, None).unwrap();
                let want = full.narrow(2, split, len - split);
                let (continued, _) = liger::chunked(&tail.inputs(), &c, Some(&state)).unwrap();
                let steps: Vec<Tensor> = (0..len - split)
                    .map(|t| {
                        liger::step(&mut state, &tail.narrow(t, 1).inputs(), &c, None).unwrap()
                    })
                    .collect();
                let what = format!("sinks {sinks} split {split}");
                assert_close(
                    &format!("{what}: prefill"),
                    &y0,
                    &full.narrow(2, 0, split),
                    1e-5,
                );
                assert_close(&format!("{what}: continued"), &continued, &want, 1e-5);
                assert_close(
                    &format!("{what}: steps"),
                    &Tensor::cat(&steps, 2),
                    &want,
                    1e-5,
                );
            }
        });
    }
}

#[test]
fn chunked_matches_naive_forward_and_gradients() {
    seed(41);
    for kind in [Kind::Float, Kind::Double] {
        let tol = if kind == Kind::Float { 1e-5 } else { 1e-10 };
        for len in lengths(W, CHUNK) {
            let x = qkv(2, len, kind, 0.0);
            let naive = liger::naive(&x.inputs(), &cfg()).unwrap();
            let (chunked, _) = liger::chunked(&x.inputs(), &cfg(), None).unwrap();
            assert_same_grads(
                &format!("{kind:?} len {len}"),
                &chunked,
                &naive,
                &x.named(),
                tol,
            );
        }
    }
}

#[test]
fn recurrent_matches_chunked() {
    seed(42);
    for len in lengths(W, CHUNK) {
        let x = qkv(3, len, Kind::Float, 0.0);
        let (chunked, end_c) = liger::chunked(&x.inputs(), &cfg(), None).unwrap();
        let (recurrent, end_r) = liger::recurrent(&x.inputs(), &cfg(), None).unwrap();
        assert_close(&format!("len {len}"), &recurrent, &chunked, 1e-5);
        assert_close("gla state", &end_r.gla.s, &end_c.gla.s, 1e-5);
        assert_eq!(end_r.window.pos, end_c.window.pos);
    }
}

#[test]
fn prefill_then_decode_matches_the_full_sequence() {
    seed(43);
    let len = 3 * CHUNK + 5;
    let x = qkv(2, len, Kind::Float, 0.0);
    let (full, _) = liger::chunked(&x.inputs(), &cfg(), None).unwrap();
    for split in [1, W, CHUNK + 1, len - 1] {
        let (head, tail) = (x.narrow(0, split), x.narrow(split, len - split));
        let (y0, state) = liger::chunked(&head.inputs(), &cfg(), None).unwrap();
        let (continued, _) = liger::chunked(&tail.inputs(), &cfg(), Some(&state)).unwrap();
        let mut state = state;
        let steps: Vec<Tensor> = (0..len - split)
            .map(|t| liger::step(&mut state, &tail.narrow(t, 1).inputs(), &cfg(), None).unwrap())
            .collect();
        let decoded = Tensor::cat(&steps, 2);
        assert_close(
            &format!("split {split}: prefill"),
            &y0,
            &full.narrow(2, 0, split),
            1e-5,
        );
        assert_close(
            &format!("split {split}: decode"),
            &decoded,
            &full.narrow(2, split, len - split),
            1e-5,
        );
        assert_close(
            &format!("split {split}: continued"),
            &continued,
            &full.narrow(2, split, len - split),
            1e-5,
        );
    }
}

#[test]
fn strongly_decaying_gates_stay_finite() {
    seed(44);
    // Key logits near -221 give logsigmoid(k)/16 near ln(1e-6): alpha about 1e-6 per step.
    let x = qkv(2, 3 * CHUNK + 5, Kind::Float, -221.0);
    for c in [LigerConfig::default(), cfg()] {
        let (chunked, _) = liger::chunked(&x.inputs(), &c, None).unwrap();
        assert_finite("output", &chunked);
        let probe = chunked.randn_like();
        let named = x.named();
        let tensors: Vec<&Tensor> = named.iter().map(|(_, t)| *t).collect();
        for ((name, _), grad) in named.iter().zip(grads(&chunked, &probe, &tensors)) {
            assert_finite(&format!("grad {name}"), &grad);
        }
        let (recurrent, _) = liger::recurrent(&x.inputs(), &c, None).unwrap();
        assert_close(
            "strong gates: chunked vs recurrent",
            &chunked,
            &recurrent,
            1e-5,
        );
    }
}

#[test]
fn defaults_chunked_matches_naive() {
    seed(45);
    let x = qkv(1, 150, Kind::Float, 0.0);
    let naive = liger::naive(&x.inputs(), &LigerConfig::default()).unwrap();
    let (chunked, _) = liger::chunked(&x.inputs(), &LigerConfig::default(), None).unwrap();
    assert_close("defaults", &chunked, &naive, 1e-5);
}

#[test]
fn bf16_inputs_accumulate_in_f32() {
    seed(46);
    let x = qkv(2, 3 * CHUNK + 5, Kind::Float, 0.0);
    let (reference, _) = liger::chunked(&x.inputs(), &cfg(), None).unwrap();
    let bf = |t: &Tensor| t.detach().to_kind(Kind::BFloat16);
    let b = Qkv {
        q: bf(&x.q),
        k: bf(&x.k),
        q_rope: bf(&x.q_rope),
        k_rope: bf(&x.k_rope),
        v: bf(&x.v),
    };
    let (out, _) = liger::chunked(&b.inputs(), &cfg(), None).unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    assert_close("bf16 vs f32", &out, &reference, 3e-2);
}

/// Output and gradient bounds of the f16 / bf16 chunked form against the f32 naive form on the
/// same values: both halves' rounding (window results, GLA operands and results) and the output's.
const LOW_PRECISION_TOL: f64 = 3e-2;

#[test]
fn low_precision_chunked_matches_the_f32_naive_with_gradients() {
    seed(47);
    for low in LOW_PRECISION {
        // Ordinary keys, and keys near -221: alpha about 1e-6 per step.
        for (shift, c) in [
            (0.0, cfg()),
            (-221.0, cfg()),
            (-221.0, LigerConfig::default()),
        ] {
            let x = qkv(2, 3 * CHUNK + 5, Kind::Float, shift);
            let (x, x32) = x.rounded(low);
            let (out, _) = liger::chunked(&x.inputs(), &c, None).unwrap();
            let reference = liger::naive(&x32.inputs(), &c).unwrap();
            let ref_inputs: Vec<&Tensor> = x32.named().into_iter().map(|(_, t)| t).collect();
            assert_matches_f32_reference(
                &format!("{low:?} key shift {shift}, chunk {}", c.chunk_size),
                &out,
                &x.named(),
                &reference,
                &ref_inputs,
                LOW_PRECISION_TOL,
            );
        }
    }
}

/// `chunked_output` is `chunked`'s output; on the CPU the fused kernels decline the GLA half.
#[test]
fn chunked_output_is_chunked_without_the_state() {
    seed(49);
    for sinks in [0, 3] {
        let x = qkv(2, 3 * CHUNK + 5, Kind::Float, 0.0);
        let c = LigerConfig { sinks, ..cfg() };
        let (chunked, _) = liger::chunked(&x.inputs(), &c, None).unwrap();
        let alone = liger::chunked_output(&x.inputs(), &c).unwrap();
        assert!(alone.equal(&chunked), "sinks {sinks}");
    }
}

/// Liger with the fused GLA kernels on CUDA against the naive form in f64 on the same bf16
/// inputs: output and gradients to every input, with GQA, sinks and both compiled head sizes. On
/// a GPU machine: `cargo test --release -p linearize-attention --test liger -- --ignored`.
#[test]
#[ignore = "needs a CUDA device"]
fn fused_kernels_match_naive_on_cuda() {
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device: this test is for a GPU machine"
    );
    let dev = tch::Device::Cuda(0);
    // batch, heads, kv heads, length, head size, window, sinks
    let cases = [
        (2, 4, 2, 300, 64, 64, 0),
        (1, 4, 1, 700, 128, 64, 4),
        (1, 2, 2, 129, 128, 128, 0),
    ];
    for (i, (b, h, hk, len, d, w, sinks)) in cases.into_iter().enumerate() {
        seed(70 + i as i64);
        let bf16 = |heads: i64| {
            Tensor::randn([b, heads, len, d], (Kind::Float, dev))
                .to_kind(Kind::BFloat16)
                .set_requires_grad(true)
        };
        let x = Qkv {
            q: bf16(h),
            k: bf16(hk),
            q_rope: bf16(h),
            k_rope: bf16(hk),
            v: bf16(hk),
        };
        let c = LigerConfig {
            window_size: w,
            sinks,
            ..LigerConfig::default()
        };
        let y = liger::chunked_output(&x.inputs(), &c).unwrap();
        let f64_leaf = |t: &Tensor| t.detach().to_kind(Kind::Double).set_requires_grad(true);
        let x64 = Qkv {
            q: f64_leaf(&x.q),
            k: f64_leaf(&x.k),
            q_rope: f64_leaf(&x.q_rope),
            k_rope: f64_leaf(&x.k_rope),
            v: f64_leaf(&x.v),
        };
        let reference = liger::naive(&x64.inputs(), &c).unwrap();
        let what = format!("case {i} (b {b}, h {h}/{hk}, L {len}, d {d}, w {w}, sinks {sinks})");
        assert_close(&format!("{what}: output"), &y, &reference, 2e-2);
        let probe = reference.randn_like();
        let named = x.named();
        let ours: Vec<&Tensor> = named.iter().map(|(_, t)| *t).collect();
        let theirs: Vec<&Tensor> = x64.named().into_iter().map(|(_, t)| t).collect();
        let got = grads(&y, &probe.to_kind(Kind::BFloat16), &ours);
        let want = grads(&reference, &probe, &theirs);
        for ((name, _), (a, e)) in named.iter().zip(got.iter().zip(&want)) {
            let rms = rms_err(a, e);
            assert!(rms < 2e-2, "{what}: grad {name}: rms error {rms:e}");
        }
    }
}
