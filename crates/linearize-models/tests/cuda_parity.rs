//! The decoder on a CUDA device against the same decoder on the CPU and against Hugging Face's
//! logits, for every fixture of `scripts/make_model_fixtures.py`: full forward and cached
//! decoding in f32, and bf16 compute. CI machines have no GPU, so these tests are ignored there;
//! on a GPU machine:
//!
//! ```text
//! cargo test --release -p linearize-models --test cuda_parity -- --ignored
//! ```
mod common;

use common::{fixture, max_diff, reference, FIXTURES};
use linearize_models::llama::Model;
use linearize_models::lm::CausalLm;
use tch::{Device, Kind, Tensor};

fn cuda() -> Device {
    assert!(
        tch::Cuda::is_available(),
        "no CUDA device: these tests are for a GPU machine (libtorch_cuda linked, a driver present)"
    );
    Device::Cuda(0)
}

fn logits(name: &str, device: Device, kind: Kind, ids: &Tensor) -> Tensor {
    let model =
        Model::load(&fixture(name), device, kind).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    tch::no_grad(|| model.forward(&ids.to_device(device), None))
        .unwrap()
        .to_device(Device::Cpu)
}

#[test]
#[ignore = "needs a CUDA device"]
fn f32_logits_on_cuda_equal_cpu_and_hf() {
    let device = cuda();
    for name in FIXTURES {
        let (ids, want) = reference(name);
        let on_cpu = logits(name, Device::Cpu, Kind::Float, &ids);
        let on_cuda = logits(name, device, Kind::Float, &ids);
        let vs_cpu = max_diff(&on_cuda, &on_cpu);
        let vs_hf = max_diff(&on_cuda, &want);
        println!("{name}: f32 CUDA vs CPU max |diff| {vs_cpu:.2e}, vs HF {vs_hf:.2e}");
        assert!(
            vs_cpu <= 1e-4,
            "{name}: CUDA vs CPU max |logit diff| {vs_cpu}"
        );
        assert!(vs_hf <= 1e-4, "{name}: CUDA vs HF max |logit diff| {vs_hf}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn cached_decoding_on_cuda_equals_the_full_forward() {
    let device = cuda();
    for name in FIXTURES {
        let (ids, want) = reference(name);
        let model = Model::load(&fixture(name), device, Kind::Float).unwrap();
        let ids = ids.to_device(device);
        let seq = ids.size()[1];
        let mut cache = model.new_cache(ids.size()[0]).unwrap();
        let mut outs = vec![model
            .forward_cached(&ids.narrow(1, 0, 5), &mut cache)
            .unwrap()];
        for t in 5..seq {
            outs.push(
                model
                    .forward_cached(&ids.narrow(1, t, 1), &mut cache)
                    .unwrap(),
            );
        }
        let cached = Tensor::cat(&outs, 1).to_device(Device::Cpu);
        let diff = max_diff(&cached, &want);
        println!("{name}: cached decoding on CUDA vs HF max |diff| {diff:.2e}");
        assert!(diff <= 1e-4, "{name}: cached CUDA vs HF max diff {diff}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn bf16_logits_on_cuda_stay_close_to_cpu_f32() {
    let device = cuda();
    for name in FIXTURES {
        let (ids, _) = reference(name);
        let on_cpu = logits(name, Device::Cpu, Kind::Float, &ids);
        let on_cuda = logits(name, device, Kind::BFloat16, &ids);
        assert_eq!(on_cuda.kind(), Kind::Float);
        // The tolerance of `parity.rs`'s bf16 test: 8 mantissa bits compounded over the layers.
        let mean = (&on_cuda - &on_cpu)
            .abs()
            .mean(Kind::Float)
            .double_value(&[]);
        let agree = on_cuda
            .argmax(-1, false)
            .eq_tensor(&on_cpu.argmax(-1, false))
            .to_kind(Kind::Float)
            .mean(Kind::Float)
            .double_value(&[]);
        println!("{name}: bf16 CUDA vs f32 CPU mean |diff| {mean:.3}, top-1 agreement {agree:.3}");
        assert!(mean < 0.15, "{name}: mean |logit diff| {mean}");
        assert!(agree > 0.9, "{name}: top-1 agreement {agree}");
    }
}
