//! AdamW against torch's numbers and an f64 formula, master weights, clipping, state round trip;
//! each in both forms, the fused multi-tensor kernel and the per-tensor update.
use linearize_train::optim::{AdamW, AdamWConfig, Trainable};
use serde::Deserialize;
use tch::{Kind, Tensor};

fn param(values: &[f32], shape: &[i64], kind: Kind) -> Tensor {
    Tensor::from_slice(values)
        .reshape(shape)
        .to_kind(kind)
        .set_requires_grad(true)
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// Makes each parameter's gradient exactly `grads[i]`: d/dp sum(p * g) = g.
fn set_grads(params: &Trainable, grads: &[Vec<f32>]) {
    params.zero_grad();
    let loss = params
        .named()
        .iter()
        .zip(grads)
        .map(|((_, p), g)| {
            let g = Tensor::from_slice(g).reshape(p.size()).to_kind(p.kind());
            (p * g).sum(Kind::Float)
        })
        .reduce(|a, b| a + b)
        .unwrap();
    loss.backward();
}

fn assert_close(actual: &[f64], expected: &[f64], tol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tol * (1.0 + e.abs()),
            "{what}[{i}]: {a} vs {e}"
        );
    }
}

/// `config` as the fused and as the per-tensor optimizer.
fn both_forms(config: &AdamWConfig) -> [AdamWConfig; 2] {
    [true, false].map(|fused| AdamWConfig {
        fused,
        ..config.clone()
    })
}

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    config: AdamWConfig,
    shape: Vec<i64>,
    initial: Vec<f32>,
    grads: Vec<Vec<f32>>,
    after_each_step: Vec<Vec<f64>>,
}

#[test]
fn matches_torch_adamw_recorded_by_script() {
    let fixture: Fixture =
        serde_json::from_str(include_str!("fixtures/adamw_torch.json")).expect("fixture parses");
    for (index, case) in fixture.cases.iter().enumerate() {
        for config in both_forms(&case.config) {
            let p = param(&case.initial, &case.shape, Kind::Float);
            let params = Trainable::new(vec![("p".into(), p.shallow_clone())]).unwrap();
            let mut opt = AdamW::new(&params, config.clone()).unwrap();
            for (step, (grad, expected)) in case.grads.iter().zip(&case.after_each_step).enumerate()
            {
                set_grads(&params, std::slice::from_ref(grad));
                opt.step().unwrap();
                assert_close(
                    &values(&p),
                    expected,
                    2e-6,
                    &format!("case {index} (fused {}) step {step}", config.fused),
                );
            }
        }
    }
}

/// AdamW in f64, straight from the paper's update with torch's bias correction.
struct Reference {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Reference {
    fn step(&mut self, g: &[f32], c: &AdamWConfig) {
        self.t += 1;
        let (b1, b2) = (c.betas[0], c.betas[1]);
        for i in 0..self.p.len() {
            let g = f64::from(g[i]);
            self.p[i] *= 1.0 - c.lr * c.weight_decay;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            let m_hat = self.m[i] / (1.0 - b1.powi(self.t));
            let v_hat = self.v[i] / (1.0 - b2.powi(self.t));
            self.p[i] -= c.lr * m_hat / (v_hat.sqrt() + c.eps);
        }
    }
}

#[test]
fn matches_f64_formula_for_several_tensors() {
    let config = AdamWConfig {
        lr: 0.05,
        betas: [0.85, 0.98],
        eps: 1e-7,
        weight_decay: 0.2,
        fused: true,
    };
    for config in both_forms(&config) {
        check_against_f64_formula(&config);
    }
}

fn check_against_f64_formula(config: &AdamWConfig) {
    let init_a = [0.5f32, -1.25, 2.0, 0.125, -0.75, 1.5];
    let init_b = [3.0f32, -0.5];
    let params = Trainable::new(vec![
        ("a".into(), param(&init_a, &[2, 3], Kind::Float)),
        ("b".into(), param(&init_b, &[2], Kind::Float)),
    ])
    .unwrap();
    let mut opt = AdamW::new(&params, config.clone()).unwrap();
    let mut refs: Vec<Reference> = [&init_a[..], &init_b[..]]
        .iter()
        .map(|init| Reference {
            p: init.iter().map(|&x| f64::from(x)).collect(),
            m: vec![0.0; init.len()],
            v: vec![0.0; init.len()],
            t: 0,
        })
        .collect();
    for step in 0..6 {
        let grads: Vec<Vec<f32>> = refs
            .iter()
            .map(|r| {
                (0..r.p.len())
                    .map(|i| ((i + 1) as f32 * 0.3 - step as f32 * 0.2).sin())
                    .collect()
            })
            .collect();
        set_grads(&params, &grads);
        opt.step().unwrap();
        for ((name, tensor), (reference, grad)) in
            params.named().iter().zip(refs.iter_mut().zip(&grads))
        {
            reference.step(grad, config);
            assert_close(
                &values(tensor),
                &reference.p,
                1e-5,
                &format!("{name} (fused {}) step {step}", config.fused),
            );
        }
    }
}

#[test]
fn bf16_parameters_keep_full_precision_in_master_values() {
    for config in both_forms(&AdamWConfig::with_lr(1e-4)) {
        check_master_values(config);
    }
}

fn check_master_values(config: AdamWConfig) {
    // Steps of ~1e-4 are far below bf16's resolution at 1.0 (2^-7): updating the bf16 tensor
    // directly would never move it. The master value accumulates them.
    let grads = vec![vec![0.5f32, -0.25, 1.0, -2.0]];
    let low = param(&[1.0, 1.0, -1.0, 0.5], &[4], Kind::BFloat16);
    let full = param(&[1.0, 1.0, -1.0, 0.5], &[4], Kind::Float);
    let low_params = Trainable::new(vec![("w".into(), low.shallow_clone())]).unwrap();
    let full_params = Trainable::new(vec![("w".into(), full.shallow_clone())]).unwrap();
    let mut low_opt = AdamW::new(&low_params, config.clone()).unwrap();
    let mut full_opt = AdamW::new(&full_params, config).unwrap();
    for _ in 0..200 {
        set_grads(&low_params, &grads);
        set_grads(&full_params, &grads);
        low_opt.step().unwrap();
        full_opt.step().unwrap();
    }
    let state = low_opt.state_tensors();
    let master = &state
        .iter()
        .find(|(n, _)| n == "w.master")
        .expect("bf16 has a master")
        .1;
    assert_eq!(master.kind(), Kind::Float);
    // Same fp32 arithmetic on the same (bf16-exact) gradients: identical trajectories.
    assert!(
        master.equal(&full.detach()),
        "{:?} vs {:?}",
        values(master),
        values(&full)
    );
    assert_eq!(low.kind(), Kind::BFloat16);
    assert!(low.equal(&master.to_kind(Kind::BFloat16)));
    // Adam moves each weight by ~lr per step against the gradient's sign: 200 * 1e-4 = 0.02.
    assert_close(&values(master), &[0.98, 1.02, -1.02, 0.52], 1e-3, "master");
    assert!(
        values(&low)[0] < 1.0,
        "the bf16 weight moved: {:?}",
        values(&low)
    );
    assert!(!full_opt
        .state_tensors()
        .iter()
        .any(|(n, _)| n.ends_with(".master")));
}

#[test]
fn clipping_before_step_uses_the_clipped_gradient() {
    let init = [1.0f32, -1.0];
    let clipped_params =
        Trainable::new(vec![("w".into(), param(&init, &[2], Kind::Float))]).unwrap();
    let scaled_params =
        Trainable::new(vec![("w".into(), param(&init, &[2], Kind::Float))]).unwrap();
    let config = AdamWConfig {
        lr: 0.1,
        betas: [0.9, 0.999],
        eps: 1e-8,
        weight_decay: 0.0,
        fused: true,
    };
    let mut clipped = AdamW::new(&clipped_params, config.clone()).unwrap();
    let mut scaled = AdamW::new(&scaled_params, config).unwrap();
    for step in 0..3 {
        let g = [30.0f32 + step as f32, 40.0];
        set_grads(&clipped_params, &[g.to_vec()]);
        let norm = clipped_params.clip_grad_norm(1.0).unwrap();
        let expected = f64::from(g[0]).hypot(f64::from(g[1]));
        assert!(
            (norm - expected).abs() < 1e-4,
            "pre-clip norm {norm} vs {expected}"
        );
        clipped.step().unwrap();
        let factor = (1.0 / (expected + 1e-6)) as f32;
        set_grads(&scaled_params, &[g.iter().map(|x| x * factor).collect()]);
        scaled.step().unwrap();
    }
    assert_close(
        &values(&clipped_params.named()[0].1),
        &values(&scaled_params.named()[0].1),
        1e-6,
        "clipped vs pre-scaled",
    );
}

#[test]
fn parameters_without_gradient_are_skipped() {
    for config in both_forms(&AdamWConfig::with_lr(0.1)) {
        check_skipped_without_gradient(config);
    }
}

fn check_skipped_without_gradient(config: AdamWConfig) {
    let used = param(&[1.0, 2.0], &[2], Kind::Float);
    let unused = param(&[3.0], &[1], Kind::Float);
    let params = Trainable::new(vec![
        ("used".into(), used.shallow_clone()),
        ("unused".into(), unused.shallow_clone()),
    ])
    .unwrap();
    let mut opt = AdamW::new(&params, config).unwrap();
    (&used * 2.0).sum(Kind::Float).backward();
    opt.step().unwrap();
    let step_of = |name: &str| {
        let state = opt.state_tensors();
        state
            .iter()
            .find(|(n, _)| n == &format!("{name}.step"))
            .unwrap()
            .1
            .int64_value(&[])
    };
    assert_eq!(step_of("used"), 1);
    assert_eq!(step_of("unused"), 0);
    assert_eq!(values(&unused), [3.0]);
}

#[test]
fn restored_state_continues_bit_identically() {
    let config = AdamWConfig {
        lr: 0.01,
        betas: [0.9, 0.99],
        eps: 1e-8,
        weight_decay: 0.05,
        fused: true,
    };
    for config in both_forms(&config) {
        check_resume(config);
    }
}

fn check_resume(config: AdamWConfig) {
    let init = [0.3f32, -0.7, 1.1, 0.05];
    let grads_at = |step: usize| {
        vec![init
            .iter()
            .map(|x| (x * 3.0 + step as f32).cos())
            .collect::<Vec<f32>>()]
    };
    let make = |values: &[f32]| {
        Trainable::new(vec![("w".into(), param(values, &[2, 2], Kind::BFloat16))]).unwrap()
    };

    let params = make(&init);
    let mut opt = AdamW::new(&params, config.clone()).unwrap();
    for step in 0..3 {
        set_grads(&params, &grads_at(step));
        opt.step().unwrap();
    }
    // Snapshot through a safetensors file, as a checkpoint does.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    Tensor::write_safetensors(&opt.state_tensors(), &path).unwrap();
    let saved = Tensor::read_safetensors(&path).unwrap();

    // A fresh run from deliberately wrong weights: the master copy restores them.
    let resumed_params = make(&[9.0, 9.0, 9.0, 9.0]);
    let mut resumed = AdamW::new(&resumed_params, config).unwrap();
    resumed.load_state(&saved).unwrap();
    assert!(resumed_params.named()[0].1.equal(&params.named()[0].1));
    for step in 3..6 {
        set_grads(&params, &grads_at(step));
        opt.step().unwrap();
        set_grads(&resumed_params, &grads_at(step));
        resumed.step().unwrap();
    }
    for ((name, a), (_, b)) in opt.state_tensors().iter().zip(&resumed.state_tensors()) {
        assert!(a.equal(b), "{name} differs after resume");
    }
    assert!(resumed_params.named()[0].1.equal(&params.named()[0].1));
}

#[test]
fn load_state_names_missing_misshaped_and_unexpected_tensors() {
    let params =
        Trainable::new(vec![("w".into(), param(&[1.0, 2.0], &[2], Kind::BFloat16))]).unwrap();
    let mut opt = AdamW::new(&params, AdamWConfig::with_lr(0.1)).unwrap();
    let good = opt.state_tensors();
    // `without("")` is the complete state.
    let without = |key: &str| -> Vec<(String, Tensor)> {
        good.iter()
            .filter(|(n, _)| n != key)
            .map(|(n, t)| (n.clone(), t.copy()))
            .collect()
    };
    let err = |state: &[(String, Tensor)], opt: &mut AdamW| {
        opt.load_state(state).unwrap_err().to_string()
    };

    assert!(err(&without("w.master"), &mut opt).contains("missing tensor 'w.master'"));
    let mut bad_shape = without("w.exp_avg");
    bad_shape.push((
        "w.exp_avg".into(),
        Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)),
    ));
    let message = err(&bad_shape, &mut opt);
    assert!(
        message.contains("'w.exp_avg' has shape [3], expected [2]"),
        "{message}"
    );
    let mut extra = without("");
    extra.push((
        "v.exp_avg".into(),
        Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)),
    ));
    assert!(err(&extra, &mut opt).contains("unexpected tensor 'v.exp_avg'"));
    let mut bad_step = without("w.step");
    bad_step.push(("w.step".into(), Tensor::from(1.5f32)));
    assert!(err(&bad_step, &mut opt).contains("'w.step' has dtype Float, expected Int64"));
    opt.load_state(&without("")).unwrap();
}

#[test]
fn config_rejects_bad_values_and_unknown_keys() {
    let config: AdamWConfig = serde_yaml_ng::from_str("lr: 0.01").unwrap();
    assert_eq!(config, AdamWConfig::with_lr(0.01));
    assert!(serde_yaml_ng::from_str::<AdamWConfig>("lr: 0.01\nbeta1: 0.9").is_err());
    let bad = AdamWConfig {
        betas: [0.9, 1.0],
        ..AdamWConfig::with_lr(0.1)
    };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("optimizer.betas[1]"));
    let bad = AdamWConfig::with_lr(-1.0);
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("optimizer.lr"));
}

#[test]
fn fused_and_per_tensor_updates_agree_on_a_mixed_set() {
    // f32 and bf16 parameters (one fused group of masters), one that gets no gradient in the
    // first step, weight decay; random values so every element takes a different path.
    tch::manual_seed(7);
    let shapes: [(&str, &[i64], Kind); 4] = [
        ("a", &[16, 8], Kind::Float),
        ("b", &[8], Kind::BFloat16),
        ("c", &[4, 4, 4], Kind::Float),
        ("late", &[3], Kind::Float),
    ];
    let init: Vec<Tensor> = shapes
        .iter()
        .map(|(_, shape, kind)| {
            Tensor::randn(*shape, (Kind::Float, tch::Device::Cpu)).to_kind(*kind)
        })
        .collect();
    let config = AdamWConfig {
        lr: 0.03,
        betas: [0.9, 0.95],
        eps: 1e-6,
        weight_decay: 0.1,
        fused: true,
    };
    let mut runs: Vec<(Trainable, AdamW)> = both_forms(&config)
        .into_iter()
        .map(|config| {
            let params = Trainable::new(
                shapes
                    .iter()
                    .zip(&init)
                    .map(|((name, _, _), t)| (name.to_string(), t.copy().set_requires_grad(true)))
                    .collect(),
            )
            .unwrap();
            let opt = AdamW::new(&params, config).unwrap();
            (params, opt)
        })
        .collect();
    for step in 0..5 {
        let grads: Vec<Tensor> = init
            .iter()
            .map(|t| Tensor::randn_like(&t.to_kind(Kind::Float)))
            .collect();
        for (params, opt) in &mut runs {
            params.zero_grad();
            let loss = params
                .named()
                .iter()
                .zip(&grads)
                .filter(|((name, _), _)| step > 0 || name != "late")
                .map(|((_, p), g)| (p * g.to_kind(p.kind())).sum(Kind::Float))
                .reduce(|a, b| a + b)
                .unwrap();
            loss.backward();
            opt.step().unwrap();
        }
    }
    let (fused, per_tensor) = (runs[0].1.state_tensors(), runs[1].1.state_tensors());
    assert_eq!(fused.len(), per_tensor.len());
    for ((name, a), (_, b)) in fused.iter().zip(&per_tensor) {
        assert_close(&values(a), &values(b), 1e-6, name);
    }
    for ((name, a), (_, b)) in runs[0].0.named().iter().zip(runs[1].0.named()) {
        assert_close(&values(a), &values(b), 1e-6, name);
    }
}
