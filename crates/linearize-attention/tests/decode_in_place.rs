//! Every method's decoding step updates its state in place: after a prefill and one step (which
//! may still move the state into its ring layout), each of five further steps leaves every state
//! tensor at the same address, allocates nothing on the CPU as large as half the smallest of the
//! state's sums and window caches (libtorch's profiler records every allocation), and still
//! gives the full pass's output. A step that built a new state and copied it back, or joined its
//! cache with `cat`, would allocate a tensor of the state's size and fail here.
mod common;

use common::*;
use linearize_attention::ops::gated_deltanet::{self as gdn, GatedDeltaNetConfig};
use linearize_attention::ops::gdn_window::{self, GdnWindowConfig, GdnWindowInputs};
use linearize_attention::ops::gla::{self, GlaConfig};
use linearize_attention::ops::liger::{self, LigerConfig, LigerInputs};
use linearize_attention::ops::linear_attn::{self, LinearAttnConfig};
use linearize_attention::ops::lizard::{self, LizardConfig, LizardInputs};
use linearize_attention::ops::lolcats::{self, LolcatsConfig, LolcatsInputs};
use linearize_attention::ops::swa::{self, SwaConfig};
use linearize_attention::ops::window::WindowShape;
use linearize_torch_ext::profiler::Profiler;
use std::sync::Mutex;
use tch::{Kind, Tensor};

const B: i64 = 2;
/// Query heads; keys, values and key features have `HK` (GQA).
const H: i64 = 4;
const HK: i64 = 2;
const D: i64 = 32;
const W: i64 = 16;
const CHUNK: i64 = 16;
const SINKS: i64 = 2;
/// Past the sinks and two terrace windows: the caches are full rings.
const PREFIX: i64 = 80;
const STEPS: i64 = 5;
const LEN: i64 = PREFIX + 1 + STEPS;

/// One profiler per process: the tests of this file take turns.
static PROFILER: Mutex<()> = Mutex::new(());

/// The largest CPU allocation recorded in the Chrome trace at `path`, in bytes.
fn largest_cpu_allocation(path: &std::path::Path) -> i64 {
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == "[memory]" && e["args"]["Device Type"] == 0)
        .filter_map(|e| e["args"]["Bytes"].as_i64())
        .max()
        .unwrap_or(0)
}

fn addresses(tensors: &[(&'static str, Tensor)]) -> Vec<(&'static str, usize)> {
    tensors
        .iter()
        .map(|(name, t)| (*name, t.data_ptr() as usize))
        .collect()
}

/// Prefills `PREFIX` tokens, decodes one, then checks the next `STEPS` steps as the module docs
/// say. `tensors` lists the state's tensors by name; those named in `sized` are its sums and
/// window caches, whose size bounds the allocations.
fn check_in_place<S>(
    what: &str,
    full: &Tensor,
    prefill: impl Fn(i64) -> S,
    step: impl Fn(&mut S, i64) -> Tensor,
    tensors: impl Fn(&S) -> Vec<(&'static str, Tensor)>,
    sized: &[&str],
) {
    let _turn = PROFILER.lock().unwrap_or_else(|e| e.into_inner());
    tch::no_grad(|| {
        let mut state = prefill(PREFIX);
        let mut outputs = vec![step(&mut state, PREFIX)];
        let before = addresses(&tensors(&state));
        let smallest = tensors(&state)
            .iter()
            .filter(|(name, _)| sized.contains(name))
            .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as i64)
            .min()
            .unwrap();
        assert!(smallest >= 4096, "{what}: state too small to tell apart");

        let trace = std::env::temp_dir().join(format!(
            "linearize-decode-in-place-{}-{what}.json",
            std::process::id()
        ));
        let profiler = Profiler::start_recording_memory(false).unwrap();
        for t in PREFIX + 1..LEN {
            outputs.push(step(&mut state, t));
            assert_eq!(
                addresses(&tensors(&state)),
                before,
                "{what}: step {t} moved a state tensor"
            );
        }
        profiler.finish(&trace).unwrap();
        let largest = largest_cpu_allocation(&trace);
        std::fs::remove_file(&trace).unwrap();
        assert!(
            largest > 0,
            "{what}: the profiler recorded no allocation at all"
        );
        assert!(
            largest < smallest / 2,
            "{what}: a step allocated {largest} bytes; the smallest sum or cache takes {smallest}"
        );

        for (i, y) in outputs.iter().enumerate() {
            let t = PREFIX + i as i64;
            assert_close(
                &format!("{what}: token {t}"),
                y,
                &full.narrow(2, t, 1),
                1e-5,
            );
        }
    });
}

fn token(x: &Tensor, t: i64) -> Tensor {
    x.narrow(2, t, 1)
}

fn prefix(x: &Tensor, len: i64) -> Tensor {
    x.narrow(2, 0, len)
}

fn features(heads: i64) -> Tensor {
    randn(&[B, heads, LEN, D], Kind::Float).softmax(-1, Kind::Float)
}

fn log_gates(shape: &[i64]) -> Tensor {
    (randn(shape, Kind::Float) - 3.0).log_sigmoid() / 8.0
}

#[test]
fn linear_attention_steps_in_place() {
    seed(1);
    let (pq, pk, v) = (
        features(H),
        features(HK),
        randn(&[B, HK, LEN, D], Kind::Float),
    );
    let cfg = LinearAttnConfig {
        chunk_size: CHUNK,
        eps: 1e-12,
        fused: false,
    };
    let (full, _) = linear_attn::chunked(&pq, &pk, &v, &cfg, None).unwrap();
    check_in_place(
        "linear",
        &full,
        |len| {
            let (p, k, v) = (prefix(&pq, len), prefix(&pk, len), prefix(&v, len));
            linear_attn::chunked(&p, &k, &v, &cfg, None).unwrap().1
        },
        |s, t| linear_attn::step(s, &token(&pq, t), &token(&pk, t), &token(&v, t), &cfg).unwrap(),
        |s| {
            vec![
                ("kv", s.kv.shallow_clone()),
                ("k_sum", s.k_sum.shallow_clone()),
            ]
        },
        &["kv"],
    );
}

#[test]
fn gla_steps_in_place() {
    seed(2);
    let (q, k) = (features(H), features(HK));
    let v = randn(&[B, HK, LEN, D], Kind::Float);
    let g = log_gates(&[B, HK, LEN, D]);
    let cfg = GlaConfig {
        chunk_size: CHUNK,
        sub_chunk: 4,
        fused: false,
    };
    let (full, _) = gla::chunked(&q, &k, &v, &g, &cfg, None).unwrap();
    check_in_place(
        "gla",
        &full,
        |len| {
            let p = |x: &Tensor| prefix(x, len);
            gla::chunked(&p(&q), &p(&k), &p(&v), &p(&g), &cfg, None)
                .unwrap()
                .1
        },
        |s, t| {
            let x = |x: &Tensor| token(x, t);
            gla::step(s, &x(&q), &x(&k), &x(&v), &x(&g)).unwrap()
        },
        |s| vec![("s", s.s.shallow_clone())],
        &["s"],
    );
}

#[test]
fn gated_deltanet_steps_in_place() {
    seed(3);
    let unit = |heads| {
        let x = randn(&[B, heads, LEN, D], Kind::Float);
        &x / x.norm_scalaropt_dim(2, [-1i64].as_slice(), true)
    };
    let (q, k) = (unit(H), unit(HK));
    let v = randn(&[B, HK, LEN, D], Kind::Float);
    let g = log_gates(&[B, H, LEN]);
    let beta = randn(&[B, H, LEN], Kind::Float).sigmoid();
    let cfg = GatedDeltaNetConfig { chunk_size: CHUNK };
    let (full, _) = gdn::chunked(&q, &k, &v, &g, &beta, &cfg, None).unwrap();
    check_in_place(
        "gated_deltanet",
        &full,
        |len| {
            let p = |x: &Tensor| prefix(x, len);
            gdn::chunked(&p(&q), &p(&k), &p(&v), &p(&g), &p(&beta), &cfg, None)
                .unwrap()
                .1
        },
        |s, t| {
            let x = |x: &Tensor| token(x, t);
            gdn::step(s, &x(&q), &x(&k), &x(&v), &x(&g), &x(&beta)).unwrap()
        },
        |s| vec![("s", s.s.shallow_clone())],
        &["s"],
    );
}

#[test]
fn gdn_window_steps_in_place() {
    seed(13);
    let unit = |heads| {
        let x = randn(&[B, heads, LEN, D], Kind::Float);
        &x / x.norm_scalaropt_dim(2, [-1i64].as_slice(), true)
    };
    let (delta_q, delta_k) = (unit(H), unit(HK));
    let (q, k, v) = (
        randn(&[B, H, LEN, D], Kind::Float),
        randn(&[B, HK, LEN, D], Kind::Float),
        randn(&[B, HK, LEN, D], Kind::Float),
    );
    let g = log_gates(&[B, H, LEN]);
    let beta = randn(&[B, H, LEN], Kind::Float).sigmoid();
    let scale = randn(&[H], Kind::Float);
    let cfg = GdnWindowConfig {
        window_size: W,
        chunk_size: CHUNK,
        sinks: SINKS,
    };
    let inputs = |f: &dyn Fn(&Tensor) -> Tensor| [&q, &k, &v, &delta_q, &delta_k, &g, &beta].map(f);
    fn call<'a>(x: &'a [Tensor; 7], delta_scale: &'a Tensor) -> GdnWindowInputs<'a> {
        GdnWindowInputs {
            q: &x[0],
            k: &x[1],
            v: &x[2],
            delta_q: &x[3],
            delta_k: &x[4],
            g: &x[5],
            beta: &x[6],
            delta_scale,
        }
    }
    let all = inputs(&Tensor::shallow_clone);
    let (full, _) = gdn_window::chunked(&call(&all, &scale), &cfg, None).unwrap();
    check_in_place(
        "gdn_window",
        &full,
        |len| {
            let x = inputs(&|x| prefix(x, len));
            gdn_window::chunked(&call(&x, &scale), &cfg, None)
                .unwrap()
                .1
        },
        |s, t| {
            let x = inputs(&|x| token(x, t));
            gdn_window::step(s, &call(&x, &scale), &cfg, None).unwrap()
        },
        |s| {
            vec![
                ("k", s.window.k.shallow_clone()),
                ("v", s.window.v.shallow_clone()),
                ("delta_k", s.delta_k.shallow_clone()),
                ("g", s.g.shallow_clone()),
                ("beta", s.beta.shallow_clone()),
                ("s", s.delta.s.shallow_clone()),
            ]
        },
        &["k", "v", "delta_k", "s"],
    );
}

#[test]
fn sliding_window_steps_in_place() {
    for sinks in [0, SINKS] {
        seed(4 + sinks);
        let q = randn(&[B, H, LEN, D], Kind::Float);
        let (k, v) = (
            randn(&[B, HK, LEN, D], Kind::Float),
            randn(&[B, HK, LEN, D], Kind::Float),
        );
        let cfg = SwaConfig {
            window_size: W,
            chunk_size: CHUNK,
            sinks,
        };
        let (full, _) = swa::chunked(&q, &k, &v, &cfg, None).unwrap();
        check_in_place(
            &format!("swa sinks {sinks}"),
            &full,
            |len| {
                let p = |x: &Tensor| prefix(x, len);
                swa::chunked(&p(&q), &p(&k), &p(&v), &cfg, None).unwrap().1
            },
            |s, t| {
                let x = |x: &Tensor| token(x, t);
                swa::step(s, &x(&q), &x(&k), &x(&v), &cfg, None).unwrap()
            },
            |s| {
                vec![
                    ("k", s.k.shallow_clone()),
                    ("v", s.v.shallow_clone()),
                    ("sinks.k", s.sinks.k.shallow_clone()),
                    ("sinks.v", s.sinks.v.shallow_clone()),
                ]
            },
            &["k", "v"],
        );
    }
}

#[test]
fn liger_steps_in_place() {
    seed(6);
    let (q, k) = (
        randn(&[B, H, LEN, D], Kind::Float),
        randn(&[B, HK, LEN, D], Kind::Float),
    );
    let (q_rope, k_rope) = (
        randn(&[B, H, LEN, D], Kind::Float),
        randn(&[B, HK, LEN, D], Kind::Float),
    );
    let v = randn(&[B, HK, LEN, D], Kind::Float);
    let cfg = LigerConfig {
        window_size: W,
        chunk_size: CHUNK,
        sub_chunk: 4,
        sinks: SINKS,
        fused: false,
        ..Default::default()
    };
    let inputs = |f: &dyn Fn(&Tensor) -> Tensor| (f(&q), f(&k), f(&q_rope), f(&k_rope), f(&v));
    fn run(x: &(Tensor, Tensor, Tensor, Tensor, Tensor)) -> LigerInputs<'_> {
        LigerInputs {
            q: &x.0,
            k: &x.1,
            q_rope: &x.2,
            k_rope: &x.3,
            v: &x.4,
        }
    }
    let (full, _) = liger::chunked(&run(&inputs(&|x| x.shallow_clone())), &cfg, None).unwrap();
    check_in_place(
        "liger",
        &full,
        |len| {
            let x = inputs(&|x| prefix(x, len));
            liger::chunked(&run(&x), &cfg, None).unwrap().1
        },
        |s, t| {
            let x = inputs(&|x| token(x, t));
            liger::step(s, &run(&x), &cfg, None).unwrap()
        },
        |s| {
            vec![
                ("window.k", s.window.k.shallow_clone()),
                ("window.v", s.window.v.shallow_clone()),
                ("window.sinks.k", s.window.sinks.k.shallow_clone()),
                ("window.sinks.v", s.window.sinks.v.shallow_clone()),
                ("gla.s", s.gla.s.shallow_clone()),
            ]
        },
        &["window.k", "window.v", "gla.s"],
    );
}

/// LoLCATs' and Lizard's inputs: q, k, v, φq, φk, log-gates (Lizard only) and window factors.
struct Windowed {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    phi_q: Tensor,
    phi_k: Tensor,
    g: Tensor,
    factors: Tensor,
}

impl Windowed {
    fn new() -> Self {
        Self {
            q: randn(&[B, H, LEN, D], Kind::Float),
            k: randn(&[B, HK, LEN, D], Kind::Float),
            v: randn(&[B, HK, LEN, D], Kind::Float),
            phi_q: features(H),
            phi_k: features(HK),
            g: log_gates(&[B, H, LEN]),
            factors: randn(&[H], Kind::Float),
        }
    }

    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Self {
        Self {
            q: f(&self.q),
            k: f(&self.k),
            v: f(&self.v),
            phi_q: f(&self.phi_q),
            phi_k: f(&self.phi_k),
            g: f(&self.g),
            factors: self.factors.shallow_clone(),
        }
    }

    fn lolcats(&self) -> LolcatsInputs<'_> {
        LolcatsInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            phi_q: &self.phi_q,
            phi_k: &self.phi_k,
            window_factors: &self.factors,
        }
    }

    fn lizard(&self) -> LizardInputs<'_> {
        LizardInputs {
            q: &self.q,
            k: &self.k,
            v: &self.v,
            phi_q: &self.phi_q,
            phi_k: &self.phi_k,
            log_gates: &self.g,
            window_factors: &self.factors,
        }
    }
}

const WINDOWS: [(WindowShape, i64); 3] = [
    (WindowShape::Sw, 0),
    (WindowShape::Tk, 0),
    (WindowShape::Sw, SINKS),
];

#[test]
fn lolcats_steps_in_place() {
    for (shape, sinks) in WINDOWS {
        seed(7);
        let x = Windowed::new();
        let cfg = LolcatsConfig {
            window_shape: shape,
            window_size: W,
            chunk_size: CHUNK,
            fused: false,
            sinks,
        };
        let (full, _) = lolcats::chunked(&x.lolcats(), &cfg, None).unwrap();
        check_in_place(
            &format!("lolcats {shape:?} sinks {sinks}"),
            &full,
            |len| {
                let p = x.map(|t| prefix(t, len));
                lolcats::chunked(&p.lolcats(), &cfg, None).unwrap().1
            },
            |s, t| lolcats::step(s, &x.map(|x| token(x, t)).lolcats(), &cfg, None).unwrap(),
            |s| {
                vec![
                    ("k", s.k.shallow_clone()),
                    ("phi_k", s.phi_k.shallow_clone()),
                    ("v", s.v.shallow_clone()),
                    ("linear.kv", s.linear.kv.shallow_clone()),
                    ("linear.k_sum", s.linear.k_sum.shallow_clone()),
                    ("sinks.k", s.sinks.k.shallow_clone()),
                    ("sinks.v", s.sinks.v.shallow_clone()),
                ]
            },
            &["k", "phi_k", "v", "linear.kv"],
        );
    }
}

#[test]
fn lizard_steps_in_place() {
    for (shape, sinks) in WINDOWS {
        seed(8);
        let x = Windowed::new();
        let cfg = LizardConfig {
            window_shape: shape,
            window_size: W,
            chunk_size: CHUNK,
            sinks,
        };
        let (full, _) = lizard::chunked(&x.lizard(), &cfg, None).unwrap();
        check_in_place(
            &format!("lizard {shape:?} sinks {sinks}"),
            &full,
            |len| {
                let p = x.map(|t| prefix(t, len));
                lizard::chunked(&p.lizard(), &cfg, None).unwrap().1
            },
            |s, t| lizard::step(s, &x.map(|x| token(x, t)).lizard(), &cfg, None).unwrap(),
            |s| {
                vec![
                    ("k", s.k.shallow_clone()),
                    ("phi_k", s.phi_k.shallow_clone()),
                    ("v", s.v.shallow_clone()),
                    ("log_gates", s.log_gates.shallow_clone()),
                    ("linear.kv", s.linear.kv.shallow_clone()),
                    ("linear.k_sum", s.linear.k_sum.shallow_clone()),
                    ("sinks.k", s.sinks.k.shallow_clone()),
                    ("sinks.v", s.sinks.v.shallow_clone()),
                ]
            },
            &["k", "phi_k", "v", "linear.kv"],
        );
    }
}
