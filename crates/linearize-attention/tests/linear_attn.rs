//! Normalised linear attention: naive, chunked and recurrent forms agree.
mod common;

use common::*;
use linearize_attention::feature_map::{FeatureMap, FeatureMapConfig, FeatureMapInit};
use linearize_attention::ops::linear_attn::{self, LinearAttnConfig, LinearState};
use tch::{nn, Device, Kind, Tensor};

const D: i64 = 16;
const CHUNK: i64 = 16;

/// Hedgehog maps for q (4 heads) and k (GQA: 2 key heads, mapped per query head).
struct Setup {
    _vs: nn::VarStore,
    map_q: FeatureMap,
    map_k: FeatureMap,
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

fn setup(batch: i64, len: i64, kind: Kind) -> Setup {
    let mut vs = nn::VarStore::new(Device::Cpu);
    let cfg = FeatureMapConfig::Hedgehog {
        feature_dim: 8,
        half_space: false,
        bias: true,
        init: FeatureMapInit::Kaiming,
    };
    let map_q = FeatureMap::new(&(vs.root() / "feature_map_q"), 4, D, &cfg).unwrap();
    let map_k = FeatureMap::new(&(vs.root() / "feature_map_k"), 4, D, &cfg).unwrap();
    if kind == Kind::Double {
        vs.double();
    }
    Setup {
        _vs: vs,
        map_q,
        map_k,
        q: leaf(&[batch, 4, len, D], kind),
        k: leaf(&[batch, 2, len, D], kind),
        v: leaf(&[batch, 2, len, D], kind),
    }
}

fn cfg() -> LinearAttnConfig {
    LinearAttnConfig {
        chunk_size: CHUNK,
        ..Default::default()
    }
}

impl Setup {
    fn phi(&self) -> (Tensor, Tensor) {
        (
            self.map_q.forward(&self.q).unwrap(),
            self.map_k.forward(&self.k).unwrap(),
        )
    }

    fn weights(&self) -> Vec<(String, Tensor)> {
        self._vs.variables().into_iter().collect()
    }
}

#[test]
fn chunked_matches_naive_forward_and_gradients() {
    seed(0);
    for kind in [Kind::Float, Kind::Double] {
        let tol = if kind == Kind::Float { 1e-5 } else { 1e-10 };
        for len in lengths(8, CHUNK) {
            let s = setup(2, len, kind);
            let (pq, pk) = s.phi();
            let naive = linear_attn::naive(&pq, &pk, &s.v, &cfg()).unwrap();
            let (chunked, _) = linear_attn::chunked(&pq, &pk, &s.v, &cfg(), None).unwrap();
            let weights = s.weights();
            let mut inputs: Vec<(&str, &Tensor)> = vec![("q", &s.q), ("k", &s.k), ("v", &s.v)];
            inputs.extend(weights.iter().map(|(n, t)| (n.as_str(), t)));
            assert_same_grads(
                &format!("{kind:?} len {len}"),
                &chunked,
                &naive,
                &inputs,
                tol,
            );
        }
    }
}

#[test]
fn recurrent_matches_chunked_and_their_states_agree() {
    seed(1);
    for len in lengths(8, CHUNK) {
        let s = setup(3, len, Kind::Float);
        let (pq, pk) = tch::no_grad(|| s.phi());
        let (chunked, end_c) = linear_attn::chunked(&pq, &pk, &s.v, &cfg(), None).unwrap();
        let (recurrent, end_r) = linear_attn::recurrent(&pq, &pk, &s.v, &cfg(), None).unwrap();
        assert_close(&format!("len {len}: output"), &recurrent, &chunked, 1e-5);
        assert_close("state kv", &end_r.kv, &end_c.kv, 1e-5);
        assert_close("state k_sum", &end_r.k_sum, &end_c.k_sum, 1e-5);
    }
}

#[test]
fn prefill_then_decode_matches_the_full_sequence() {
    seed(2);
    let len = 3 * CHUNK + 5;
    let s = setup(2, len, Kind::Float);
    let (pq, pk) = tch::no_grad(|| s.phi());
    let (full, _) = linear_attn::chunked(&pq, &pk, &s.v, &cfg(), None).unwrap();
    for split in [1, 7, CHUNK, CHUNK + 3, len - 1] {
        let part = |x: &Tensor, from: i64, n: i64| x.narrow(2, from, n);
        let (head, state) = linear_attn::chunked(
            &part(&pq, 0, split),
            &part(&pk, 0, split),
            &part(&s.v, 0, split),
            &cfg(),
            None,
        )
        .unwrap();
        let rest = len - split;
        let (tail_r, _) = linear_attn::recurrent(
            &part(&pq, split, rest),
            &part(&pk, split, rest),
            &part(&s.v, split, rest),
            &cfg(),
            Some(state.shallow_clone()),
        )
        .unwrap();
        let (tail_c, _) = linear_attn::chunked(
            &part(&pq, split, rest),
            &part(&pk, split, rest),
            &part(&s.v, split, rest),
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
            &tail_r,
            &full.narrow(2, split, rest),
            1e-5,
        );
        assert_close(
            &format!("split {split}: chunked continuation"),
            &tail_c,
            &full.narrow(2, split, rest),
            1e-5,
        );
    }
}

#[test]
fn defaults_chunked_matches_naive() {
    seed(3);
    let s = setup(1, 150, Kind::Float);
    let (pq, pk) = tch::no_grad(|| s.phi());
    let d = LinearAttnConfig::default();
    let naive = linear_attn::naive(&pq, &pk, &s.v, &d).unwrap();
    let (chunked, _) = linear_attn::chunked(&pq, &pk, &s.v, &d, None).unwrap();
    assert_close("defaults", &chunked, &naive, 1e-5);
}

#[test]
fn bf16_inputs_accumulate_in_f32() {
    seed(4);
    let s = setup(2, 3 * CHUNK + 5, Kind::Float);
    let (pq, pk) = tch::no_grad(|| s.phi());
    let (reference, _) = linear_attn::chunked(&pq, &pk, &s.v, &cfg(), None).unwrap();
    let bf = |x: &Tensor| x.to_kind(Kind::BFloat16);
    let (out, state) = linear_attn::chunked(&bf(&pq), &bf(&pk), &bf(&s.v), &cfg(), None).unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    assert_eq!(state.kv.kind(), Kind::Float);
    // Only the inputs' and the output's rounding remain (bf16 has an 8-bit mantissa).
    assert_close("bf16 vs f32", &out, &reference, 2e-2);
    let naive = linear_attn::naive(&bf(&pq), &bf(&pk), &bf(&s.v), &cfg()).unwrap();
    assert_close("bf16 chunked vs naive", &out, &naive, 1e-2);
}

#[test]
fn bad_inputs_are_named() {
    let x = Tensor::zeros([1, 4, 5, 8], (Kind::Float, Device::Cpu));
    let v3 = Tensor::zeros([1, 3, 5, 8], (Kind::Float, Device::Cpu));
    let err = linear_attn::naive(&x, &x, &v3, &cfg())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("v: expected"), "{err}");
    let short = Tensor::zeros([1, 4, 4, 8], (Kind::Float, Device::Cpu));
    let err = linear_attn::chunked(&x, &short, &x, &cfg(), None)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("phi_k: expected"), "{err}");
    let mut state = LinearState::zeros(1, 4, 8, 8, (Kind::Float, Device::Cpu));
    let err = linear_attn::step(&mut state, &x, &x, &x, &cfg())
        .unwrap_err()
        .to_string();
    assert!(err.contains("one token per step"), "{err}");
    let bad = LinearAttnConfig {
        chunk_size: 0,
        ..cfg()
    };
    assert!(linear_attn::chunked(&x, &x, &x, &bad, None)
        .unwrap_err()
        .to_string()
        .starts_with("chunk_size"));
}

/// Output and gradient bound of the f16 / bf16 chunked form against the f32 naive form: the
/// inputs are the same values, so what remains is the rounding of the feature maps' outputs, of
/// the matmul operands and results (bf16 keeps 8 significant bits) and of the output.
const LOW_PRECISION_TOL: f64 = 2e-2;

#[test]
fn low_precision_chunked_matches_the_f32_naive_with_gradients() {
    seed(5);
    for low in LOW_PRECISION {
        let s = setup(2, 3 * CHUNK + 5, Kind::Float);
        let (q, q32) = rounded(&s.q, low);
        let (k, k32) = rounded(&s.k, low);
        let (v, v32) = rounded(&s.v, low);
        let (out, state) = linear_attn::chunked(
            &s.map_q.forward(&q).unwrap(),
            &s.map_k.forward(&k).unwrap(),
            &v,
            &cfg(),
            None,
        )
        .unwrap();
        assert_eq!(
            (state.kv.kind(), state.k_sum.kind()),
            (Kind::Float, Kind::Float)
        );
        let reference = linear_attn::naive(
            &s.map_q.forward(&q32).unwrap(),
            &s.map_k.forward(&k32).unwrap(),
            &v32,
            &cfg(),
        )
        .unwrap();
        let weights = s.weights();
        let mut low_inputs: Vec<(&str, &Tensor)> = vec![("q", &q), ("k", &k), ("v", &v)];
        low_inputs.extend(weights.iter().map(|(n, t)| (n.as_str(), t)));
        let mut ref_inputs = vec![&q32, &k32, &v32];
        ref_inputs.extend(weights.iter().map(|(_, t)| t));
        assert_matches_f32_reference(
            &format!("{low:?}"),
            &out,
            &low_inputs,
            &reference,
            &ref_inputs,
            LOW_PRECISION_TOL,
        );
    }
}

#[test]
fn f16_states_beyond_the_f16_range_stay_accurate() {
    seed(6);
    // Values near 1000 over 1000 tokens: the linear sums reach about 1e5, past f16's 65504, while
    // every output (an average of values) stays near 1000.
    let len = 1000;
    let s = setup(1, len, Kind::Float);
    let (pq, pk) = tch::no_grad(|| s.phi());
    let v = (randn(&[1, 2, len, D], Kind::Float) * 10.0 + 1000.0).to_kind(Kind::Half);
    let half = |x: &Tensor| x.to_kind(Kind::Half);
    let (out, _) = linear_attn::chunked(&half(&pq), &half(&pk), &v, &cfg(), None).unwrap();
    assert_finite("output", &out);
    let float = |x: &Tensor| half(x).to_kind(Kind::Float);
    let reference = linear_attn::naive(&float(&pq), &float(&pk), &float(&v), &cfg()).unwrap();
    assert_close("f16 vs f32", &out, &reference, 1e-3);
}

/// The fused kernels leave calls they do not cover (here: the CPU) to the libtorch kernels, and
/// say why; the output is then `chunked`'s.
#[test]
fn fused_kernels_decline_what_they_do_not_cover() {
    use linearize_torch_ext::linear_attn as fused;
    seed(7);
    let s = setup(1, 70, Kind::Float);
    let (pq, pk) = tch::no_grad(|| s.phi());
    let why = fused::unsupported(&pq, &pk, &s.v).expect("the CPU is not covered");
    assert!(why.contains("CUDA"), "{why}");
    let off = LinearAttnConfig {
        fused: false,
        ..cfg()
    };
    let with = linear_attn::chunked_output(&pq, &pk, &s.v, &cfg()).unwrap();
    let without = linear_attn::chunked_output(&pq, &pk, &s.v, &off).unwrap();
    let (chunked, _) = linear_attn::chunked(&pq, &pk, &s.v, &cfg(), None).unwrap();
    assert!(with.equal(&without) && with.equal(&chunked));
}

/// The fused CUDA kernels against the naive form in f64 on the same rounded inputs: output and
/// gradients to φq, φk and v, in bf16 and f16, with GQA values (and key features with fewer heads
/// than the queries), ragged lengths, both compiled head sizes, feature widths 64 to 256,
/// Hedgehog-like (softmax) and T2R-like (ReLU) features and eps from 1e-12 to 1e-3. Outputs by
/// their largest error; gradients by rms(error) / rms (flash-linear-attention's measure) and by
/// the largest error. On a GPU machine:
/// `cargo test --release -p linearize-attention --test linear_attn -- --ignored`.
#[test]
#[ignore = "needs a CUDA device"]
fn fused_kernels_match_naive_on_cuda() {
    use linearize_torch_ext::linear_attn as fused;
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device: this test is for a GPU machine"
    );
    let dev = Device::Cuda(0);
    let cases = [
        // batch, heads, key-feature heads, value heads, length, head size, features, dtype,
        // ReLU features, eps
        (2, 4, 4, 2, 300, 64, 64, Kind::BFloat16, false, 1e-12),
        (1, 4, 4, 4, 1000, 128, 128, Kind::BFloat16, false, 1e-12),
        (1, 2, 2, 1, 257, 128, 256, Kind::BFloat16, true, 1e-3),
        (2, 8, 8, 2, 640, 128, 128, Kind::Half, false, 1e-12),
        (1, 3, 3, 3, 129, 64, 128, Kind::Half, true, 1e-6),
        (1, 4, 2, 2, 64, 64, 64, Kind::BFloat16, false, 1e-12),
        (1, 2, 2, 2, 4096, 128, 128, Kind::BFloat16, false, 1e-12),
    ];
    for (i, (b, h, hk, hv, len, d, f, kind, relu, eps)) in cases.into_iter().enumerate() {
        seed(70 + i as i64);
        let features = |heads: i64| {
            let x = Tensor::randn([b, heads, len, f], (Kind::Float, dev));
            let x = if relu {
                (x - 0.5).relu()
            } else {
                (x * 2.0).softmax(-1, Kind::Float)
            };
            x.to_kind(kind).set_requires_grad(true)
        };
        let (pq, pk) = (features(h), features(hk));
        let v = Tensor::randn([b, hv, len, d], (Kind::Float, dev))
            .to_kind(kind)
            .set_requires_grad(true);
        assert_eq!(fused::unsupported(&pq, &pk, &v), None, "case {i}");
        let cfg = LinearAttnConfig {
            eps,
            ..LinearAttnConfig::default()
        };
        let y = linear_attn::chunked_output(&pq, &pk, &v, &cfg).unwrap();
        assert_eq!(y.kind(), kind, "case {i}: output dtype");

        let f64_leaf = |t: &Tensor| t.detach().to_kind(Kind::Double).set_requires_grad(true);
        let ours = [&pq, &pk, &v];
        let theirs = ours.map(f64_leaf);
        let reference = linear_attn::naive(&theirs[0], &theirs[1], &theirs[2], &cfg).unwrap();
        let what = format!("case {i} (b {b}, h {h}/{hk}/{hv}, L {len}, d {d}, f {f}, {kind:?})");
        let max_err = |a: &Tensor, e: &Tensor| {
            (a.to_kind(Kind::Double) - e).abs().max().double_value(&[])
                / e.abs().max().double_value(&[]).max(1e-12)
        };
        let err = max_err(&y, &reference);
        assert!(err < 2e-2, "{what}: output: relative error {err:e}");
        let probe = reference.randn_like();
        let got = grads(&y, &probe.to_kind(kind), &ours);
        let want = grads(&reference, &probe, &theirs.each_ref());
        for (name, (a, e)) in ["phi_q", "phi_k", "v"].iter().zip(got.iter().zip(&want)) {
            let (rms, max) = (rms_err(a, e), max_err(a, e));
            assert!(
                rms < 2e-2 && max < 5e-2,
                "{what}: grad {name}: rms error {rms:e}, largest {max:e}"
            );
        }
    }
}
