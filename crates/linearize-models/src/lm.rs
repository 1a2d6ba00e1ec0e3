//! The interface generation and evaluation use to drive any causal language model.
use anyhow::Result;
use tch::{Device, Tensor};

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

    /// Largest context the model was trained for, if known.
    fn max_context(&self) -> Option<i64>;
}
