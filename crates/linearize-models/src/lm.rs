//! The interface generation and evaluation use to drive any causal language model.
use anyhow::{bail, Result};
use tch::{Device, Tensor};

/// Decoding one token per call by replaying a captured CUDA graph (see
/// [`CausalLm::graph_decoder`]).
pub trait ReplayDecoder {
    /// Decodes `id` as the next token of the sequence and returns the logits (vocab,) that
    /// follow it, on the CPU.
    fn decode(&mut self, id: u32) -> Result<Vec<f32>>;
}

/// A causal LM that decodes incrementally through a cache it owns the layout of (a KV cache for
/// softmax layers, a recurrent state for linear ones).
pub trait CausalLm {
    type Cache;

    /// An empty cache for `batch` sequences.
    fn new_cache(&self, batch: i64) -> Result<Self::Cache>;

    /// Runs `ids` (b, L) int64 as the next L tokens of every sequence after what `cache` has
    /// seen, updates `cache`, and returns logits (b, L, vocab) in f32.
    fn forward_cached(&self, ids: &Tensor, cache: &mut Self::Cache) -> Result<Tensor>;

    /// Logits (b, L, vocab) in f32 of a whole sequence, no cache kept.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut cache = self.new_cache(ids.size()[0])?;
        self.forward_cached(ids, &mut cache)
    }

    /// Bytes `cache` holds on its device (KV cache, recurrent states, window caches), where the
    /// model can tell.
    fn cache_bytes(&self, _cache: &Self::Cache) -> Result<Option<u64>> {
        Ok(None)
    }

    fn device(&self) -> Device;

    /// Whether decoding one sequence from `cache` on can replay a captured CUDA graph per token
    /// ([`CausalLm::graph_decoder`]).
    fn graph_ready(&self, _cache: &Self::Cache) -> bool {
        false
    }

    /// Takes `cache` (one sequence, [`CausalLm::graph_ready`]) over into a decoder that replays
    /// one captured CUDA graph per token. Call it after at least one eager one-token step, which
    /// does the lazy set-up a capture must not.
    fn graph_decoder<'a>(&'a self, cache: Self::Cache) -> Result<Box<dyn ReplayDecoder + 'a>> {
        let _ = cache;
        bail!("this model cannot decode by CUDA graph replays")
    }

    /// Largest context the model was trained for, if known.
    fn max_context(&self) -> Option<i64>;
}
