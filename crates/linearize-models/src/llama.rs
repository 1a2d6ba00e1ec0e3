//! The Llama-family decoder (llama, mistral, qwen2, qwen3, and gemma3_text) on libtorch.
//! Parameters live in the model's `VarStore` under the Hugging Face tensor names, so checkpoints
//! load by name and later code can freeze parameters or save subsets of them by name. The
//! attention core of every layer is a swappable [`Mixer`].
//!
//! Gemma 3 is the same decoder with: embeddings scaled by sqrt(hidden), RMSNorm by `1 + weight`
//! in f32, a norm after attention and around the MLP too, a GeLU-gated MLP, queries scaled by
//! `query_pre_attn_scalar`, local (sliding-window) layers with their own RoPE, and soft-capped
//! logits.
use crate::config::{Family, LayerType, ModelConfig};
use crate::config_check::check_config;
use crate::graph_decode::GraphDecoder;
use crate::linear::{Linear, ParamInit};
use crate::lm::{CausalLm, ReplayDecoder};
use crate::mixer::{Mixer, MixerInput, MixerState, SoftmaxMixer};
use crate::multimodal;
use crate::rope::Rope;
use crate::weights::{self, Checkpoint, ExtraTensorPolicy};
use anyhow::{bail, ensure, Context, Result};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

pub struct Embedding {
    weight: Tensor, // (vocab, hidden)
    /// Gemma's sqrt(hidden), rounded to the weights' dtype as transformers does.
    scale: Option<f64>,
}

impl Embedding {
    fn new(path: &nn::Path, cfg: &ModelConfig, init: ParamInit) -> Self {
        let (vocab, hidden) = (cfg.vocab_size, cfg.hidden_size);
        let weight = init.var(path, "weight", &[vocab, hidden], init.normal());
        let scale = (cfg.family == Family::Gemma3).then(|| {
            Tensor::from((hidden as f64).sqrt() as f32)
                .to_kind(weight.kind())
                .double_value(&[])
        });
        Self { weight, scale }
    }

    /// ids (b, L) int64 -> (b, L, hidden). An id outside the vocabulary (a tokenizer larger than
    /// the model's `vocab_size`) is an error naming it; libtorch would abort on it (a CUDA device
    /// assert, on the CPU an exception).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.check_ids(ids)?;
        self.lookup(ids)
    }

    /// Refuses ids outside the vocabulary. It reads two values back from the device, which a
    /// CUDA graph's capture does not allow: the captured decoding step looks up without it.
    pub fn check_ids(&self, ids: &Tensor) -> Result<()> {
        let vocab = self.weight.size()[0];
        if ids.numel() > 0 {
            let lowest = ids.f_min()?.int64_value(&[]);
            let highest = ids.f_max()?.int64_value(&[]);
            ensure!(
                lowest >= 0 && highest < vocab,
                "token id {} is outside the model's vocabulary of {vocab} (config.json \
                 vocab_size): the tokenizer does not belong to this model",
                if lowest < 0 { lowest } else { highest }
            );
        }
        Ok(())
    }

    /// ids (b, L) int64 -> (b, L, hidden), the ids taken as valid (see [`Embedding::check_ids`]).
    fn lookup(&self, ids: &Tensor) -> Result<Tensor> {
        let x = Tensor::f_embedding(&self.weight, ids, -1, false, false)?;
        Ok(match self.scale {
            Some(scale) => x * scale,
            None => x,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

pub struct RmsNorm {
    weight: Tensor, // (dim,)
    eps: f64,
    /// Gemma's norm: scaled by `1 + weight` (the stored weight starts at 0), computed in f32.
    gemma: bool,
}

impl RmsNorm {
    fn new(path: &nn::Path, dim: i64, cfg: &ModelConfig, init: ParamInit) -> Self {
        let gemma = cfg.family == Family::Gemma3;
        let unit = if gemma { 0.0 } else { 1.0 };
        Self {
            weight: init.var(path, "weight", &[dim], nn::Init::Const(unit)),
            eps: cfg.rms_norm_eps,
            gemma,
        }
    }

    /// x (..., dim) normalised over its last dim, by libtorch's `rms_norm`: on CUDA one fused
    /// kernel each way (accumulating in f32), where the composition of HF's formula was six
    /// passes forward and more backward over every hidden state. HF rounds the normalised value
    /// to the model dtype before the weight multiplies it; the fused kernel rounds once, after:
    /// in bf16 the two differ by about a rounding step (the parity tests bound the logits).
    /// Gemma's norm is HF's formula exactly: normalised and scaled in f32, rounded once.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = [self.weight.size()[0]];
        if self.gemma {
            let scale = self.weight.to_kind(Kind::Float) + 1.0;
            return x
                .to_kind(Kind::Float)
                .rms_norm(dim.as_slice(), Some(&scale), self.eps)
                .to_kind(x.kind());
        }
        x.rms_norm(dim.as_slice(), Some(&self.weight), self.eps)
    }
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// The gate's activation: GeLU (tanh approximation) for Gemma, SiLU otherwise.
    gelu: bool,
}

impl Mlp {
    fn new(path: &nn::Path, cfg: &ModelConfig, init: ParamInit) -> Self {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Self {
            gate_proj: Linear::new(&path.sub("gate_proj"), h, i, bias, init),
            up_proj: Linear::new(&path.sub("up_proj"), h, i, bias, init),
            down_proj: Linear::new(&path.sub("down_proj"), i, h, bias, init),
            gelu: cfg.family == Family::Gemma3,
        }
    }

    /// x (b, L, hidden) -> (b, L, hidden).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let gate = self.gate_proj.forward(x); // (b, L, inter)
        let gate = if self.gelu {
            gate.gelu("tanh")
        } else {
            gate.silu()
        };
        self.down_proj.forward(&(gate * self.up_proj.forward(x)))
    }
}

/// The cos/sin rows of the tokens of one forward pass, shared by all layers.
struct Positions<'a> {
    cos: Tensor, // (L, head_dim)
    sin: Tensor, // (L, head_dim)
    /// The local layers' rows where they have their own RoPE (Gemma 3).
    local: Option<(Tensor, Tensor)>,
    offset: i64,
    /// `offset` on the device, when decoding under a CUDA graph.
    position: Option<&'a Tensor>,
}

impl Positions<'_> {
    /// The (cos, sin) rows a layer of type `layer_type` rotates by.
    fn cos_sin(&self, layer_type: LayerType) -> (&Tensor, &Tensor) {
        match (&self.local, layer_type) {
            (Some((cos, sin)), LayerType::Sliding) => (cos, sin),
            _ => (&self.cos, &self.sin),
        }
    }
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    mixer: Box<dyn Mixer>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    layer_type: LayerType,
    /// What queries are multiplied by so that the mixers' 1/sqrt(head_dim) scale becomes
    /// Gemma's 1/sqrt(query_pre_attn_scalar); `None` when they agree.
    query_scale: Option<f64>,
}

impl Attention {
    fn new(path: &nn::Path, cfg: &ModelConfig, layer: usize, init: ParamInit) -> Self {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let norm = |name: &str| RmsNorm::new(&path.sub(name), d, cfg, init);
        let query_scale = cfg
            .gemma
            .as_ref()
            .map(|g| (d as f64 / g.query_pre_attn_scalar).sqrt())
            .filter(|s| *s != 1.0);
        Self {
            q_proj: Linear::new(&path.sub("q_proj"), h, nq * d, cfg.qkv_bias, init),
            k_proj: Linear::new(&path.sub("k_proj"), h, nkv * d, cfg.qkv_bias, init),
            v_proj: Linear::new(&path.sub("v_proj"), h, nkv * d, cfg.qkv_bias, init),
            o_proj: Linear::new(&path.sub("o_proj"), nq * d, h, cfg.o_proj_bias, init),
            q_norm: cfg.qk_norm.then(|| norm("q_norm")),
            k_norm: cfg.qk_norm.then(|| norm("k_norm")),
            mixer: Box::new(SoftmaxMixer::new(cfg.layer_window(layer))),
            num_heads: nq,
            num_kv_heads: nkv,
            head_dim: d,
            layer_type: cfg.layer_types[layer],
            query_scale,
        }
    }

    /// x (b, L, hidden) -> (b, L, hidden).
    fn forward(
        &self,
        x: &Tensor,
        pos: &Positions,
        state: Option<&mut MixerState>,
    ) -> Result<Tensor> {
        let (b, len) = (x.size()[0], x.size()[1]);
        let heads = |proj: &Linear, n: i64, norm: Option<&RmsNorm>| {
            let y = proj.forward(x).view([b, len, n, self.head_dim]); // (b, L, n, d)
            let y = match norm {
                Some(norm) => norm.forward(&y),
                None => y,
            };
            y.transpose(1, 2) // (b, n, L, d)
        };
        let q_raw = heads(&self.q_proj, self.num_heads, self.q_norm.as_ref());
        let k_raw = heads(&self.k_proj, self.num_kv_heads, self.k_norm.as_ref());
        let v = heads(&self.v_proj, self.num_kv_heads, None);
        let (cos, sin) = pos.cos_sin(self.layer_type);
        let q = Rope::apply(&q_raw, cos, sin);
        let q = match self.query_scale {
            Some(scale) => q * scale,
            None => q,
        };
        let k = Rope::apply(&k_raw, cos, sin);
        let input = MixerInput {
            q: &q,
            k: &k,
            v: &v,
            q_raw: &q_raw,
            k_raw: &k_raw,
            offset: pos.offset,
            position: pos.position,
        };
        let y = self.mixer.forward(&input, state)?; // (b, h, L, d)
        let y = y
            .transpose(1, 2)
            .reshape([b, len, self.num_heads * self.head_dim]);
        Ok(self.o_proj.forward(&y))
    }

    pub fn mixer(&self) -> &dyn Mixer {
        self.mixer.as_ref()
    }
}

/// Gemma's norms around the MLP: its input, and its output before the residual add.
pub struct FeedforwardNorms {
    pub pre_feedforward_layernorm: RmsNorm,
    pub post_feedforward_layernorm: RmsNorm,
}

pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// The MLP's input norm (Llama), or the attention output's norm (Gemma).
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
    pub feedforward_norms: Option<FeedforwardNorms>,
}

impl DecoderLayer {
    fn new(path: &nn::Path, cfg: &ModelConfig, layer: usize, init: ParamInit) -> Self {
        let norm = |name: &str| RmsNorm::new(&path.sub(name), cfg.hidden_size, cfg, init);
        Self {
            input_layernorm: norm("input_layernorm"),
            self_attn: Attention::new(&path.sub("self_attn"), cfg, layer, init),
            post_attention_layernorm: norm("post_attention_layernorm"),
            mlp: Mlp::new(&path.sub("mlp"), cfg, init),
            feedforward_norms: (cfg.family == Family::Gemma3).then(|| FeedforwardNorms {
                pre_feedforward_layernorm: norm("pre_feedforward_layernorm"),
                post_feedforward_layernorm: norm("post_feedforward_layernorm"),
            }),
        }
    }

    /// x (b, L, hidden) -> (b, L, hidden), pre-norm residual blocks (Gemma: normed on both
    /// sides).
    fn forward(
        &self,
        x: &Tensor,
        pos: &Positions,
        state: Option<&mut MixerState>,
    ) -> Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.input_layernorm.forward(x), pos, state)?;
        Ok(match &self.feedforward_norms {
            None => {
                let h = x + attn;
                &h + self.mlp.forward(&self.post_attention_layernorm.forward(&h))
            }
            Some(n) => {
                let h = x + self.post_attention_layernorm.forward(&attn);
                let y = self.mlp.forward(&n.pre_feedforward_layernorm.forward(&h));
                &h + n.post_feedforward_layernorm.forward(&y)
            }
        })
    }
}

/// The decoding state of every layer and how many tokens it has seen.
pub struct ModelCache {
    states: Vec<MixerState>,
    seen: i64,
}

impl ModelCache {
    /// Tokens seen so far: the position of the next token.
    pub fn seen(&self) -> i64 {
        self.seen
    }
}

/// A Llama-family causal LM: embeddings, decoder layers, final norm and LM head.
pub struct Model {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    /// The local layers' RoPE where it differs from the global one (Gemma 3).
    local_rope: Option<Rope>,
    cfg: ModelConfig,
    kind: Kind,
    vs: nn::VarStore,
}

impl Model {
    /// A randomly initialised model (HF's init: N(0, initializer_range) weights, unit norms).
    /// Parameters start frozen; see [`Model::var_store_mut`].
    pub fn new(cfg: &ModelConfig, device: Device, kind: Kind) -> Result<Self> {
        Self::build(
            cfg,
            device,
            kind,
            ParamInit::Random {
                std: cfg.initializer_range,
            },
        )
    }

    /// Loads `dir/config.json` and the safetensors checkpoint beside it, converted to `kind` on
    /// `device` (of a multimodal Gemma 3, its text model). Parameters start frozen; see
    /// [`Model::var_store_mut`].
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let ckpt = multimodal::open_checkpoint(dir, &cfg)?;
        Self::from_checkpoint(&cfg, &ckpt, device, kind)
            .with_context(|| format!("loading the model in {}", dir.display()))
    }

    /// Builds the model of `cfg` with its parameters read from `ckpt`.
    pub fn from_checkpoint(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        Self::from_checkpoint_with_extras(cfg, ckpt, device, kind, &|_, _| Ok(false))
    }

    /// Like [`Model::from_checkpoint`] for a checkpoint that also holds tensors of other
    /// modules (e.g. the feature maps of a converted model, loaded separately): a tensor that is
    /// no parameter and no known HF extra goes to `extra`, which accepts it with `Ok(true)`.
    pub fn from_checkpoint_with_extras(
        cfg: &ModelConfig,
        ckpt: &Checkpoint,
        device: Device,
        kind: Kind,
        extra: ExtraTensorPolicy,
    ) -> Result<Self> {
        let accepted = |name: &str, shape: &[i64]| -> Result<bool> {
            Ok(extra_tensor(cfg, name, shape)? || extra(name, shape)?)
        };
        // The config decides what is allocated: it must agree with the checkpoint first.
        check_config(cfg, ckpt, &accepted)?;
        let model = Self::build(cfg, device, kind, ParamInit::Uninit)?;
        weights::fill_var_store(&model.vs, ckpt, &accepted)?;
        Ok(model)
    }

    fn build(cfg: &ModelConfig, device: Device, kind: Kind, init: ParamInit) -> Result<Self> {
        ensure!(
            matches!(
                kind,
                Kind::Float | Kind::BFloat16 | Kind::Half | Kind::Double
            ),
            "model dtype must be f32, bf16, f16 or f64, got {kind:?}"
        );
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let root = vs.root();
        let model = root.sub("model");
        let embed_tokens = Embedding::new(&model.sub("embed_tokens"), cfg, init);
        let layers = (0..cfg.num_hidden_layers as usize)
            .map(|i| DecoderLayer::new(&model.sub("layers").sub(i), cfg, i, init))
            .collect();
        let norm = RmsNorm::new(&model.sub("norm"), cfg.hidden_size, cfg, init);
        let lm_head = if cfg.tie_word_embeddings {
            Linear::shared(embed_tokens.weight())
        } else {
            Linear::new(
                &root.sub("lm_head"),
                cfg.hidden_size,
                cfg.vocab_size,
                false,
                init,
            )
        };
        vs.freeze();
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg, kind, device),
            local_rope: cfg.gemma.as_ref().map(|g| {
                Rope::with(
                    cfg,
                    g.local_rope_theta,
                    g.local_rope_scaling.as_ref(),
                    kind,
                    device,
                )
            }),
            cfg: cfg.clone(),
            kind,
            vs,
        })
    }

    /// ids (b, L) int64 -> final hidden states (b, L, hidden) after the last norm, in the model
    /// dtype. With `cache`, the tokens continue what it has seen and it is updated.
    pub fn hidden_states(&self, ids: &Tensor, cache: Option<&mut ModelCache>) -> Result<Tensor> {
        self.hidden_states_at(ids, cache, None)
    }

    /// Refuses token ids outside the model's vocabulary (one read from the device).
    pub fn check_token_ids(&self, ids: &Tensor) -> Result<()> {
        self.embed_tokens.check_ids(ids)
    }

    /// One decoding step whose position is read from `position` (an int64 scalar on the device
    /// equal to `cache.seen()`) rather than from the host: the step a CUDA graph captures and
    /// replays at every position (see [`crate::graph_decode`]). ids (b, 1) -> logits (b, 1, vocab)
    /// in f32. Mixers whose step cannot be captured refuse. The ids are not checked against the
    /// vocabulary (that would read from the device): check them with [`Model::check_token_ids`].
    pub fn decode_step_at(
        &self,
        ids: &Tensor,
        cache: &mut ModelCache,
        position: &Tensor,
    ) -> Result<Tensor> {
        ensure!(
            ids.size().get(1) == Some(&1),
            "a decoding step takes one token per sequence, got ids of shape {:?}",
            ids.size()
        );
        Ok(self.logits(&self.hidden_states_at(ids, Some(cache), Some(position))?))
    }

    fn hidden_states_at(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut ModelCache>,
        position: Option<&Tensor>,
    ) -> Result<Tensor> {
        let size = ids.size();
        ensure!(
            size.len() == 2 && ids.kind() == Kind::Int64,
            "token ids must be an int64 (batch, length) tensor, got {:?} {size:?}",
            ids.kind()
        );
        let offset = cache.as_ref().map_or(0, |c| c.seen);
        if let Some(c) = &cache {
            self.check_cache(c)?;
        }
        let table = |rope: &Rope| match position {
            Some(position) => Ok(rope.cos_sin_at(position, size[1])),
            None => rope.cos_sin(offset, size[1]),
        };
        let (cos, sin) = table(&self.rope)?;
        let pos = Positions {
            cos,
            sin,
            local: self.local_rope.as_ref().map(table).transpose()?,
            offset,
            position,
        };
        let ids = ids.to_device(self.vs.device());
        // A step with its position on the device is the one a CUDA graph captures, where no
        // value may be read back: its ids are the graph's own greedy picks or were checked by
        // [`Model::check_token_ids`] before they were written (GraphDecoder does both).
        let mut x = match position {
            Some(_) => self.embed_tokens.lookup(&ids)?,
            None => self.embed_tokens.forward(&ids)?,
        }; // (b, L, hidden)
        for (i, layer) in self.layers.iter().enumerate() {
            let state = cache.as_deref_mut().map(|c| &mut c.states[i]);
            x = layer
                .forward(&x, &pos, state)
                .with_context(|| format!("layer {i}"))?;
        }
        if let Some(c) = cache {
            c.seen += size[1];
        }
        Ok(self.norm.forward(&x))
    }

    /// Backpropagates `loss(hidden)` for `ids` (b, L), where `hidden` (b, L, hidden) are the
    /// final hidden states after the last norm (turn them into logits with [`Self::logits`], or
    /// chunk by chunk for a large vocabulary), with activation checkpointing: the layers
    /// run once without an autograd graph, keeping only each layer's input (b, L, hidden); then
    /// again one at a time, last first, each with its graph, backpropagating the gradient of
    /// its output (as the gradient of `sum(output · grad)`). Parameters' gradients accumulate as
    /// from `loss.backward()` after a plain forward, for one more forward pass of compute and
    /// one layer's activations of memory instead of all of them. Whole sequences only (no
    /// decoding cache). Each layer runs both times from the same seed, so dropout (LoRA's)
    /// draws the same masks; the recomputed last layer is checked against the first pass.
    pub fn backward_checkpointed(
        &self,
        ids: &Tensor,
        loss: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let size = ids.size();
        ensure!(
            size.len() == 2 && ids.kind() == Kind::Int64,
            "token ids must be an int64 (batch, length) tensor, got {:?} {size:?}",
            ids.kind()
        );
        let (cos, sin) = self.rope.cos_sin(0, size[1])?;
        let local = match &self.local_rope {
            Some(rope) => Some(rope.cos_sin(0, size[1])?),
            None => None,
        };
        let pos = Positions {
            cos,
            sin,
            local,
            offset: 0,
            position: None,
        };
        let embedded = self
            .embed_tokens
            .forward(&ids.to_device(self.vs.device()))?; // (b, L, hidden)
        let mut inputs = Vec::with_capacity(self.layers.len());
        // One draw from torch's generator, so the seeds follow the caller's seeding.
        let seed = Tensor::randint(i64::MAX, [1], (Kind::Int64, Device::Cpu)).int64_value(&[0]);
        let seed_layer = |i: usize| tch::manual_seed(seed.wrapping_add(i as i64));
        let top = tch::no_grad(|| -> Result<Tensor> {
            let mut x = embedded.detach();
            for (i, layer) in self.layers.iter().enumerate() {
                seed_layer(i);
                let next = layer
                    .forward(&x, &pos, None)
                    .with_context(|| format!("layer {i}"))?;
                inputs.push(x);
                x = next;
            }
            Ok(x)
        })?;
        let top_leaf = top.detach().set_requires_grad(true);
        let value = loss(&self.norm.forward(&top_leaf))?;
        value.f_backward()?;
        let mut grad = top_leaf.grad();
        for (i, layer) in self.layers.iter().enumerate().rev() {
            ensure!(
                grad.defined(),
                "activation checkpointing: the loss does not depend on layer {i}'s output"
            );
            let input = inputs[i].detach().set_requires_grad(true);
            inputs.truncate(i);
            seed_layer(i);
            let out = layer
                .forward(&input, &pos, None)
                .with_context(|| format!("layer {i}, recomputed"))?;
            if i + 1 == self.layers.len() {
                let scale = top.abs().max().double_value(&[]).max(1e-6);
                let drift = (&out.detach() - &top).abs().max().double_value(&[]);
                ensure!(
                    drift <= 1e-3 * scale,
                    "activation checkpointing: layer {i} computed {drift:e} (of {scale:e}) \
                     differently the second time; it must be deterministic"
                );
            }
            (out * &grad).sum(Kind::Float).f_backward()?;
            grad = input.grad();
        }
        if embedded.requires_grad() && grad.defined() {
            (embedded * &grad).sum(Kind::Float).f_backward()?;
        }
        Ok(())
    }

    /// hidden (b, L, hidden) -> logits (b, L, vocab) in f32 (soft-capped where the config says,
    /// in the model dtype as transformers does).
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let logits = self.lm_head.forward(hidden);
        let logits = match self
            .cfg
            .gemma
            .as_ref()
            .and_then(|g| g.final_logit_softcapping)
        {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        };
        logits.to_kind(Kind::Float)
    }

    /// ids (b, L) int64 -> logits (b, L, vocab) in f32, computed in the model dtype.
    pub fn forward(&self, ids: &Tensor, cache: Option<&mut ModelCache>) -> Result<Tensor> {
        Ok(self.logits(&self.hidden_states(ids, cache)?))
    }

    /// An empty decoding state for `batch` sequences, one state per layer from its mixer.
    pub fn new_cache(&self, batch: i64) -> Result<ModelCache> {
        let states = self
            .layers
            .iter()
            .map(|l| l.self_attn.mixer.new_state(batch))
            .collect::<Result<_>>()?;
        Ok(ModelCache { states, seen: 0 })
    }

    /// `cache` on `device` with each sequence repeated `times` times (one prompt forked into
    /// several continuations), with room for `reserve` more tokens in caches that grow. With
    /// `times` 1 and the CPU, a copy that frees the accelerator.
    pub fn fork_cache(
        &self,
        cache: &ModelCache,
        times: i64,
        reserve: i64,
        device: Device,
    ) -> Result<ModelCache> {
        self.check_cache(cache)?;
        let states = self
            .layers
            .iter()
            .zip(&cache.states)
            .map(|(l, s)| l.self_attn.mixer.fork_state(s, times, reserve, device))
            .collect::<Result<_>>()?;
        Ok(ModelCache {
            states,
            seen: cache.seen,
        })
    }

    /// Whether decoding from `cache` can go on by CUDA graph replays ([`crate::graph_decode`]):
    /// the model is on a CUDA device and every layer's step is capturable from its state.
    pub fn graph_ready(&self, cache: &ModelCache) -> bool {
        matches!(self.device(), Device::Cuda(_))
            && cache.states.len() == self.layers.len()
            && self
                .layers
                .iter()
                .zip(&cache.states)
                .all(|(layer, state)| layer.self_attn.mixer.step_capturable(state))
    }

    /// Every tensor of the decoding state, layer by layer (see [`Mixer::state_tensors`]).
    pub fn state_tensors(&self, cache: &ModelCache) -> Result<Vec<Tensor>> {
        self.check_cache(cache)?;
        let mut all = Vec::new();
        for (i, (layer, state)) in self.layers.iter().zip(&cache.states).enumerate() {
            all.extend(
                layer
                    .self_attn
                    .mixer
                    .state_tensors(state)
                    .with_context(|| format!("layer {i}"))?,
            );
        }
        Ok(all)
    }

    /// Bytes of memory the decoding state holds, over all layers.
    pub fn cache_bytes(&self, cache: &ModelCache) -> Result<u64> {
        self.check_cache(cache)?;
        self.layers
            .iter()
            .zip(&cache.states)
            .map(|(l, s)| l.self_attn.mixer.state_bytes(s))
            .sum()
    }

    fn check_cache(&self, cache: &ModelCache) -> Result<()> {
        ensure!(
            cache.states.len() == self.layers.len(),
            "cache has {} layer states, the model {} layers",
            cache.states.len(),
            self.layers.len()
        );
        Ok(())
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The dtype of the weights and of the computation.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn layer(&self, i: usize) -> &DecoderLayer {
        &self.layers[i]
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut DecoderLayer {
        &mut self.layers[i]
    }

    /// The attention core of layer `i` (panics when out of range, like indexing).
    pub fn mixer(&self, i: usize) -> &dyn Mixer {
        self.layers[i].self_attn.mixer()
    }

    /// Replaces the attention core of layer `i`, returning the previous one. Caches made before
    /// hold the old mixer's state and are refused by the new one.
    pub fn set_mixer(&mut self, i: usize, mixer: Box<dyn Mixer>) -> Result<Box<dyn Mixer>> {
        let n = self.layers.len();
        let Some(layer) = self.layers.get_mut(i) else {
            bail!(
                "layer {i} does not exist (the model has {n} layers, 0..{})",
                n.saturating_sub(1)
            );
        };
        Ok(std::mem::replace(&mut layer.self_attn.mixer, mixer))
    }

    /// The HF name prefix of layer `i`'s parameters, e.g. `model.layers.3`.
    pub fn layer_prefix(i: usize) -> String {
        format!("model.layers.{i}")
    }

    /// Every parameter by HF name, sorted; tied embeddings appear once.
    pub fn named_parameters(&self) -> BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// The parameters of layer `i`, by HF name.
    pub fn layer_parameters(&self, i: usize) -> BTreeMap<String, Tensor> {
        let prefix = format!("{}.", Self::layer_prefix(i));
        self.vs
            .variables()
            .into_iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .collect()
    }

    /// Every projection by HF module name (`model.layers.0.self_attn.q_proj`, ...,
    /// `lm_head`), for installing adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let prefix = Self::layer_prefix(i);
            let attn = &mut layer.self_attn;
            for (name, lin) in [
                ("q_proj", &mut attn.q_proj),
                ("k_proj", &mut attn.k_proj),
                ("v_proj", &mut attn.v_proj),
                ("o_proj", &mut attn.o_proj),
            ] {
                out.push((format!("{prefix}.self_attn.{name}"), lin));
            }
            let mlp = &mut layer.mlp;
            for (name, lin) in [
                ("gate_proj", &mut mlp.gate_proj),
                ("up_proj", &mut mlp.up_proj),
                ("down_proj", &mut mlp.down_proj),
            ] {
                out.push((format!("{prefix}.mlp.{name}"), lin));
            }
        }
        out.push(("lm_head".into(), &mut self.lm_head));
        out
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> i64 {
        self.vs
            .variables()
            .values()
            .map(Tensor::numel)
            .sum::<usize>() as i64
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// For `freeze`/`unfreeze` of the parameters.
    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }
}

/// Every parameter of the model of `cfg`, by HF name, with its shape; what a checkpoint for it
/// must hold. Agrees with the variables [`Model`] creates (tested).
pub fn parameter_shapes(cfg: &ModelConfig) -> BTreeMap<String, Vec<i64>> {
    let (h, i, d, v) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
        cfg.vocab_size,
    );
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let mut shapes = BTreeMap::new();
    let mut add = |name: String, shape: Vec<i64>| shapes.insert(name, shape);
    add("model.embed_tokens.weight".into(), vec![v, h]);
    add("model.norm.weight".into(), vec![h]);
    if !cfg.tie_word_embeddings {
        add("lm_head.weight".into(), vec![v, h]);
    }
    for layer in 0..cfg.num_hidden_layers as usize {
        let p = Model::layer_prefix(layer);
        add(format!("{p}.input_layernorm.weight"), vec![h]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        if cfg.family == Family::Gemma3 {
            add(format!("{p}.pre_feedforward_layernorm.weight"), vec![h]);
            add(format!("{p}.post_feedforward_layernorm.weight"), vec![h]);
        }
        for (name, out, inp, bias) in [
            ("self_attn.q_proj", q, h, cfg.qkv_bias),
            ("self_attn.k_proj", kv, h, cfg.qkv_bias),
            ("self_attn.v_proj", kv, h, cfg.qkv_bias),
            ("self_attn.o_proj", h, q, cfg.o_proj_bias),
            ("mlp.gate_proj", i, h, cfg.mlp_bias),
            ("mlp.up_proj", i, h, cfg.mlp_bias),
            ("mlp.down_proj", h, i, cfg.mlp_bias),
        ] {
            add(format!("{p}.{name}.weight"), vec![out, inp]);
            if bias {
                add(format!("{p}.{name}.bias"), vec![out]);
            }
        }
        if cfg.qk_norm {
            add(format!("{p}.self_attn.q_norm.weight"), vec![d]);
            add(format!("{p}.self_attn.k_norm.weight"), vec![d]);
        }
    }
    shapes
}

/// Checkpoint tensors with no parameter that HF checkpoints are known to carry: the LM head of a
/// tied model (HF ties it to the embedding on load, so it is ignored; it must have the
/// embedding's shape) and old Llama checkpoints' RoPE `inv_freq` buffers.
pub fn extra_tensor(cfg: &ModelConfig, name: &str, shape: &[i64]) -> Result<bool> {
    if name == "lm_head.weight" && cfg.tie_word_embeddings {
        let want = [cfg.vocab_size, cfg.hidden_size];
        ensure!(
            shape == want,
            "has shape {shape:?}, but with tie_word_embeddings it must match the embedding {want:?}"
        );
        return Ok(true);
    }
    Ok(name.ends_with(".self_attn.rotary_emb.inv_freq"))
}

impl CausalLm for Model {
    type Cache = ModelCache;

    fn new_cache(&self, batch: i64) -> Result<ModelCache> {
        Model::new_cache(self, batch)
    }

    /// Runs without autograd: this is the inference interface (generation, evaluation).
    fn forward_cached(&self, ids: &Tensor, cache: &mut ModelCache) -> Result<Tensor> {
        tch::no_grad(|| Model::forward(self, ids, Some(cache)))
    }

    fn graph_ready(&self, cache: &ModelCache) -> bool {
        Model::graph_ready(self, cache)
    }

    fn graph_decoder<'a>(&'a self, cache: ModelCache) -> Result<Box<dyn ReplayDecoder + 'a>> {
        let first = Tensor::zeros([1, 1], (Kind::Int64, self.device()));
        Ok(Box::new(GraphDecoder::new(self, cache, &first)?))
    }

    fn cache_bytes(&self, cache: &ModelCache) -> Result<Option<u64>> {
        Model::cache_bytes(self, cache).map(Some)
    }

    fn device(&self) -> Device {
        Model::device(self)
    }

    fn max_context(&self) -> Option<i64> {
        Some(self.rope.max_positions())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(model_type: &str, extra: serde_json::Value) -> ModelConfig {
        let mut v = json!({
            "model_type": model_type, "vocab_size": 50, "hidden_size": 16,
            "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 32,
        });
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        ModelConfig::from_json_str(&v.to_string()).unwrap()
    }

    fn configs() -> Vec<ModelConfig> {
        vec![
            config("llama", json!({"tie_word_embeddings": true})),
            config("llama", json!({"attention_bias": true, "mlp_bias": true})),
            config("mistral", json!({"sliding_window": 3})),
            config("qwen2", json!({})),
            config("qwen3", json!({"head_dim": 8})),
            config(
                "gemma3_text",
                json!({"head_dim": 8, "sliding_window": 3, "sliding_window_pattern": 2,
                       "rope_local_base_freq": 100.0, "query_pre_attn_scalar": 12,
                       "final_logit_softcapping": 5.0}),
            ),
        ]
    }

    type Objective<'a> = &'a mut dyn FnMut(&Tensor) -> Result<Tensor>;

    /// Every parameter's gradient of `loss(logits)`, after clearing the gradients.
    fn gradients(
        model: &Model,
        target: &Tensor,
        run: &dyn Fn(&Model, Objective),
    ) -> BTreeMap<String, Tensor> {
        let params = model.named_parameters();
        for t in params.values() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        run(model, &mut |logits: &Tensor| {
            Ok((logits - target).square().mean(Kind::Float))
        });
        params
            .into_iter()
            .map(|(n, t)| (n, t.grad().copy()))
            .collect()
    }

    /// Ids a larger tokenizer makes: an error naming the id and the vocabulary, not a panic
    /// inside libtorch; a badly shaped id tensor likewise.
    #[test]
    fn ids_outside_the_vocabulary_are_errors() {
        let model = Model::new(&configs().remove(0), Device::Cpu, Kind::Float).unwrap();
        for bad in [50i64, 1 << 40, -1] {
            let ids = Tensor::from_slice(&[1i64, 2, bad]).view([1, 3]);
            let err = model.forward(&ids, None).unwrap_err().to_string();
            assert!(
                err.contains(&format!("token id {bad}")) && err.contains("vocabulary of 50"),
                "{err}"
            );
        }
        let err = model
            .forward(&Tensor::from_slice(&[1i64, 2]), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("(batch, length)"), "{err}");
        let mut cache = model.new_cache(1).unwrap();
        let ids = Tensor::from_slice(&[3i64, 70]).view([1, 2]);
        assert!(model.forward(&ids, Some(&mut cache)).is_err());
    }

    #[test]
    fn checkpointed_backward_gives_the_plain_gradients() {
        for cfg in [
            configs().remove(0),
            configs().remove(2),
            configs().remove(5),
        ] {
            tch::manual_seed(1);
            let mut model = Model::new(&cfg, Device::Cpu, Kind::Float).unwrap();
            model.var_store_mut().unfreeze();
            let ids = Tensor::randint(50, [2, 7], (Kind::Int64, Device::Cpu));
            // One target for both passes: other tests of this binary draw from torch's global
            // generator in parallel, so drawing it twice from one seed can give two targets.
            let target = Tensor::randn([2, 7, 50], (Kind::Float, Device::Cpu));
            let plain = gradients(&model, &target, &|m, loss| {
                loss(&m.forward(&ids, None).unwrap()).unwrap().backward();
            });
            let checkpointed = gradients(&model, &target, &|m, loss| {
                m.backward_checkpointed(&ids, &mut |hidden| loss(&m.logits(hidden)))
                    .unwrap();
            });
            for (name, g) in &plain {
                let c = &checkpointed[name];
                assert!(g.defined() && c.defined(), "{name}: no gradient");
                let scale = g.abs().max().double_value(&[]).max(1e-12);
                let diff = (g - c).abs().max().double_value(&[]);
                assert!(
                    diff <= 1e-5 * scale,
                    "{}: {name} differs by {diff:e}",
                    cfg.family
                );
            }
        }
    }

    #[test]
    fn variables_match_parameter_shapes() {
        for cfg in configs() {
            let model = Model::new(&cfg, Device::Cpu, Kind::Float).unwrap();
            let vars: BTreeMap<String, Vec<i64>> = model
                .named_parameters()
                .into_iter()
                .map(|(n, t)| (n, t.size()))
                .collect();
            assert_eq!(vars, parameter_shapes(&cfg), "{}", cfg.family);
            let total: i64 = vars.values().map(|s| s.iter().product::<i64>()).sum();
            assert_eq!(model.num_parameters(), total);
            assert!(
                model
                    .named_parameters()
                    .values()
                    .all(|t| !t.requires_grad()),
                "frozen"
            );
        }
    }

    #[test]
    fn layer_parameters_and_linears_are_named() {
        let mut model = Model::new(&configs()[1], Device::Cpu, Kind::Float).unwrap();
        let names: Vec<String> = model.layer_parameters(1).into_keys().collect();
        assert_eq!(names.len(), 16);
        assert!(names.iter().all(|n| n.starts_with("model.layers.1.")));
        let linears: Vec<String> = model.linears_mut().into_iter().map(|(n, _)| n).collect();
        assert_eq!(linears.len(), 2 * 7 + 1);
        assert_eq!(linears[0], "model.layers.0.self_attn.q_proj");
        for name in &linears {
            assert!(
                model
                    .named_parameters()
                    .contains_key(&format!("{name}.weight")),
                "{name}"
            );
        }
    }

    #[test]
    fn tied_lm_head_shares_the_embedding() {
        let model = Model::new(&configs()[0], Device::Cpu, Kind::Float).unwrap();
        assert!(!model.named_parameters().contains_key("lm_head.weight"));
        let hidden = Tensor::randn([1, 2, 16], (Kind::Float, Device::Cpu));
        let want = hidden.matmul(&model.embed_tokens.weight().tr());
        assert!(model.logits(&hidden).allclose(&want, 1e-5, 1e-5, false));
    }

    #[test]
    fn extra_tensor_policy() {
        let tied = &configs()[0];
        assert!(extra_tensor(tied, "lm_head.weight", &[50, 16]).unwrap());
        let e = extra_tensor(tied, "lm_head.weight", &[16, 50])
            .unwrap_err()
            .to_string();
        assert!(e.contains("[16, 50]") && e.contains("[50, 16]"), "{e}");
        assert!(!extra_tensor(&configs()[1], "lm_head.weight", &[50, 16]).unwrap());
        assert!(extra_tensor(tied, "model.layers.0.self_attn.rotary_emb.inv_freq", &[2]).unwrap());
        assert!(!extra_tensor(tied, "model.layers.0.self_attn.extra.weight", &[2]).unwrap());
    }

    #[test]
    fn mixers_are_replaceable_and_stale_caches_refused() {
        struct Zero;
        impl Mixer for Zero {
            fn forward(&self, input: &MixerInput, _: Option<&mut MixerState>) -> Result<Tensor> {
                Ok(input.q.zeros_like())
            }
            fn new_state(&self, _: i64) -> Result<MixerState> {
                Ok(Box::new(()))
            }
            fn name(&self) -> String {
                "zero".into()
            }
        }
        let mut model = Model::new(&configs()[2], Device::Cpu, Kind::Float).unwrap();
        assert_eq!(model.mixer(0).name(), "softmax-sw3");
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
        let before = model.forward(&ids, None).unwrap();
        let old = model.set_mixer(1, Box::new(Zero)).unwrap();
        assert_eq!(old.name(), "softmax-sw3");
        assert_eq!(model.mixer(1).name(), "zero");
        let after = model.forward(&ids, None).unwrap();
        assert!(!after.allclose(&before, 1e-3, 1e-3, false));

        let mut stale = model.new_cache(1).unwrap();
        model.set_mixer(1, old).unwrap();
        assert!(model.forward(&ids, None).unwrap().equal(&before));
        let e = format!("{:#}", model.forward(&ids, Some(&mut stale)).unwrap_err());
        assert!(e.contains("layer 1") && e.contains("another mixer"), "{e}");
        let e = model
            .set_mixer(2, Box::new(Zero))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("layer 2 does not exist"), "{e}");
    }

    #[test]
    fn bad_ids_and_positions_are_errors() {
        let model = Model::new(&configs()[3], Device::Cpu, Kind::Float).unwrap();
        let e = model
            .forward(&Tensor::zeros([1, 3], (Kind::Float, Device::Cpu)), None)
            .unwrap_err();
        assert!(e.to_string().contains("int64"), "{e}");
        let e = model
            .forward(&Tensor::zeros([1, 33], (Kind::Int64, Device::Cpu)), None)
            .unwrap_err();
        assert!(
            e.to_string().contains("max_position_embeddings = 32"),
            "{e}"
        );
    }

    #[test]
    fn bf16_model_computes_in_bf16_and_returns_f32() {
        let cfg = configs()[4].clone();
        let model = Model::new(&cfg, Device::Cpu, Kind::BFloat16).unwrap();
        assert!(model
            .named_parameters()
            .values()
            .all(|t| t.kind() == Kind::BFloat16));
        let ids = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
        let hidden = model.hidden_states(&ids, None).unwrap();
        assert_eq!(hidden.kind(), Kind::BFloat16);
        let logits = model.forward(&ids, None).unwrap();
        assert_eq!(
            (logits.kind(), logits.size()),
            (Kind::Float, vec![1, 3, 50])
        );
    }
}
