//! Deterministic, resumable, data-parallel batches over packed sequences.
//!
//! The global order of an epoch is a seeded permutation of the sequences. It is consumed in
//! steps of `world_size * batch_size` sequences; in each step rank `r` takes the `r`-th run
//! of `batch_size`. An epoch ends when fewer than a step's worth remain (that tail is skipped,
//! so every rank sees the same number of batches). The cursor counts global sequences, so a
//! job may resume with another world size from exactly where the last one stopped.
use super::packing::PackedSequences;
use super::shuffle::{permutation, Stream};
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Position in the global sequence order, saved with the training state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    /// Epoch the next batch comes from.
    pub epoch: u64,
    /// Sequences of this epoch's order consumed by all ranks together.
    pub index: u64,
    /// Sequences consumed by all ranks since training started.
    pub consumed: u64,
    /// Steps taken (one step: one batch on every rank).
    pub steps: u64,
}

/// When the batcher stops; unset limits do not apply (with none, it cycles forever).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    /// Training tokens (`seq_len` per sequence, all ranks together); a step that would pass
    /// it is not taken.
    pub max_tokens: Option<u64>,
    /// Steps (one batch on every rank).
    pub max_steps: Option<u64>,
    /// Passes over the training sequences.
    pub max_epochs: Option<u64>,
}

/// A batch of training sequences on the CPU.
#[derive(Debug)]
pub struct Batch {
    /// Token ids. Shape: (batch, window) i64, window = seq_len (+1 with next-token targets).
    pub tokens: Tensor,
    /// Training positions per sequence.
    pub seq_len: usize,
}

impl Batch {
    /// Model inputs: the first `seq_len` tokens of each sequence. Shape: (batch, seq_len).
    pub fn inputs(&self) -> Tensor {
        self.tokens.narrow(1, 0, self.seq_len as i64)
    }

    /// Next-token targets, when the sequences carry them. Shape: (batch, seq_len).
    pub fn targets(&self) -> Option<Tensor> {
        (self.tokens.size()[1] > self.seq_len as i64)
            .then(|| self.tokens.narrow(1, 1, self.seq_len as i64))
    }

    /// Training tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.tokens.size()[0] as usize * self.seq_len
    }
}

/// Serves batches of one rank in the global order, from a [`DataCursor`].
#[derive(Debug)]
pub struct Batcher {
    data: PackedSequences,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    rank: usize,
    world_size: usize,
    budget: Budget,
    cursor: DataCursor,
    /// The permutation of `order.0`'s epoch.
    order: Option<(u64, Vec<usize>)>,
}

impl Batcher {
    /// A single-rank, shuffling, unlimited batcher at the start of the data.
    pub fn new(data: PackedSequences, batch_size: usize, seed: u64) -> Result<Self> {
        ensure!(batch_size > 0, "batch size must be at least 1");
        let batcher = Self {
            data,
            batch_size,
            seed,
            shuffle: true,
            rank: 0,
            world_size: 1,
            budget: Budget::default(),
            cursor: DataCursor::default(),
            order: None,
        };
        batcher.check_fits()?;
        Ok(batcher)
    }

    /// Serves sequences in stored order when `shuffle` is false.
    pub fn with_shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self.order = None;
        self
    }

    /// Serves the batches of `rank` among `world_size` data-parallel ranks.
    pub fn with_shard(mut self, rank: usize, world_size: usize) -> Result<Self> {
        ensure!(
            rank < world_size,
            "rank {rank} is not below world size {world_size}"
        );
        self.rank = rank;
        self.world_size = world_size;
        self.check_fits()?;
        Ok(self)
    }

    /// Splits every global batch of this batcher's `batch_size` sequences evenly across
    /// `world_size` data-parallel ranks and serves `rank`'s part: rank `r` takes the `r`-th run
    /// of `batch_size / world_size` sequences of each step. The union over ranks is exactly the
    /// batch a single process would take, and the cursor (global sequences) is the same for any
    /// world size, so a job resumed on another number of ranks continues where it stopped.
    pub fn split_across_ranks(mut self, rank: usize, world_size: usize) -> Result<Self> {
        ensure!(
            self.world_size == 1,
            "the batcher is already split across {} ranks",
            self.world_size
        );
        ensure!(
            world_size > 0 && self.batch_size % world_size == 0,
            "batch_size {} does not split evenly across {world_size} ranks: the global batch is \
             shared out, so batch_size must be a multiple of the number of ranks",
            self.batch_size
        );
        self.batch_size /= world_size;
        self.with_shard(rank, world_size)
    }

    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }

    /// Where the next step starts (the same on every rank once each took its batch).
    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// Continues from `cursor` (saved by a job with any world size).
    pub fn seek(&mut self, cursor: DataCursor) -> Result<()> {
        ensure!(
            cursor.index <= self.data.len() as u64,
            "data cursor is at sequence {} of epoch {}, but the data has only {} sequences",
            cursor.index,
            cursor.epoch,
            self.data.len()
        );
        self.cursor = cursor;
        Ok(())
    }

    /// Sequences all ranks consume per step.
    pub fn step_sequences(&self) -> usize {
        self.world_size * self.batch_size
    }

    /// Steps in one full epoch at this world size.
    pub fn steps_per_epoch(&self) -> u64 {
        (self.data.len() / self.step_sequences()) as u64
    }

    /// Steps left before the budget stops the batcher; `None` when no limit is set.
    pub fn remaining_steps(&self) -> Option<u64> {
        let step = self.step_sequences() as u64;
        let per_epoch = self.steps_per_epoch();
        let by_steps = self
            .budget
            .max_steps
            .map(|max| max.saturating_sub(self.cursor.steps));
        let by_tokens = self.budget.max_tokens.map(|max| {
            (max / self.data.seq_len() as u64).saturating_sub(self.cursor.consumed) / step
        });
        let by_epochs = self.budget.max_epochs.map(|max| {
            let this_epoch = (self.data.len() as u64 - self.cursor.index) / step;
            match max.checked_sub(self.cursor.epoch + 1) {
                Some(later) => this_epoch + later * per_epoch,
                None => 0,
            }
        });
        [by_steps, by_tokens, by_epochs].into_iter().flatten().min()
    }

    /// This rank's batch of the next step, or `None` once the budget is spent.
    pub fn next_batch(&mut self) -> Option<Batch> {
        let step = self.step_sequences() as u64;
        if self.cursor.index + step > self.data.len() as u64 {
            self.cursor.epoch += 1;
            self.cursor.index = 0;
        }
        if self.budget_spent() {
            return None;
        }
        let start = (self.cursor.index as usize) + self.rank * self.batch_size;
        let end = start + self.batch_size;
        let indices = self.epoch_order()[start..end].to_vec();
        self.cursor.index += step;
        self.cursor.consumed += step;
        self.cursor.steps += 1;
        Some(Batch {
            tokens: self.data.gather(&indices),
            seq_len: self.data.seq_len(),
        })
    }

    fn budget_spent(&self) -> bool {
        let next_consumed = self.cursor.consumed + self.step_sequences() as u64;
        let Budget {
            max_tokens,
            max_steps,
            max_epochs,
        } = self.budget;
        max_epochs.is_some_and(|max| self.cursor.epoch >= max)
            || max_steps.is_some_and(|max| self.cursor.steps >= max)
            || max_tokens.is_some_and(|max| next_consumed * self.data.seq_len() as u64 > max)
    }

    fn epoch_order(&mut self) -> &[usize] {
        let epoch = self.cursor.epoch;
        if self
            .order
            .as_ref()
            .is_none_or(|(cached, _)| *cached != epoch)
        {
            let n = self.data.len();
            let order = if self.shuffle {
                permutation(n, self.seed, Stream::Epoch, epoch)
            } else {
                (0..n).collect()
            };
            self.order = Some((epoch, order));
        }
        &self.order.as_ref().expect("order was just set").1
    }

    fn check_fits(&self) -> Result<()> {
        ensure!(
            self.data.len() >= self.step_sequences(),
            "{} training sequences are fewer than one step of {} ranks x {} sequences",
            self.data.len(),
            self.world_size,
            self.batch_size
        );
        Ok(())
    }
}
