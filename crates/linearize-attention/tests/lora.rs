//! LoRA adapters: zero at initialisation, PEFT's init and names, merge and unmerge.
mod common;

use common::*;
use linearize_attention::lora::{LoraConfig, LoraLinear};
use tch::{nn, Device, Kind, Tensor};

#[test]
fn a_fresh_adapter_changes_nothing_and_is_named_like_peft() {
    seed(60);
    let vs = nn::VarStore::new(Device::Cpu);
    let lora = LoraLinear::new(&(vs.root() / "q_proj"), 32, 24, &LoraConfig::default()).unwrap();
    let x = randn(&[2, 5, 32], Kind::Float);
    let delta = lora.delta(&x, true);
    assert_eq!(delta.size(), [2, 5, 24]);
    assert_eq!(delta.abs().max().double_value(&[]), 0.0);
    let vars = vs.variables();
    assert_eq!(vars["q_proj.lora_A.weight"].size(), [8, 32]);
    assert_eq!(vars["q_proj.lora_B.weight"].size(), [24, 8]);
    // PEFT: kaiming_uniform_(a = sqrt 5) on A (r, in) is uniform in +-1/sqrt(in).
    let a_max = vars["q_proj.lora_A.weight"].abs().max().double_value(&[]);
    assert!(
        a_max <= 1.0 / 32f64.sqrt() && a_max > 0.8 / 32f64.sqrt(),
        "{a_max}"
    );
    assert_eq!(lora.scaling, 2.0);
}

fn trained(vs: &nn::VarStore, cfg: &LoraConfig) -> LoraLinear {
    let lora = LoraLinear::new(&vs.root(), 16, 12, cfg).unwrap();
    tch::no_grad(|| {
        lora.b
            .shallow_clone()
            .copy_(&Tensor::randn([12, cfg.rank], (Kind::Float, Device::Cpu)))
    });
    lora
}

#[test]
fn merged_weight_computes_base_plus_delta_and_unmerges() {
    seed(61);
    let vs = nn::VarStore::new(Device::Cpu);
    let lora = trained(
        &vs,
        &LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
        },
    );
    let base = randn(&[12, 16], Kind::Float);
    let x = randn(&[3, 16], Kind::Float);
    let expected = x.matmul(&base.tr()) + lora.delta(&x, false);
    let want_delta = x.matmul(&lora.a.tr()).matmul(&lora.b.tr()) * 2.0;
    assert_close("delta", &lora.delta(&x, false), &want_delta, 1e-6);

    let mut weight = base.copy();
    lora.merge_into(&mut weight).unwrap();
    assert_close("merged", &x.matmul(&weight.tr()), &expected, 1e-5);
    lora.unmerge_from(&mut weight).unwrap();
    assert_close("unmerged", &weight, &base, 1e-6);

    let mut bf = base.to_kind(Kind::BFloat16);
    lora.merge_into(&mut bf).unwrap();
    assert_eq!(bf.kind(), Kind::BFloat16);
    assert_close("bf16 merge", &bf, &(base + lora.delta_weight()), 1e-2);

    let mut wrong = Tensor::zeros([16, 12], (Kind::Float, Device::Cpu));
    let err = lora.merge_into(&mut wrong).unwrap_err().to_string();
    assert!(err.starts_with("weight: expected [12, 16]"), "{err}");
}

#[test]
fn dropout_applies_only_in_training() {
    seed(62);
    let vs = nn::VarStore::new(Device::Cpu);
    let lora = trained(
        &vs,
        &LoraConfig {
            rank: 4,
            alpha: 4.0,
            dropout: 0.5,
        },
    );
    let x = randn(&[64, 16], Kind::Float);
    let eval = lora.delta(&x, false);
    assert_close("eval is deterministic", &eval, &lora.delta(&x, false), 0.0);
    assert!(rel_err(&lora.delta(&x, true), &eval) > 1e-2);
    let grads = grads(
        &lora.delta(&x, true),
        &eval.ones_like(),
        &[&lora.a, &lora.b],
    );
    assert!(grads
        .iter()
        .all(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0));
    assert!(LoraLinear::new(
        &vs.root(),
        4,
        4,
        &LoraConfig {
            dropout: 1.0,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn added_delta_is_the_sum_with_the_same_gradients() {
    // `add_delta` forms y + delta(x) inside its last product; values and the gradients of y, x,
    // A and B must be those of the plain sum.
    seed(63);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
    };
    let lora = trained(&vs, &cfg);
    let x = randn(&[2, 3, 16], Kind::Float).set_requires_grad(true);
    let y = randn(&[2, 3, 12], Kind::Float).set_requires_grad(true);
    let probe = randn(&[2, 3, 12], Kind::Float);
    let leaves = [&x, &y, &lora.a, &lora.b];
    let grads_of = |out: &Tensor| {
        let loss = (out * &probe).sum(Kind::Float);
        Tensor::run_backward(&[loss], &leaves, false, false)
    };
    let fused = lora.add_delta(&x, &y, false);
    let plain = &y + lora.delta(&x, false);
    assert_close("value", &fused, &plain, 1e-6);
    for (name, (a, b)) in ["x", "y", "A", "B"]
        .iter()
        .zip(grads_of(&fused).iter().zip(&grads_of(&plain)))
    {
        assert_close(name, a, b, 1e-6);
    }
}
