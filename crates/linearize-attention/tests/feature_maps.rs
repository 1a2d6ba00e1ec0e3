//! Feature maps: their formulas, parameter names, initialisation, GQA inputs, dtypes and configs.
mod common;

use common::*;
use linearize_attention::feature_map::{FeatureMap, FeatureMapConfig, FeatureMapInit};
use tch::{nn, Device, Kind, Tensor};

fn hedgehog(half_space: bool, bias: bool, init: FeatureMapInit) -> FeatureMapConfig {
    FeatureMapConfig::Hedgehog {
        feature_dim: 6,
        half_space,
        bias,
        init,
    }
}

#[test]
fn hedgehog_is_two_softmaxes_of_the_per_head_projection() {
    seed(50);
    let vs = nn::VarStore::new(Device::Cpu);
    let map = FeatureMap::new(
        &(vs.root() / "feature_map_q"),
        3,
        4,
        &hedgehog(false, true, FeatureMapInit::Kaiming),
    )
    .unwrap();
    let vars = vs.variables();
    let (w, b) = (&vars["feature_map_q.W"], &vars["feature_map_q.b"]);
    assert_eq!((w.size(), b.size()), (vec![3, 4, 6], vec![3, 6]));
    tch::no_grad(|| {
        b.shallow_clone()
            .copy_(&Tensor::randn([3, 6], (Kind::Float, Device::Cpu)))
    });

    let x = randn(&[2, 3, 5, 4], Kind::Float);
    let phi = map.forward(&x).unwrap();
    assert_eq!(phi.size(), [2, 3, 5, 12]);
    assert_eq!(map.output_dim(), 12);
    for h in 0..3 {
        let z = x.select(1, h).matmul(&w.get(h)) + b.get(h);
        let want = Tensor::cat(
            &[z.softmax(-1, Kind::Float), (-&z).softmax(-1, Kind::Float)],
            -1,
        );
        assert_close(&format!("head {h}"), &phi.select(1, h), &want, 1e-6);
    }
}

#[test]
fn half_space_hedgehog_keeps_the_positive_softmax() {
    seed(51);
    let vs = nn::VarStore::new(Device::Cpu);
    let map = FeatureMap::new(
        &vs.root(),
        2,
        4,
        &hedgehog(true, false, FeatureMapInit::Kaiming),
    )
    .unwrap();
    let phi = map.forward(&randn(&[1, 2, 7, 4], Kind::Float)).unwrap();
    assert_eq!(phi.size(), [1, 2, 7, 6]);
    assert_close(
        "rows sum to one",
        &phi.sum_dim_intlist(-1, false, Kind::Float),
        &Tensor::ones([1, 2, 7], (Kind::Float, Device::Cpu)),
        1e-6,
    );
    assert!(!vs.variables().contains_key("b"));
}

#[test]
fn initialisations_follow_lolcats() {
    seed(52);
    let vs = nn::VarStore::new(Device::Cpu);
    FeatureMap::new(
        &(vs.root() / "kaiming"),
        4,
        16,
        &hedgehog(false, false, FeatureMapInit::Kaiming),
    )
    .unwrap();
    FeatureMap::new(
        &(vs.root() / "identity"),
        4,
        16,
        &hedgehog(false, false, FeatureMapInit::Identity),
    )
    .unwrap();
    let vars = vs.variables();
    // torch.nn.init.kaiming_uniform_ on (h, d, f): fan_in = d * f, bound = sqrt(6 / fan_in).
    let bound = (6.0f64 / (16.0 * 6.0)).sqrt();
    let w = &vars["kaiming.W"];
    assert!(w.abs().max().double_value(&[]) <= bound);
    assert!(w.abs().max().double_value(&[]) > 0.8 * bound);
    let eye = Tensor::eye_m(16, 6, (Kind::Float, Device::Cpu));
    for h in 0..4 {
        assert_close("identity", &vars["identity.W"].get(h), &eye, 0.0);
    }
}

#[test]
fn t2r_is_relu_of_the_projection_plus_bias() {
    seed(53);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = FeatureMapConfig::T2r {
        feature_dim: 5,
        bias: true,
        init: FeatureMapInit::Kaiming,
    };
    let map = FeatureMap::new(&vs.root(), 2, 4, &cfg).unwrap();
    let vars = vs.variables();
    tch::no_grad(|| {
        vars["b"]
            .shallow_clone()
            .copy_(&Tensor::randn([2, 5], (Kind::Float, Device::Cpu)))
    });
    let x = randn(&[3, 2, 6, 4], Kind::Float);
    let want = (x.matmul(&vars["W"]) + vars["b"].unsqueeze(1)).relu();
    assert_close("t2r", &map.forward(&x).unwrap(), &want, 1e-6);
}

#[test]
fn parameter_free_maps() {
    seed(54);
    let vs = nn::VarStore::new(Device::Cpu);
    let x = randn(&[2, 3, 5, 8], Kind::Float);
    let elu = FeatureMap::new(&vs.root(), 3, 8, &FeatureMapConfig::Elu).unwrap();
    let want = x.clamp_min(0.0) + x.clamp_max(0.0).exp();
    assert_close("1 + elu", &elu.forward(&x).unwrap(), &want, 1e-6);
    let softmax = FeatureMap::new(&vs.root(), 3, 8, &FeatureMapConfig::SoftmaxDim).unwrap();
    assert_close(
        "softmax_dim",
        &softmax.forward(&x).unwrap(),
        &x.softmax(-1, Kind::Float),
        1e-7,
    );
    assert!(vs.variables().is_empty());
}

#[test]
fn based_dot_products_are_the_second_order_taylor_expansion_of_exp() {
    seed(55);
    let vs = nn::VarStore::new(Device::Cpu);
    let d = 8;
    let map = FeatureMap::new(&vs.root(), 2, d, &FeatureMapConfig::Based).unwrap();
    assert_eq!(map.output_dim(), 1 + d + d * d);
    let q = randn(&[1, 2, 5, d], Kind::Double);
    let k = randn(&[1, 2, 5, d], Kind::Double);
    let dots = map
        .forward(&q)
        .unwrap()
        .matmul(&map.forward(&k).unwrap().transpose(-1, -2));
    let s = q.matmul(&k.transpose(-1, -2)) / (d as f64).sqrt();
    assert_close(
        "1 + s + s^2/2",
        &dots,
        &(s.ones_like() + &s + &s * &s * 0.5),
        1e-12,
    );
}

#[test]
fn gqa_inputs_are_repeated_to_the_maps_heads() {
    seed(56);
    let vs = nn::VarStore::new(Device::Cpu);
    let map = FeatureMap::new(
        &vs.root(),
        4,
        4,
        &hedgehog(false, false, FeatureMapInit::Kaiming),
    )
    .unwrap();
    let k = randn(&[1, 2, 3, 4], Kind::Float);
    let repeated = k.repeat_interleave_self_int(2, 1, None);
    assert_close(
        "gqa",
        &map.forward(&k).unwrap(),
        &map.forward(&repeated).unwrap(),
        0.0,
    );
    let err = map
        .forward(&randn(&[1, 3, 3, 4], Kind::Float))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("feature map input: expected"), "{err}");
}

#[test]
fn half_precision_inputs_are_projected_on_their_own_dtype_and_normalised_in_f32() {
    seed(57);
    let vs = nn::VarStore::new(Device::Cpu);
    let map = FeatureMap::new(
        &vs.root(),
        2,
        8,
        &hedgehog(false, true, FeatureMapInit::Kaiming),
    )
    .unwrap();
    let x = randn(&[1, 2, 9, 8], Kind::Float).to_kind(Kind::BFloat16);
    let out = map.forward(&x).unwrap();
    assert_eq!(out.kind(), Kind::BFloat16);
    // The projection's result is rounded to bf16 (as a bf16 GEMM rounds it); the softmax reads it
    // in f32 and rounds once more. An f32 map of the same values differs by that rounding only.
    let reference = map.forward(&x.to_kind(Kind::Float)).unwrap();
    assert_close("bf16", &out.to_kind(Kind::Float), &reference, 2e-2);
}

#[test]
fn configs_read_from_yaml() {
    let cfg: FeatureMapConfig =
        serde_yaml_ng::from_str("kind: hedgehog\nfeature_dim: 32\n").unwrap();
    assert_eq!(
        cfg,
        FeatureMapConfig::Hedgehog {
            feature_dim: 32,
            half_space: false,
            bias: false,
            init: FeatureMapInit::Kaiming
        }
    );
    assert_eq!(cfg.output_dim(64), 64);
    let cfg: FeatureMapConfig =
        serde_yaml_ng::from_str("kind: hedgehog\nhalf_space: true\ninit: identity\n").unwrap();
    assert_eq!(cfg.output_dim(64), 64);
    let cfg: FeatureMapConfig = serde_yaml_ng::from_str("kind: based").unwrap();
    assert_eq!(cfg.output_dim(16), 1 + 16 + 256);
    assert!(
        serde_yaml_ng::from_str::<FeatureMapConfig>("kind: hedgehog\nfeature_dims: 3\n").is_err()
    );
    assert!(serde_yaml_ng::from_str::<FeatureMapConfig>("kind: cosformer").is_err());
    let vs = nn::VarStore::new(Device::Cpu);
    let bad = FeatureMapConfig::T2r {
        feature_dim: 0,
        bias: true,
        init: FeatureMapInit::Kaiming,
    };
    assert!(FeatureMap::new(&vs.root(), 2, 4, &bad)
        .unwrap_err()
        .to_string()
        .starts_with("feature_dim"));
}
