//! Greedy decoding with CUDA graphs: one decoding step of the whole model captured once and
//! replayed per token. At small batches a step is a long series of small kernels, and launching
//! them one by one from the host takes longer than running them; a replay launches them all at
//! once.
//!
//! The captured step reads the token ids, the position and the decoding state from fixed tensors
//! and writes its greedy picks, its logits and the new state back into them, so that each replay
//! continues where the last one stopped without the host. Every mixer's step updates its state
//! in place (no state is built anew and copied back), so a replay moves each state tensor only
//! as far as its update needs, and the graph's memory pool holds no second copy of the state. Host values frozen into the capture
//! must not change between steps: positions are read on the device ([`Model::decode_step_at`]),
//! and the state must have stopped changing shape (a window cache filled), which
//! [`GraphDecoder::new`] checks. Softmax attention's KV cache grows every step: it is refused.
use crate::llama::{Model, ModelCache};
use crate::lm::ReplayDecoder;
use anyhow::{bail, ensure, Context, Result};
use linearize_torch_ext::CudaGraph;
use tch::{Device, Kind, Tensor};

pub struct GraphDecoder<'m> {
    graph: CudaGraph,
    /// (b, 1) int64: the ids the next replay reads; each replay overwrites them with its picks.
    ids: Tensor,
    /// (b, 1, vocab) f32: the last replay's logits.
    logits: Tensor,
    /// () int64 on the device: the position the next replay decodes at, advanced by each.
    position: Tensor,
    /// The state the graph reads and updates in place (kept alive here: the graph holds only
    /// their addresses).
    _state: Vec<Tensor>,
    /// The model's per-layer state objects, which hold the capture's own tensors; their host
    /// counters stopped at the capture.
    _cache: ModelCache,
    /// Tokens decoded so far, the prefix included: the position of the next replay.
    seen: i64,
    max_positions: i64,
    /// The weights the graph reads must outlive it; it also checks the ids of `step_with`.
    model: &'m Model,
}

impl<'m> GraphDecoder<'m> {
    /// Captures a greedy decoding step of `model` from `cache` (taken over) whose first input is
    /// `ids` (b, 1). Decode eagerly first until the state stops growing (LoLCATs and SWA caches
    /// hold a window of tokens) and at least once in this process, which does libtorch's and
    /// cuBLAS's lazy set-up outside the capture.
    pub fn new(model: &'m Model, mut cache: ModelCache, ids: &Tensor) -> Result<Self> {
        let device = model.device();
        let Device::Cuda(index) = device else {
            bail!("CUDA graphs need a CUDA device; the model is on {device:?}");
        };
        let seen = cache.seen();
        let state = model.state_tensors(&cache)?;
        // The captured step cannot check its ids (no reads from the device during a capture).
        let ids = ids.to_device(device).to_kind(Kind::Int64).copy(); // (b, 1)
        model.check_token_ids(&ids)?;
        let position = Tensor::from(seen).to_device(device);
        let mut logits = None;
        let graph = tch::no_grad(|| {
            CudaGraph::capture(index, || {
                let out = model.decode_step_at(&ids, &mut cache, &position)?; // (b, 1, V)
                let next = model.state_tensors(&cache)?;
                ensure!(
                    next.len() == state.len(),
                    "the decoding state had {} tensors before the step and {} after",
                    state.len(),
                    next.len()
                );
                for (i, (old, new)) in state.iter().zip(&next).enumerate() {
                    ensure!(
                        old.size() == new.size() && old.kind() == new.kind(),
                        "decoding state tensor {i} changes from {:?} {:?} to {:?} {:?} in a \
                         step: decode eagerly until the state stops growing (a full window)",
                        old.kind(),
                        old.size(),
                        new.kind(),
                        new.size()
                    );
                    ensure!(
                        old.data_ptr() == new.data_ptr(),
                        "decoding state tensor {i} ({:?} {:?}) was replaced in a step rather than \
                         updated in place: decode eagerly at least once first (without gradients), \
                         which moves the state to its decoding layout",
                        old.kind(),
                        old.size()
                    );
                }
                ids.shallow_clone().copy_(&out.argmax(-1, false));
                let _ = position.shallow_clone().g_add_scalar_(1);
                logits = Some(out);
                Ok(())
            })
        })
        .context("capturing a decoding step")?;
        Ok(Self {
            graph,
            ids,
            logits: logits.context("the captured step produced no logits")?,
            position,
            _state: state,
            _cache: cache,
            seen,
            max_positions: model.config().max_position_embeddings,
            model,
        })
    }

    /// Decodes one token per sequence: the input ids at position [`GraphDecoder::seen`] go
    /// through the model; its logits and greedy picks replace [`GraphDecoder::logits`] and
    /// [`GraphDecoder::ids`]. Nothing waits for the device.
    pub fn step(&mut self) -> Result<()> {
        ensure!(
            self.seen < self.max_positions,
            "position {} is beyond max_position_embeddings = {} of the model",
            self.seen,
            self.max_positions
        );
        self.graph.replay()?;
        self.seen += 1;
        Ok(())
    }

    /// Decodes the given ids (b, 1) instead of the last step's picks (sampling on the host).
    pub fn step_with(&mut self, ids: &Tensor) -> Result<()> {
        self.model.check_token_ids(ids)?;
        self.ids.copy_(ids);
        self.step()
    }

    /// (b, 1) int64: the last step's greedy picks, which the next step decodes.
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// (b, 1, vocab) f32: the last step's logits (overwritten by the next step).
    pub fn logits(&self) -> &Tensor {
        &self.logits
    }

    /// The position the next step decodes at, as the graph reads it on the device (the host
    /// count is [`GraphDecoder::seen`]).
    pub fn position(&self) -> &Tensor {
        &self.position
    }

    /// Tokens of the sequence so far; the position the next step decodes at.
    pub fn seen(&self) -> i64 {
        self.seen
    }
}

impl ReplayDecoder for GraphDecoder<'_> {
    fn decode(&mut self, id: u32) -> Result<Vec<f32>> {
        ensure!(
            self.ids.size() == [1, 1],
            "decoding one token needs a decoder of one sequence, this one has ids {:?}",
            self.ids.size()
        );
        let id = Tensor::from_slice(&[i64::from(id)]).view([1, 1]);
        self.step_with(&id)?;
        let logits = self.logits.view([-1]).to_device(Device::Cpu);
        Vec::<f32>::try_from(&logits).context("copying logits to the CPU")
    }
}
