//! The memory roofline of a decoding step: the fewest bytes a step must move (every weight read
//! once, the decoding state read and, where it is rewritten, written) over the device's measured
//! copy bandwidth. At batch b the step yields b tokens, so the roofline is
//! `b * bandwidth / bytes_per_step` tokens/s, and a measured rate divided by it says how close
//! decoding runs to what memory traffic allows.
use super::harness::synchronize;
use linearize_models::llama::Model;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

/// Copies timed for the bandwidth; the fastest counts (the first ones may pay for warm-up).
const COPIES: usize = 6;

/// Bytes per second the device moves in a device-to-device copy, bytes read plus bytes written:
/// the fastest of several copies of a 1 GiB buffer (256 MiB on a CPU).
pub fn copy_bandwidth(device: Device) -> f64 {
    let bytes: i64 = if device.is_cuda() { 1 << 30 } else { 1 << 28 };
    let src = Tensor::ones([bytes], (Kind::Uint8, device));
    let mut dst = Tensor::zeros([bytes], (Kind::Uint8, device));
    let mut best = f64::INFINITY;
    for _ in 0..COPIES {
        synchronize(device);
        let started = Instant::now();
        dst.copy_(&src);
        synchronize(device);
        best = best.min(started.elapsed().as_secs_f64());
    }
    2.0 * bytes as f64 / best
}

/// Bytes of the weights one decoding step reads: every parameter of `model` and of the
/// converted layers' `extra` store, except an untied input embedding, of which a step gathers
/// only its batch's rows (a tied one is read whole as the output head).
pub fn weight_bytes(model: &Model, extra: Option<&nn::VarStore>) -> u64 {
    let bytes = |t: &Tensor| t.numel() as u64 * t.kind().elt_size_in_bytes() as u64;
    let tied = model.config().tie_word_embeddings;
    let own: u64 = model
        .named_parameters()
        .iter()
        .filter(|(name, _)| tied || !name.ends_with("embed_tokens.weight"))
        .map(|(_, t)| bytes(t))
        .sum();
    let converted: u64 = extra.map_or(0, |store| store.variables().values().map(bytes).sum());
    own + converted
}

/// Bytes one step moves for a decoding state of `state_bytes`: a recurrent student rewrites its
/// state every step (read and written), a KV cache is read and grows by one token.
pub fn state_traffic(state_bytes: u64, rewritten: bool) -> u64 {
    if rewritten {
        2 * state_bytes
    } else {
        state_bytes
    }
}

/// Tokens/s at the roofline for `batch` sequences whose step moves `bytes_per_step`.
pub fn roofline_tokens_per_s(batch: i64, bytes_per_step: u64, bandwidth: f64) -> f64 {
    batch as f64 * bandwidth / bytes_per_step as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roofline_is_batch_times_bandwidth_over_bytes() {
        // 16.1 GB of weights and a 112 MiB state read and written at 3.02 TB/s: the issue's
        // 185 steps a second for the 8B student.
        let bytes = 16_100_000_000 + state_traffic(112 << 20, true);
        let steps = roofline_tokens_per_s(1, bytes, 3.02e12);
        assert!((steps - 185.0).abs() < 1.5, "{steps}");
        assert_eq!(roofline_tokens_per_s(4, 100, 1000.0), 40.0);
        assert_eq!(state_traffic(10, false), 10);
    }

    #[test]
    fn a_cpu_copy_has_a_finite_positive_bandwidth() {
        let bw = copy_bandwidth(Device::Cpu);
        assert!(bw.is_finite() && bw > 1e8, "{bw}");
    }
}
