//! What every training stage is given: its data and its place in the job.
use crate::data::{Batcher, PackedSequences};
use crate::metrics::MetricsWriter;
use crate::state::{LoadedState, Preemption};
use linearize_dist::ProcessGroup;
use std::path::Path;

/// The training sequences of a stage: length and sequences per micro-batch (all ranks
/// together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageShape {
    pub seq_len: usize,
    pub batch_size: usize,
}

impl StageShape {
    /// Training tokens of one micro-batch.
    pub fn tokens(&self) -> u64 {
        (self.seq_len * self.batch_size) as u64
    }
}

/// The data of a stage.
pub struct StageData {
    /// Training batches (with whatever shard, budget and epochs the caller set), at the start of
    /// the data: a resumed run seeks it to the saved cursor. For LoRA, sequences packed with
    /// next-token targets are scored on all `seq_len` positions; without, on positions 1.. of
    /// each.
    pub train: Batcher,
    /// Training positions per sequence (the packed sequences' `seq_len`).
    pub seq_len: usize,
    /// Validation sequences; without them there is no validation, no best state and no
    /// validation loss in the summary.
    pub val: Option<PackedSequences>,
}

/// Where a stage runs within the job.
pub struct StageJob<'a> {
    /// `checkpoints/<run>`: states go to `<run>/state/`.
    pub run_dir: &'a Path,
    pub metrics: &'a mut MetricsWriter,
    /// [`crate::state::recipe_hash`] of the resolved recipe.
    pub recipe_hash: &'a str,
    /// The recipe's seed.
    pub seed: u64,
    /// Optimizer updates of the stages before this one (run-wide step numbers).
    pub run_step_offset: u64,
    /// A state of this stage to continue from.
    pub resume: Option<&'a LoadedState>,
    /// When given, SIGTERM/SIGINT save a state and stop the stage with
    /// [`crate::state::Preempted`].
    pub preemption: Option<&'a Preemption>,
    /// The data-parallel ranks of the job (`None`: a single process). Each rank trains on its
    /// share of every batch, gradients are averaged, a stop on a signal is agreed on by all,
    /// and only rank 0 writes states (metrics go to rank 0's writer; give the others a
    /// [`MetricsWriter::disabled`] one).
    pub group: Option<&'a ProcessGroup>,
}
