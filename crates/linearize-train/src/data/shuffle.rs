//! Seeded permutations. ChaCha8 is used (not `StdRng`) because its output is fixed across
//! rand releases, so a seed names the same order in every build.
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Independent random streams drawn from one seed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Stream {
    /// Document order before packing.
    Documents = 1,
    /// Which documents are held out for validation.
    Validation = 2,
    /// Sequence order of one epoch (the epoch number selects the sub-stream).
    Epoch = 3,
    /// Which documents of a source with a fractional weight are used once more (the source's
    /// index selects the sub-stream).
    Weights = 4,
    /// Which teacher samples of a fractional `teacher_samples.weight` are used once more.
    TeacherWeight = 5,
}

/// A permutation of `0..n` determined by `(seed, stream, epoch)`.
pub(crate) fn permutation(n: usize, seed: u64, stream: Stream, epoch: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((stream as u64) << 56) ^ epoch);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    order
}

/// How many times each of `n` items is used under `weight`: `floor(weight)` times each, and once
/// more for a `fract(weight)` share of them (rounded) chosen by `(seed, stream, sub)`.
pub(crate) fn weighted_copies(
    n: usize,
    weight: f64,
    seed: u64,
    stream: Stream,
    sub: u64,
) -> Vec<usize> {
    let whole = weight.floor() as usize;
    let extra = ((weight - weight.floor()) * n as f64).round() as usize;
    let mut copies = vec![whole; n];
    for &i in &permutation(n, seed, stream, sub)[..extra] {
        copies[i] += 1;
    }
    copies
}
