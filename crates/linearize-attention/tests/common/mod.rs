//! Helpers shared by the kernel tests: seeded inputs, error measures and gradient comparison.
#![allow(dead_code)]
use tch::{Device, Kind, Tensor};

/// Sequence lengths every kernel is checked at for window `w` and chunk `c`: a single token,
/// shorter than the window, around the window, and several chunks plus a remainder.
pub fn lengths(w: i64, c: i64) -> Vec<i64> {
    vec![1, 7, w - 1, w, w + 1, 3 * c + 5]
}

pub fn seed(s: i64) {
    tch::manual_seed(s);
}

pub fn randn(shape: &[i64], kind: Kind) -> Tensor {
    Tensor::randn(shape, (kind, Device::Cpu))
}

/// A leaf tensor that collects gradients.
pub fn leaf(shape: &[i64], kind: Kind) -> Tensor {
    randn(shape, kind).set_requires_grad(true)
}

/// max |a - b| / max(max |b|, 1): relative for values of order one and above, absolute below, so
/// that quantities that vanish in exact arithmetic (the q and k gradients of a one-token linear
/// attention, whose output is v) are compared by their rounding noise, not by noise / noise.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let diff = (&a - &b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]).max(1.0);
    diff / scale
}

#[track_caller]
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    let err = rel_err(a, b);
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

#[track_caller]
pub fn assert_finite(what: &str, t: &Tensor) {
    let finite = t.isfinite().all().int64_value(&[]) == 1;
    assert!(finite, "{what}: non-finite values");
}

/// Gradients of `sum(out * probe)` with respect to `inputs`, for a fixed random probe.
pub fn grads(out: &Tensor, probe: &Tensor, inputs: &[&Tensor]) -> Vec<Tensor> {
    let loss = (out * probe).sum(out.kind());
    let leaves: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
    let grads = Tensor::run_backward(&[loss], &leaves, true, false);
    // An input the graph does not reach has an undefined gradient: zero.
    grads
        .into_iter()
        .zip(inputs)
        .map(|(g, x)| if g.defined() { g } else { x.zeros_like() })
        .collect()
}

/// Asserts that two computations have the same output and the same gradients w.r.t. `inputs`.
#[track_caller]
pub fn assert_same_grads(what: &str, a: &Tensor, b: &Tensor, inputs: &[(&str, &Tensor)], tol: f64) {
    assert_close(&format!("{what}: output"), a, b, tol);
    let probe = a.randn_like().detach();
    let tensors: Vec<&Tensor> = inputs.iter().map(|(_, t)| *t).collect();
    let ga = grads(a, &probe, &tensors);
    let gb = grads(b, &probe, &tensors);
    for ((name, _), (x, y)) in inputs.iter().zip(ga.iter().zip(gb.iter())) {
        assert_close(&format!("{what}: grad {name}"), x, y, tol);
    }
}

/// The f16 / bf16 kinds every chunked kernel is checked in against its f32 reference.
pub const LOW_PRECISION: [Kind; 2] = [Kind::BFloat16, Kind::Half];

/// `x` rounded to `low`, and an f32 copy of the rounded values: both leaves that collect
/// gradients, the same inputs for a low-precision run and its f32 reference.
pub fn rounded(x: &Tensor, low: Kind) -> (Tensor, Tensor) {
    let low_x = x.detach().to_kind(low);
    let f32_x = low_x.to_kind(Kind::Float).set_requires_grad(true);
    (low_x.set_requires_grad(true), f32_x)
}

/// rms(a - b) / rms(b), flash-linear-attention's measure for low-precision gradients: it counts
/// rounding noise spread over all entries, not the few entries where a max resolves differently
/// once its arguments are rounded (LoLCATs' window max, whose gradient jumps between keys).
pub fn rms_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let a = a.to_kind(Kind::Double);
    let b = b.to_kind(Kind::Double);
    let rms = |x: &Tensor| x.square().mean(Kind::Double).sqrt().double_value(&[]);
    rms(&(&a - &b)) / rms(&b).max(f64::MIN_POSITIVE)
}

/// Checks `low`, computed in a low precision from `low_inputs`, against `reference`, computed in
/// f32 from `ref_inputs` (the same values, in the same order): its dtype and its output (by
/// [`rel_err`], within `tol`). Returns, per input, the low-precision gradient (checked to be
/// finite and of the input's dtype) and the reference one, for one probe whose values both
/// dtypes hold exactly.
#[track_caller]
pub fn low_precision_grads(
    what: &str,
    low: &Tensor,
    low_inputs: &[(&str, &Tensor)],
    reference: &Tensor,
    ref_inputs: &[&Tensor],
    tol: f64,
) -> Vec<(Tensor, Tensor)> {
    assert_eq!(
        low_inputs.len(),
        ref_inputs.len(),
        "{what}: input lists differ"
    );
    assert_eq!(low.kind(), low_inputs[0].1.kind(), "{what}: output dtype");
    assert_close(&format!("{what}: output"), low, reference, tol);
    let probe = reference.randn_like().to_kind(low.kind()).detach();
    let low_tensors: Vec<&Tensor> = low_inputs.iter().map(|(_, t)| *t).collect();
    let low_grads = grads(low, &probe, &low_tensors);
    let ref_grads = grads(reference, &probe.to_kind(reference.kind()), ref_inputs);
    for ((name, x), g) in low_inputs.iter().zip(&low_grads) {
        assert_eq!(g.kind(), x.kind(), "{what}: grad {name} dtype");
        assert_finite(&format!("{what}: grad {name}"), g);
    }
    low_grads.into_iter().zip(ref_grads).collect()
}

/// [`low_precision_grads`], with every gradient within `tol` of the reference by [`rel_err`].
#[track_caller]
pub fn assert_matches_f32_reference(
    what: &str,
    low: &Tensor,
    low_inputs: &[(&str, &Tensor)],
    reference: &Tensor,
    ref_inputs: &[&Tensor],
    tol: f64,
) {
    let grads = low_precision_grads(what, low, low_inputs, reference, ref_inputs, tol);
    for ((name, _), (g, r)) in low_inputs.iter().zip(&grads) {
        assert_close(&format!("{what}: grad {name}"), g, r, tol);
    }
}
