//! Gated DeltaNet: the naive (per-token definition), chunked (WY / UT, log space) and recurrent
//! forms agree in values and gradients, also for decays of e^-20 per token and β near 1.
mod common;

use common::*;
use linearize_attention::ops::gated_deltanet::{
    self as gdn, l2_normalize, GatedDeltaNetConfig, GatedDeltaNetState,
};
use tch::{Kind, Tensor};

const D: i64 = 16;
const CHUNK: i64 = 16;

fn cfg() -> GatedDeltaNetConfig {
    GatedDeltaNetConfig { chunk_size: CHUNK }
}

/// Leaves for one call: 4 query heads, 2 key / value heads, log-decays for 4 heads and β for 2
/// (every GQA repeat is exercised). Keys are unit vectors, as the layer feeds them.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
}

/// `g` uniform in [g_min, 0] per token, β uniform in [beta_min, 1].
fn inputs(batch: i64, len: i64, kind: Kind, g_min: f64, beta_min: f64) -> Inputs {
    let leaf_of = |t: Tensor| t.detach().set_requires_grad(true);
    let uniform = |shape: &[i64], lo: f64, hi: f64| {
        Tensor::rand(shape, (kind, tch::Device::Cpu)) * (hi - lo) + lo
    };
    Inputs {
        q: leaf(&[batch, 4, len, D], kind),
        k: leaf_of(l2_normalize(&randn(&[batch, 2, len, D], kind)).unwrap()),
        v: leaf(&[batch, 2, len, 8], kind),
        g: leaf_of(uniform(&[batch, 4, len], g_min, 0.0)),
        beta: leaf_of(uniform(&[batch, 2, len], beta_min, 1.0)),
    }
}

impl Inputs {
    fn named(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
            ("g", &self.g),
            ("beta", &self.beta),
        ]
    }

    fn naive(&self) -> Tensor {
        gdn::naive(&self.q, &self.k, &self.v, &self.g, &self.beta).unwrap()
    }

    fn chunked(
        &self,
        c: &GatedDeltaNetConfig,
        state: Option<&GatedDeltaNetState>,
    ) -> (Tensor, GatedDeltaNetState) {
        gdn::chunked(&self.q, &self.k, &self.v, &self.g, &self.beta, c, state).unwrap()
    }

    fn recurrent(&self, state: Option<GatedDeltaNetState>) -> (Tensor, GatedDeltaNetState) {
        gdn::recurrent(&self.q, &self.k, &self.v, &self.g, &self.beta, state).unwrap()
    }

    /// Tokens `from .. from + n` (as leaves of their own).
    fn part(&self, from: i64, n: i64) -> Self {
        let cut = |t: &Tensor| t.narrow(2, from, n).detach().set_requires_grad(true);
        Self {
            q: cut(&self.q),
            k: cut(&self.k),
            v: cut(&self.v),
            g: cut(&self.g),
            beta: cut(&self.beta),
        }
    }
}

#[test]
fn chunked_matches_naive_forward_and_gradients() {
    seed(40);
    for kind in [Kind::Float, Kind::Double] {
        let tol = if kind == Kind::Float { 1e-5 } else { 1e-10 };
        for len in lengths(8, CHUNK) {
            let x = inputs(2, len, kind, -1.0, 0.0);
            let (chunked, _) = x.chunked(&cfg(), None);
            assert_same_grads(
                &format!("{kind:?} len {len}"),
                &chunked,
                &x.naive(),
                &x.named(),
                tol,
            );
        }
    }
}

#[test]
fn recurrent_matches_naive_and_chunked_and_their_states_agree() {
    seed(41);
    for len in lengths(8, CHUNK) {
        let x = inputs(3, len, Kind::Double, -1.0, 0.0);
        let (chunked, end_c) = x.chunked(&cfg(), None);
        let (recurrent, end_r) = x.recurrent(None);
        assert_same_grads(
            &format!("len {len}: recurrent vs naive"),
            &recurrent,
            &x.naive(),
            &x.named(),
            1e-10,
        );
        assert_close(&format!("len {len}"), &recurrent, &chunked, 1e-10);
        assert_close("state", &end_r.s, &end_c.s, 1e-10);
    }
}

#[test]
fn prefill_then_decode_matches_the_full_sequence() {
    seed(42);
    let len = 3 * CHUNK + 5;
    let x = inputs(2, len, Kind::Float, -1.0, 0.0);
    let (full, end) = x.chunked(&cfg(), None);
    for split in [1, 5, CHUNK, CHUNK + 1, len - 1] {
        let (head, tail) = (x.part(0, split), x.part(split, len - split));
        let (y0, state) = head.chunked(&cfg(), None);
        let (decoded, end_decoded) = tail.recurrent(Some(state.shallow_clone()));
        let (continued, end_continued) = tail.chunked(&cfg(), Some(&state));
        let rest = full.narrow(2, split, len - split);
        let what = format!("split {split}");
        assert_close(
            &format!("{what}: prefill"),
            &y0,
            &full.narrow(2, 0, split),
            1e-5,
        );
        assert_close(&format!("{what}: decode"), &decoded, &rest, 1e-5);
        assert_close(&format!("{what}: continued"), &continued, &rest, 1e-5);
        assert_close(
            &format!("{what}: decode state"),
            &end_decoded.s,
            &end.s,
            1e-5,
        );
        assert_close(
            &format!("{what}: continued state"),
            &end_continued.s,
            &end.s,
            1e-5,
        );
    }
}

#[test]
fn the_state_grows_with_heads_not_tokens_and_prefill_gradients_reach_the_state() {
    seed(43);
    let x = inputs(2, 2 * CHUNK + 3, Kind::Double, -1.0, 0.0);
    let (_, state) = x.chunked(&cfg(), None);
    assert_eq!(state.s.size(), [2, 4, D, 8]);
    // A continuation's gradient flows back into the prefix through the state: the same as one
    // pass over both.
    let (head, tail) = (x.part(0, CHUNK + 3), x.part(CHUNK + 3, CHUNK));
    let (_, mid) = head.chunked(&cfg(), None);
    let (y, _) = tail.chunked(&cfg(), Some(&mid));
    let (full, _) = x.part(0, 2 * CHUNK + 3).chunked(&cfg(), None);
    assert_close("continued", &y, &full.narrow(2, CHUNK + 3, CHUNK), 1e-10);
    let probe = y.randn_like();
    let via_state = grads(&y, &probe, &[&head.v])[0].shallow_clone();
    assert!(
        via_state.abs().max().double_value(&[]) > 1e-3,
        "the prefix's values get no gradient through the carried state"
    );
}

#[test]
fn strong_decays_and_beta_near_one_stay_finite_and_exact() {
    seed(44);
    let len = 3 * CHUNK + 5;
    // f64: g down to -20 per token (a chunk's cumulative decay reaches e^-1000, past f64's
    // range) and β in [0.999, 1]; the default chunking and the test one.
    for c in [GatedDeltaNetConfig::default(), cfg()] {
        let x = inputs(2, len, Kind::Double, -20.0, 0.999);
        let (chunked, state) = x.chunked(&c, None);
        assert_finite("state", &state.s);
        assert_same_grads(
            &format!("f64 strong decays, chunk {}", c.chunk_size),
            &chunked,
            &x.naive(),
            &x.named(),
            1e-10,
        );
    }
    // f32, β exactly 1 and g exactly -20 everywhere.
    let x = inputs(2, len, Kind::Float, -1.0, 0.0);
    let fixed = |t: &Tensor, value: f64| (t.zeros_like() + value).set_requires_grad(true);
    let x = Inputs {
        g: fixed(&x.g, -20.0),
        beta: fixed(&x.beta, 1.0),
        ..x
    };
    let (chunked, state) = x.chunked(&GatedDeltaNetConfig::default(), None);
    assert_finite("state", &state.s);
    let probe = chunked.randn_like();
    for ((name, _), grad) in
        x.named()
            .iter()
            .zip(grads(&chunked, &probe, &[&x.q, &x.k, &x.v, &x.g, &x.beta]))
    {
        assert_finite(&format!("grad {name}"), &grad);
    }
    assert_same_grads(
        "f32 g = -20, beta = 1",
        &chunked,
        &x.naive(),
        &x.named(),
        1e-5,
    );
}

#[test]
fn beta_one_without_decay_overwrites_a_key() {
    // The delta rule's defining property: writing v1 then v2 under the same unit key with β = 1
    // and no decay leaves exactly v2 there (plain linear attention would return v1 + v2).
    seed(45);
    let opts = (Kind::Double, tch::Device::Cpu);
    let key = Tensor::randn([1, 1, 1, D], opts);
    let key = &key / key.norm();
    let k = key.repeat([1, 1, 3, 1]);
    let v = Tensor::randn([1, 1, 3, 8], opts);
    let g = Tensor::zeros([1, 1, 3], opts);
    let beta = Tensor::ones([1, 1, 3], opts);
    let (y, _) = gdn::chunked(&k, &k, &v, &g, &beta, &cfg(), None).unwrap();
    for t in 0..3 {
        assert_close(
            &format!("token {t}"),
            &y.narrow(2, t, 1),
            &v.narrow(2, t, 1),
            1e-12,
        );
    }
}

#[test]
fn defaults_chunked_matches_naive() {
    seed(46);
    let x = inputs(1, 150, Kind::Float, -1.0, 0.0);
    let (chunked, _) = x.chunked(&GatedDeltaNetConfig::default(), None);
    assert_close("defaults", &chunked, &x.naive(), 1e-5);
}

/// Output and gradient bound of the f16 / bf16 chunked form against the f32 naive form on the
/// same values (rms error, fla's measure for low-precision gradients).
const LOW_PRECISION_TOL: f64 = 3e-2;

#[test]
fn low_precision_chunked_matches_the_f32_naive_with_gradients() {
    seed(47);
    for low in LOW_PRECISION {
        for (g_min, beta_min) in [(-1.0, 0.0), (-20.0, 0.99)] {
            let x = inputs(2, 3 * CHUNK + 5, Kind::Float, g_min, beta_min);
            let (q, q32) = rounded(&x.q, low);
            let (k, k32) = rounded(&x.k, low);
            let (v, v32) = rounded(&x.v, low);
            let (g, g32) = rounded(&x.g, low);
            let (beta, beta32) = rounded(&x.beta, low);
            let (out, state) = gdn::chunked(&q, &k, &v, &g, &beta, &cfg(), None).unwrap();
            assert_eq!(state.s.kind(), Kind::Float);
            let reference = gdn::naive(&q32, &k32, &v32, &g32, &beta32).unwrap();
            let what = format!("{low:?} g >= {g_min}, beta >= {beta_min}");
            let grads = low_precision_grads(
                &what,
                &out,
                &[("q", &q), ("k", &k), ("v", &v), ("g", &g), ("beta", &beta)],
                &reference,
                &[&q32, &k32, &v32, &g32, &beta32],
                LOW_PRECISION_TOL,
            );
            for (name, (low_grad, ref_grad)) in ["q", "k", "v", "g", "beta"].iter().zip(&grads) {
                let err = rms_err(low_grad, ref_grad);
                assert!(
                    err <= LOW_PRECISION_TOL,
                    "{what}: grad {name} rms error {err:e}"
                );
            }
        }
    }
}

#[test]
fn bad_inputs_are_rejected_with_the_tensor_named() {
    let x = inputs(1, 4, Kind::Float, -1.0, 0.0);
    let call = |g: &Tensor, beta: &Tensor, c: &GatedDeltaNetConfig| {
        gdn::chunked(&x.q, &x.k, &x.v, g, beta, c, None)
            .unwrap_err()
            .to_string()
    };
    let err = call(&(x.g.detach() + 2.0), &x.beta, &cfg());
    assert!(err.starts_with("g:"), "{err}");
    let err = call(&x.g, &(x.beta.detach() + 1.5), &cfg());
    assert!(err.starts_with("beta:"), "{err}");
    let err = call(&x.g.unsqueeze(-1), &x.beta, &cfg());
    assert!(err.starts_with("g:"), "{err}");
    let err = call(&x.g, &x.beta.narrow(1, 0, 1).repeat([1, 3, 1]), &cfg());
    assert!(err.starts_with("beta:"), "{err}");
    let err = call(&x.g, &x.beta, &GatedDeltaNetConfig { chunk_size: 0 });
    assert!(err.starts_with("chunk_size:"), "{err}");
    let wrong = GatedDeltaNetState {
        s: Tensor::zeros([1, 2, D, 8], (Kind::Float, tch::Device::Cpu)),
    };
    let err = gdn::chunked(&x.q, &x.k, &x.v, &x.g, &x.beta, &cfg(), Some(&wrong))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("state.s:"), "{err}");
}
