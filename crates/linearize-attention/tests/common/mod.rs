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
