//! Packing documents into fixed-length training sequences.
use anyhow::{ensure, Result};
use tch::Tensor;

/// How documents become sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackOptions {
    /// Training positions per sequence.
    pub seq_len: usize,
    /// Keep `seq_len + 1` tokens per sequence so each position has its next-token target.
    pub next_token_targets: bool,
    /// Written before each document that does not already start with it.
    pub bos: Option<u32>,
    /// Written after each document that does not already end with it.
    pub eos: u32,
}

impl PackOptions {
    /// Tokens stored per sequence.
    pub fn window(&self) -> usize {
        self.seq_len + usize::from(self.next_token_targets)
    }
}

/// Fixed-length token sequences stored back to back, `window` tokens each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedSequences {
    seq_len: usize,
    window: usize,
    tokens: Vec<u32>,
}

/// Counts from one packing, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackStats {
    pub documents: usize,
    /// Tokens of the joined stream (documents plus BOS/EOS).
    pub stream_tokens: usize,
    /// Tokens at the end of the stream that fill no whole sequence.
    pub dropped_tokens: usize,
}

/// Joins `docs` into one stream (`[BOS] doc EOS [BOS] doc EOS ...`) and cuts it into
/// sequences: sequence `i` is `stream[i * seq_len .. i * seq_len + window]`, so with
/// next-token targets consecutive sequences share one token and every stream token but the
/// first is a target exactly once. The last partial sequence is dropped.
pub fn pack<'a>(
    docs: impl IntoIterator<Item = &'a [u32]>,
    options: &PackOptions,
) -> (PackedSequences, PackStats) {
    let mut stream = Vec::new();
    let mut documents = 0;
    for doc in docs.into_iter().filter(|d| !d.is_empty()) {
        documents += 1;
        if let Some(bos) = options.bos.filter(|&bos| doc[0] != bos) {
            stream.push(bos);
        }
        stream.extend_from_slice(doc);
        if doc.last() != Some(&options.eos) {
            stream.push(options.eos);
        }
    }
    let (seq_len, window) = (options.seq_len, options.window());
    let tokens = cut(&stream, seq_len, window);
    let count = tokens.len() / window;
    let used = if count == 0 {
        0
    } else {
        (count - 1) * seq_len + window
    };
    let stats = PackStats {
        documents,
        stream_tokens: stream.len(),
        dropped_tokens: stream.len() - used,
    };
    (
        PackedSequences {
            seq_len,
            window,
            tokens,
        },
        stats,
    )
}

/// The whole windows of `window` tokens that start every `seq_len` tokens of `stream`, one after
/// the other (the tail that fills no window is left out).
fn cut(stream: &[u32], seq_len: usize, window: usize) -> Vec<u32> {
    let count = if stream.len() >= window {
        (stream.len() - window) / seq_len + 1
    } else {
        0
    };
    let mut tokens = Vec::with_capacity(count * window);
    for i in 0..count {
        tokens.extend_from_slice(&stream[i * seq_len..i * seq_len + window]);
    }
    tokens
}

impl PackedSequences {
    /// Sequences from raw tokens stored back to back, `seq_len (+1 with targets)` each.
    pub fn from_tokens(seq_len: usize, next_token_targets: bool, tokens: Vec<u32>) -> Result<Self> {
        ensure!(seq_len > 0, "sequence length must be at least 1");
        let window = seq_len + usize::from(next_token_targets);
        ensure!(
            tokens.len() % window == 0,
            "{} tokens are not a whole number of {window}-token sequences",
            tokens.len()
        );
        Ok(Self {
            seq_len,
            window,
            tokens,
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.tokens.len() / self.window
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Training positions per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Tokens stored per sequence (`seq_len`, or `seq_len + 1` with next-token targets).
    pub fn window(&self) -> usize {
        self.window
    }

    pub fn has_targets(&self) -> bool {
        self.window > self.seq_len
    }

    pub fn sequence(&self, index: usize) -> &[u32] {
        &self.tokens[index * self.window..(index + 1) * self.window]
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Keeps the first `len` sequences.
    pub fn truncate(&mut self, len: usize) {
        self.tokens.truncate(len * self.window);
    }

    /// Appends `other`'s sequences (same shape required), e.g. teacher samples.
    pub fn append(&mut self, other: &PackedSequences) -> Result<()> {
        ensure!(
            (self.seq_len, self.window) == (other.seq_len, other.window),
            "cannot join sequences of {} (+{}) tokens with sequences of {} (+{})",
            self.seq_len,
            self.window - self.seq_len,
            other.seq_len,
            other.window - other.seq_len
        );
        self.tokens.extend_from_slice(&other.tokens);
        Ok(())
    }

    /// The sequences at `indices` as a CPU tensor. Shape: (indices.len(), window), i64.
    /// The same token stream cut into sequences of `seq_len` (with the same target convention):
    /// consecutive sequences of a packed stream overlap by their target token, so the stream is
    /// the first sequence and the new tokens of each next one. Tokens past the last whole new
    /// sequence are dropped. Only for sequences packed from one stream by [`pack`] (sequences
    /// appended from elsewhere, such as teacher samples, are not one stream).
    pub fn repacked(&self, seq_len: usize) -> Result<PackedSequences> {
        ensure!(seq_len > 0, "sequence length must be at least 1");
        let shared = self.window - self.seq_len;
        let mut stream = Vec::with_capacity(self.tokens.len());
        for i in 0..self.len() {
            let sequence = self.sequence(i);
            stream.extend_from_slice(if i == 0 {
                sequence
            } else {
                &sequence[shared..]
            });
        }
        let window = seq_len + shared;
        Ok(PackedSequences {
            seq_len,
            window,
            tokens: cut(&stream, seq_len, window),
        })
    }

    pub fn gather(&self, indices: &[usize]) -> Tensor {
        let mut ids = Vec::with_capacity(indices.len() * self.window);
        for &i in indices {
            ids.extend(self.sequence(i).iter().map(|&t| i64::from(t)));
        }
        Tensor::from_slice(&ids).view([indices.len() as i64, self.window as i64])
    }

    /// In-order batches for evaluation: batch `j` holds sequences `j*batch_size ..`, the last
    /// one possibly shorter; `rank` of `world_size` takes every `world_size`-th batch.
    pub fn eval_batches(
        &self,
        batch_size: usize,
        rank: usize,
        world_size: usize,
    ) -> Result<impl Iterator<Item = Tensor> + '_> {
        ensure!(batch_size > 0, "eval batch size must be at least 1");
        ensure!(
            rank < world_size,
            "rank {rank} is not below world size {world_size}"
        );
        let n = self.len();
        Ok((0..n.div_ceil(batch_size))
            .skip(rank)
            .step_by(world_size)
            .map(move |j| {
                let batch: Vec<usize> = (j * batch_size..((j + 1) * batch_size).min(n)).collect();
                self.gather(&batch)
            }))
    }
}
