//! Sliding-window softmax attention: naive, chunked (SDPA on local blocks) and recurrent agree,
//! with and without sink tokens.
mod common;

use common::*;
use linearize_attention::ops::swa::{self, SwaConfig};
use tch::{Kind, Tensor};

const D: i64 = 16;
const W: i64 = 8;
const CHUNK: i64 = 16;

fn cfg() -> SwaConfig {
    SwaConfig {
        window_size: W,
        chunk_size: CHUNK,
        sinks: 0,
    }
}

/// Sink counts: one, a few, and more than the window holds.
const SINKS: [i64; 3] = [1, 3, W + 5];

fn with_sinks(sinks: i64) -> SwaConfig {
    SwaConfig { sinks, ..cfg() }
}

fn qkv(batch: i64, len: i64, kind: Kind) -> (Tensor, Tensor, Tensor) {
    (
        leaf(&[batch, 4, len, D], kind),
        leaf(&[batch, 2, len, D], kind),
        leaf(&[batch, 2, len, 8], kind),
    )
}

#[test]
fn chunked_matches_naive_forward_and_gradients() {
    seed(20);
    for kind in [Kind::Float, Kind::Double] {
        let tol = if kind == Kind::Float { 1e-5 } else { 1e-10 };
        for len in lengths(W, CHUNK) {
            for chunk in [3, CHUNK] {
                let (q, k, v) = qkv(2, len, kind);
                let c = SwaConfig {
                    chunk_size: chunk,
                    ..cfg()
                };
                let naive = swa::naive(&q, &k, &v, &c).unwrap();
                let (chunked, _) = swa::chunked(&q, &k, &v, &c, None).unwrap();
                let what = format!("{kind:?} len {len} chunk {chunk}");
                assert_same_grads(
                    &what,
                    &chunked,
                    &naive,
                    &[("q", &q), ("k", &k), ("v", &v)],
                    tol,
                );
            }
        }
    }
}

#[test]
fn a_window_longer_than_the_sequence_is_causal_softmax() {
    seed(21);
    let (q, k, v) = qkv(1, 30, Kind::Double);
    let wide = SwaConfig {
        window_size: 64,
        chunk_size: 8,
        sinks: 0,
    };
    let (chunked, _) = swa::chunked(&q, &k, &v, &wide, None).unwrap();
    let reference =
        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, true, None, true);
    assert_close("causal", &chunked, &reference, 1e-10);
}

#[test]
fn recurrent_matches_chunked_and_their_states_agree() {
    seed(22);
    for len in lengths(W, CHUNK) {
        let (q, k, v) = qkv(3, len, Kind::Float);
        let (chunked, end_c) = swa::chunked(&q, &k, &v, &cfg(), None).unwrap();
        let (recurrent, end_r) = swa::recurrent(&q, &k, &v, &cfg(), None).unwrap();
        assert_close(&format!("len {len}"), &recurrent, &chunked, 1e-5);
        assert_eq!((end_c.pos, end_c.cached()), (len, len.min(W - 1)));
        assert_eq!((end_r.pos, end_r.cached()), (end_c.pos, end_c.cached()));
        assert_close("k cache", &end_r.k, &end_c.k, 0.0);
        assert_close("v cache", &end_r.v, &end_c.v, 0.0);
    }
}

#[test]
fn prefill_then_decode_matches_the_full_sequence() {
    seed(23);
    let len = 3 * CHUNK + 5;
    let (q, k, v) = qkv(2, len, Kind::Float);
    let (full, _) = swa::chunked(&q, &k, &v, &cfg(), None).unwrap();
    for split in [1, 5, W, CHUNK + 1, len - 1] {
        let part = |x: &Tensor, from: i64, n: i64| x.narrow(2, from, n);
        let rest = len - split;
        let (head, state) = swa::chunked(
            &part(&q, 0, split),
            &part(&k, 0, split),
            &part(&v, 0, split),
            &cfg(),
            None,
        )
        .unwrap();
        let (tail, _) = swa::recurrent(
            &part(&q, split, rest),
            &part(&k, split, rest),
            &part(&v, split, rest),
            &cfg(),
            Some(state.shallow_clone()),
        )
        .unwrap();
        let (continued, _) = swa::chunked(
            &part(&q, split, rest),
            &part(&k, split, rest),
            &part(&v, split, rest),
            &cfg(),
            Some(&state),
        )
        .unwrap();
        assert_close(
            &format!("split {split}: prefill"),
            &head,
            &full.narrow(2, 0, split),
            1e-5,
        );
        assert_close(
            &format!("split {split}: decode"),
            &tail,
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
fn defaults_chunked_matches_naive() {
    seed(24);
    let (q, k, v) = qkv(1, 200, Kind::Float);
    let naive = swa::naive(&q, &k, &v, &SwaConfig::default()).unwrap();
    let (chunked, _) = swa::chunked(&q, &k, &v, &SwaConfig::default(), None).unwrap();
    assert_close("defaults", &chunked, &naive, 1e-5);
}

#[test]
fn bf16_inputs_accumulate_in_f32() {
    seed(25);
    let (q, k, v) = qkv(2, 3 * CHUNK + 5, Kind::Float);
    let (reference, _) = swa::chunked(&q, &k, &v, &cfg(), None).unwrap();
    let bf = |x: &Tensor| x.detach().to_kind(Kind::BFloat16);
    let (out, _) = swa::chunked(&bf(&q), &bf(&k), &bf(&v), &cfg(), None).unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    assert_close("bf16 vs f32", &out, &reference, 3e-2);
}

/// Output and gradient bounds of the f16 / bf16 chunked form against the f32 naive form on the
/// same values: SDPA keeps the softmax statistics in f32, so only the rounding of its results
/// and of the output remain.
const LOW_PRECISION_TOL: f64 = 3e-2;

#[test]
fn low_precision_chunked_matches_the_f32_naive_with_gradients() {
    seed(26);
    for low in LOW_PRECISION {
        let (q, k, v) = qkv(2, 3 * CHUNK + 5, Kind::Float);
        let (q, q32) = rounded(&q, low);
        let (k, k32) = rounded(&k, low);
        let (v, v32) = rounded(&v, low);
        let (out, state) = swa::chunked(&q, &k, &v, &cfg(), None).unwrap();
        assert_eq!(state.k.kind(), Kind::Float);
        let reference = swa::naive(&q32, &k32, &v32, &cfg()).unwrap();
        assert_matches_f32_reference(
            &format!("{low:?}"),
            &out,
            &[("q", &q), ("k", &k), ("v", &v)],
            &reference,
            &[&q32, &k32, &v32],
            LOW_PRECISION_TOL,
        );
    }
}

#[test]
fn sinks_naive_is_softmax_over_the_window_and_the_first_tokens() {
    seed(27);
    let len = 20;
    let (q, k, v) = qkv(1, len, Kind::Double);
    for sinks in SINKS {
        let rows: Vec<bool> = (0..len)
            .flat_map(|t| (0..len).map(move |s| s <= t && (t - s < W || s < sinks)))
            .collect();
        let mask = Tensor::from_slice(&rows).reshape([len, len]);
        let reference = Tensor::scaled_dot_product_attention(
            &q,
            &k.repeat_interleave_self_int(2, 1, None),
            &v.repeat_interleave_self_int(2, 1, None),
            Some(mask),
            0.0,
            false,
            None,
            false,
        );
        let naive = swa::naive(&q, &k, &v, &with_sinks(sinks)).unwrap();
        assert_close(&format!("sinks {sinks}"), &naive, &reference, 1e-12);
    }
}

#[test]
fn sinks_chunked_matches_naive_forward_and_gradients() {
    seed(28);
    for kind in [Kind::Float, Kind::Double] {
        let tol = if kind == Kind::Float { 1e-5 } else { 1e-10 };
        for sinks in SINKS {
            for len in lengths(W, CHUNK) {
                for chunk in [3, CHUNK] {
                    let (q, k, v) = qkv(2, len, kind);
                    let c = SwaConfig {
                        chunk_size: chunk,
                        ..with_sinks(sinks)
                    };
                    let naive = swa::naive(&q, &k, &v, &c).unwrap();
                    let (chunked, _) = swa::chunked(&q, &k, &v, &c, None).unwrap();
                    assert_same_grads(
                        &format!("{kind:?} sinks {sinks} len {len} chunk {chunk}"),
                        &chunked,
                        &naive,
                        &[("q", &q), ("k", &k), ("v", &v)],
                        tol,
                    );
                }
            }
        }
    }
}

#[test]
fn sinks_recurrent_matches_chunked_and_prefill_then_decode_matches_the_full_sequence() {
    seed(29);
    let len = 3 * CHUNK + 5;
    let part = |x: &Tensor, from: i64, n: i64| x.narrow(2, from, n);
    for sinks in SINKS {
        let c = with_sinks(sinks);
        let (q, k, v) = qkv(2, len, Kind::Float);
        let (full, end) = swa::chunked(&q, &k, &v, &c, None).unwrap();
        let (recurrent, end_r) = swa::recurrent(&q, &k, &v, &c, None).unwrap();
        assert_close(
            &format!("sinks {sinks}: recurrent"),
            &recurrent,
            &full,
            1e-5,
        );
        assert_eq!(end.sinks.len(), sinks);
        assert_close("sink keys", &end_r.sinks.k, &end.sinks.k, 0.0);
        assert_close(
            "sink keys are the first keys",
            &end.sinks.k,
            &part(&k, 0, sinks),
            0.0,
        );
        assert_close("sink values", &end_r.sinks.v, &end.sinks.v, 0.0);
        for split in [1, 2, 5, W, W + 6, CHUNK + 1, len - 1] {
            let rest = len - split;
            let (head, state) = swa::chunked(
                &part(&q, 0, split),
                &part(&k, 0, split),
                &part(&v, 0, split),
                &c,
                None,
            )
            .unwrap();
            assert_eq!(state.sinks.len(), split.min(sinks));
            let (tail, _) = swa::recurrent(
                &part(&q, split, rest),
                &part(&k, split, rest),
                &part(&v, split, rest),
                &c,
                Some(state.shallow_clone()),
            )
            .unwrap();
            let (continued, _) = swa::chunked(
                &part(&q, split, rest),
                &part(&k, split, rest),
                &part(&v, split, rest),
                &c,
                Some(&state),
            )
            .unwrap();
            let what = format!("sinks {sinks} split {split}");
            let want = full.narrow(2, split, rest);
            assert_close(
                &format!("{what}: prefill"),
                &head,
                &full.narrow(2, 0, split),
                1e-5,
            );
            assert_close(&format!("{what}: decode"), &tail, &want, 1e-5);
            assert_close(&format!("{what}: continued"), &continued, &want, 1e-5);
        }
    }
}

#[test]
fn a_state_with_other_sinks_is_refused() {
    seed(30);
    let (q, k, v) = qkv(1, 10, Kind::Float);
    let (_, state) = swa::chunked(&q, &k, &v, &with_sinks(2), None).unwrap();
    let err = swa::chunked(&q, &k, &v, &with_sinks(4), Some(&state)).unwrap_err();
    assert!(err.to_string().contains("state.sinks.k"), "{err}");
    let bad = SwaConfig { sinks: -1, ..cfg() };
    assert!(swa::naive(&q, &k, &v, &bad).is_err());
}
