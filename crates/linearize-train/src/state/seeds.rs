//! The run's seed stream: every random consumer (data shuffling, dropout, initialisation) draws
//! its seed from here, so the whole random state is two integers that a checkpoint can hold.
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Position in the stream of seeds derived from the recipe's seed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedStream {
    /// The recipe's seed.
    pub seed: u64,
    /// Seeds drawn so far.
    pub drawn: u64,
}

impl SeedStream {
    pub fn new(seed: u64) -> Self {
        Self { seed, drawn: 0 }
    }

    /// The next seed: output number `drawn` of ChaCha8 keyed by `seed` (random access, so a
    /// restored stream continues exactly).
    pub fn next_seed(&mut self) -> u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        // A u64 output consumes two 32-bit words.
        rng.set_word_pos(u128::from(self.drawn) * 2);
        self.drawn += 1;
        rng.next_u64()
    }

    /// Re-seeds torch's global generators from the next seed. tch cannot read torch's generator
    /// state, so a checkpoint cannot hold it; a trainer that calls this at the start of every
    /// step makes torch's random ops a function of the step, identical after a resume.
    pub fn reseed_torch(&mut self) {
        tch::manual_seed(self.next_seed() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_deterministic_distinct_and_resumable() {
        let mut a = SeedStream::new(7);
        let first: Vec<u64> = (0..5).map(|_| a.next_seed()).collect();
        let mut b = SeedStream::new(7);
        assert_eq!(first, (0..5).map(|_| b.next_seed()).collect::<Vec<_>>());
        let mut resumed: SeedStream = serde_json::from_str(
            &serde_json::to_string(&SeedStream { seed: 7, drawn: 3 }).unwrap(),
        )
        .unwrap();
        assert_eq!(resumed.next_seed(), first[3]);
        let mut sorted = first.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 5);
        assert_ne!(SeedStream::new(8).next_seed(), first[0]);
    }
}
