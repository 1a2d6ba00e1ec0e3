//! A converted layer's attention: the method a recipe names for it ([`AttentionConfig`]) and the
//! [`LinearizedMixer`] that runs it inside a linearize-models decoder. Full passes and prefill
//! use the chunked kernels; a one-token step with a non-empty state uses the recurrent form.
use crate::feature_map::{FeatureMap, FeatureMapConfig};
use crate::ops::gated_deltanet::{
    self, DeltaGates, GatedDeltaNetConfig, GatedDeltaNetState, QkActivation,
};
use crate::ops::gdn_window::{self, GdnWindowConfig, GdnWindowInputs, GdnWindowState};
use crate::ops::gla::{self, GlaConfig, GlaState};
use crate::ops::liger::{self, LigerConfig, LigerInputs, LigerState};
use crate::ops::linear_attn::{self, LinearAttnConfig, LinearState};
use crate::ops::lizard::{self, LizardConfig, LizardGates, LizardInputs, LizardState};
use crate::ops::lolcats::{self, LolcatsConfig, LolcatsInputs, LolcatsState, WindowFactors};
use crate::ops::swa::{self, SwaConfig, SwaState};
use crate::ops::window::WindowShape;
use anyhow::{bail, ensure, Context, Result};
use linearize_models::config::ModelConfig;
use linearize_models::mixer::{tensor_bytes, Mixer, MixerInput, MixerState, SoftmaxMixer};
use serde::{Deserialize, Serialize};
use std::fmt;
use tch::{nn, Device, Tensor};

/// The attention method of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The original softmax attention (the layer is not converted).
    Softmax,
    /// Normalised linear attention with a feature map (Hedgehog, T2R, 1+ELU, Based).
    Linear,
    /// LoLCATs: softmax over a local window plus linear attention before it, one normaliser.
    Lolcats,
    /// Softmax over a sliding window only.
    SlidingWindow,
    /// Liger's gated linear attention alone.
    LigerGla,
    /// Liger attention: 0.5 sliding-window softmax + 0.5 GLA.
    Liger,
    /// Gated DeltaNet: the delta rule with a learned decay and write strength per head and token.
    GatedDeltanet,
    /// Lizard: LoLCATs' window (and sinks) with linear terms decayed by a learned scalar gate per
    /// head and token.
    Lizard,
    /// Gated DeltaNet behind a sliding softmax window (and sinks): the window's softmax plus a
    /// learned scale times the delta-rule memory of the tokens that have left the window.
    GdnWindow,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Softmax => "softmax",
            Self::Linear => "linear",
            Self::Lolcats => "lolcats",
            Self::SlidingWindow => "sliding_window",
            Self::LigerGla => "liger_gla",
            Self::Liger => "liger",
            Self::GatedDeltanet => "gated_deltanet",
            Self::Lizard => "lizard",
            Self::GdnWindow => "gdn_window",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The attention of a converted layer as a recipe writes it, e.g.
/// `{method: lolcats, feature_map: {kind: hedgehog, feature_dim: 64}, window_size: 64}`.
/// Every field but `method` is optional; a field given for a method that does not use it is an
/// error ([`AttentionConfig::validate`]) rather than silently ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionConfig {
    /// `softmax`, `linear`, `lolcats`, `sliding_window`, `liger_gla`, `liger`, `gated_deltanet`,
    /// `lizard` or `gdn_window`.
    pub method: Method,
    /// `linear`, `lolcats`, `lizard`: the map φ applied to q and k after RoPE (a separate map, with its own
    /// parameters, for each). Default: Hedgehog with feature_dim 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_map: Option<FeatureMapConfig>,
    /// `lolcats`, `lizard`: `sw` (the last `window_size` tokens) or `tk` (terrace blocks).
    /// Default `sw`. (`gdn_window` has the sliding window only, and refuses the key.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_shape: Option<WindowShape>,
    /// `lolcats`, `lizard`, `sliding_window`, `liger`, `gdn_window`: tokens of the softmax
    /// window. Default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_size: Option<i64>,
    /// Every method but `softmax`: tokens per chunk of the chunked kernels (training and
    /// prefill). Default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_size: Option<i64>,
    /// `linear`: added to the normaliser. Default 1e-12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
    /// `liger_gla`, `liger`: log-gates are `logsigmoid(k) / gate_normalizer`; `lizard`:
    /// `logsigmoid(w·k̂ + b) / gate_normalizer` (a learned projection of the unit raw key).
    /// Default 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_normalizer: Option<f64>,
    /// `liger_gla`, `liger`: tokens per sub-chunk of the GLA kernel; must divide `chunk_size`.
    /// Default 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_chunk: Option<i64>,
    /// `linear`, `lolcats`, `liger_gla`, `liger`: run whole sequences (training, scoring) through
    /// the fused CUDA kernels where they apply (`linear`: bf16 or f16, head size 64 or 128,
    /// feature width 64, 128 or 256; `lolcats`: bf16, a window of whole 64-token chunks, no
    /// sinks; `liger_gla` and Liger's GLA half: bf16 or f16, head size 64 or 128). Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fused_kernels: Option<bool>,
    /// `lolcats`, `lizard`, `sliding_window`, `liger`, `gdn_window`: the first `sinks` tokens
    /// stay softmax keys of every query (StreamingLLM; `gdn_window` never writes them into its
    /// memory). Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sinks: Option<i64>,
    /// `gated_deltanet`, `gdn_window`: read the delta rule's q and k after RoPE (true) or before
    /// (false). Default false: the
    /// delta rule stores values under keys and overwrites by key similarity, which RoPE would make
    /// depend on position (the same key written at two positions would not overwrite itself),
    /// and recency is the decay gate's job; Gated DeltaNet has no RoPE. True keeps the teacher's
    /// relative-position pattern in q·k (exact in the recurrence: keys are rotated once, at their
    /// own position).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope: Option<bool>,
    /// `gated_deltanet`, `gdn_window`: the map on the delta rule's q and k before their L2 norm, `identity` or `silu` (the
    /// paper's). Default `identity`, which keeps the teacher's q·k directions for the untrained
    /// layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_activation: Option<QkActivation>,
    /// Every method but `softmax`: query heads (ascending) that keep the teacher's exact softmax
    /// attention (over the layer's own teacher window) inside the converted layer, a head-level
    /// hybrid; the decoding cache holds keys and values only for the key/value heads they read.
    /// Usually written by the `conversion.softmax_heads` selector. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub softmax_heads: Option<Vec<usize>>,
}

const DEFAULT_FEATURE_MAP: FeatureMapConfig = FeatureMapConfig::Hedgehog {
    feature_dim: 64,
    half_space: false,
    bias: false,
    init: crate::feature_map::FeatureMapInit::Kaiming,
};
const DEFAULT_WINDOW: i64 = 64;
const DEFAULT_CHUNK: i64 = 64;
const DEFAULT_EPS: f64 = 1e-12;
const DEFAULT_GATE_NORMALIZER: f64 = 16.0;
const DEFAULT_SUB_CHUNK: i64 = 16;

/// The optional fields of [`AttentionConfig`] and the methods that use each.
const FIELD_USERS: [(&str, &[Method]); 12] = [
    (
        "feature_map",
        &[Method::Linear, Method::Lolcats, Method::Lizard],
    ),
    ("window_shape", &[Method::Lolcats, Method::Lizard]),
    (
        "window_size",
        &[
            Method::Lolcats,
            Method::Lizard,
            Method::SlidingWindow,
            Method::Liger,
            Method::GdnWindow,
        ],
    ),
    (
        "chunk_size",
        &[
            Method::Linear,
            Method::Lolcats,
            Method::SlidingWindow,
            Method::LigerGla,
            Method::Liger,
            Method::GatedDeltanet,
            Method::Lizard,
            Method::GdnWindow,
        ],
    ),
    ("eps", &[Method::Linear]),
    (
        "gate_normalizer",
        &[Method::LigerGla, Method::Liger, Method::Lizard],
    ),
    ("sub_chunk", &[Method::LigerGla, Method::Liger]),
    (
        "fused_kernels",
        &[
            Method::Linear,
            Method::Lolcats,
            Method::LigerGla,
            Method::Liger,
        ],
    ),
    (
        "sinks",
        &[
            Method::Lolcats,
            Method::Lizard,
            Method::SlidingWindow,
            Method::Liger,
            Method::GdnWindow,
        ],
    ),
    ("rope", &[Method::GatedDeltanet, Method::GdnWindow]),
    ("qk_activation", &[Method::GatedDeltanet, Method::GdnWindow]),
    (
        "softmax_heads",
        &[
            Method::Linear,
            Method::Lolcats,
            Method::SlidingWindow,
            Method::LigerGla,
            Method::Liger,
            Method::GatedDeltanet,
            Method::Lizard,
            Method::GdnWindow,
        ],
    ),
];

impl AttentionConfig {
    /// `method` with every other field at its default.
    pub fn new(method: Method) -> Self {
        Self {
            method,
            feature_map: None,
            window_shape: None,
            window_size: None,
            chunk_size: None,
            eps: None,
            gate_normalizer: None,
            sub_chunk: None,
            fused_kernels: None,
            sinks: None,
            rope: None,
            qk_activation: None,
            softmax_heads: None,
        }
    }

    /// Checks that every given field is used by the method and in range; the error names the
    /// field.
    pub fn validate(&self) -> Result<()> {
        for (field, users) in FIELD_USERS {
            if self.is_set(field) && !users.contains(&self.method) {
                let users: Vec<&str> = users.iter().map(|m| m.as_str()).collect();
                bail!(
                    "attention.{field} is not used by method `{}` (only by {})",
                    self.method,
                    users.join(", ")
                );
            }
        }
        if let Some(fm) = &self.feature_map {
            fm.validate().context("attention.feature_map")?;
        }
        for (field, value) in [
            ("window_size", self.window_size),
            ("chunk_size", self.chunk_size),
            ("sub_chunk", self.sub_chunk),
        ] {
            if let Some(value) = value {
                ensure!(value >= 1, "attention.{field} must be >= 1, got {value}");
            }
        }
        if let Some(sinks) = self.sinks {
            ensure!(sinks >= 0, "attention.sinks must be >= 0, got {sinks}");
        }
        if let Some(eps) = self.eps {
            ensure!(
                eps.is_finite() && eps >= 0.0,
                "attention.eps must be >= 0, got {eps}"
            );
        }
        if let Some(g) = self.gate_normalizer {
            ensure!(
                g.is_finite() && g > 0.0,
                "attention.gate_normalizer must be > 0, got {g}"
            );
        }
        if let Some(heads) = &self.softmax_heads {
            ensure!(
                !heads.is_empty(),
                "attention.softmax_heads is empty (leave it out for no softmax head)"
            );
            ensure!(
                heads.windows(2).all(|w| w[0] < w[1]),
                "attention.softmax_heads must list distinct query heads in ascending order, got \
                 {heads:?}"
            );
        }
        if matches!(self.method, Method::LigerGla | Method::Liger) {
            let (chunk, sub) = (self.chunk(), self.sub_chunk.unwrap_or(DEFAULT_SUB_CHUNK));
            ensure!(
                chunk % sub == 0,
                "attention.sub_chunk ({sub}) must divide attention.chunk_size ({chunk})"
            );
        }
        Ok(())
    }

    fn is_set(&self, field: &str) -> bool {
        match field {
            "feature_map" => self.feature_map.is_some(),
            "window_shape" => self.window_shape.is_some(),
            "window_size" => self.window_size.is_some(),
            "chunk_size" => self.chunk_size.is_some(),
            "eps" => self.eps.is_some(),
            "gate_normalizer" => self.gate_normalizer.is_some(),
            "sub_chunk" => self.sub_chunk.is_some(),
            "fused_kernels" => self.fused_kernels.is_some(),
            "sinks" => self.sinks.is_some(),
            "rope" => self.rope.is_some(),
            "qk_activation" => self.qk_activation.is_some(),
            "softmax_heads" => self.softmax_heads.is_some(),
            other => unreachable!("no attention field {other}"),
        }
    }

    /// The config with every field the method uses filled with its value or default, and the
    /// others absent (what `recipe.resolved.yaml` shows).
    pub fn resolved(&self) -> Self {
        let uses = |field: &str| {
            FIELD_USERS
                .iter()
                .any(|(f, users)| *f == field && users.contains(&self.method))
        };
        Self {
            method: self.method,
            feature_map: uses("feature_map").then(|| self.feature_map()),
            window_shape: uses("window_shape")
                .then(|| self.window_shape.unwrap_or(WindowShape::Sw)),
            window_size: uses("window_size").then(|| self.window()),
            chunk_size: uses("chunk_size").then(|| self.chunk()),
            eps: uses("eps").then(|| self.eps.unwrap_or(DEFAULT_EPS)),
            gate_normalizer: uses("gate_normalizer")
                .then(|| self.gate_normalizer.unwrap_or(DEFAULT_GATE_NORMALIZER)),
            sub_chunk: uses("sub_chunk").then(|| self.sub_chunk.unwrap_or(DEFAULT_SUB_CHUNK)),
            fused_kernels: uses("fused_kernels").then(|| self.fused_kernels.unwrap_or(true)),
            sinks: uses("sinks").then(|| self.sinks()),
            rope: uses("rope").then(|| self.rope.unwrap_or(false)),
            qk_activation: uses("qk_activation").then(|| self.qk_activation.unwrap_or_default()),
            // No default to fill: without the key no head is softmax.
            softmax_heads: self.softmax_heads.clone(),
        }
    }

    /// The feature map (or its default).
    pub fn feature_map(&self) -> FeatureMapConfig {
        self.feature_map.unwrap_or(DEFAULT_FEATURE_MAP)
    }

    fn window(&self) -> i64 {
        self.window_size.unwrap_or(DEFAULT_WINDOW)
    }

    fn chunk(&self) -> i64 {
        self.chunk_size.unwrap_or(DEFAULT_CHUNK)
    }

    fn sinks(&self) -> i64 {
        self.sinks.unwrap_or(0)
    }

    pub fn linear_attn_config(&self) -> LinearAttnConfig {
        LinearAttnConfig {
            chunk_size: self.chunk(),
            eps: self.eps.unwrap_or(DEFAULT_EPS),
            fused: self.fused_kernels.unwrap_or(true),
        }
    }

    pub fn lolcats_config(&self) -> LolcatsConfig {
        LolcatsConfig {
            window_shape: self.window_shape.unwrap_or(WindowShape::Sw),
            window_size: self.window(),
            chunk_size: self.chunk(),
            fused: self.fused_kernels.unwrap_or(true),
            sinks: self.sinks(),
        }
    }

    pub fn lizard_config(&self) -> LizardConfig {
        LizardConfig {
            window_shape: self.window_shape.unwrap_or(WindowShape::Sw),
            window_size: self.window(),
            chunk_size: self.chunk(),
            sinks: self.sinks(),
        }
    }

    pub fn swa_config(&self) -> SwaConfig {
        SwaConfig {
            window_size: self.window(),
            chunk_size: self.chunk(),
            sinks: self.sinks(),
        }
    }

    pub fn gla_config(&self) -> GlaConfig {
        GlaConfig {
            chunk_size: self.chunk(),
            sub_chunk: self.sub_chunk.unwrap_or(DEFAULT_SUB_CHUNK),
            fused: self.fused_kernels.unwrap_or(true),
        }
    }

    pub fn liger_config(&self) -> LigerConfig {
        LigerConfig {
            window_size: self.window(),
            gate_normalizer: self.gate_normalizer.unwrap_or(DEFAULT_GATE_NORMALIZER),
            chunk_size: self.chunk(),
            sub_chunk: self.sub_chunk.unwrap_or(DEFAULT_SUB_CHUNK),
            sinks: self.sinks(),
            fused: self.fused_kernels.unwrap_or(true),
        }
    }

    pub fn gated_deltanet_config(&self) -> GatedDeltaNetConfig {
        GatedDeltaNetConfig {
            chunk_size: self.chunk(),
        }
    }

    pub fn gdn_window_config(&self) -> GdnWindowConfig {
        GdnWindowConfig {
            window_size: self.window(),
            chunk_size: self.chunk(),
            sinks: self.sinks(),
        }
    }

    /// Short name for reports, e.g. `lolcats-sw64+hedgehog64`, `linear+t2r32`, `liger-sw64`,
    /// `sliding_window-64+sinks4`.
    pub fn name(&self) -> String {
        let mut name = self.base_name();
        if self.sinks() > 0 {
            name = format!("{name}+sinks{}", self.sinks());
        }
        if let Some(heads) = &self.softmax_heads {
            name = format!("{name}+softmax_heads{}", heads.len());
        }
        name
    }

    fn base_name(&self) -> String {
        let fm = || feature_map_name(&self.feature_map());
        match self.method {
            Method::Softmax => "softmax".into(),
            Method::Linear => format!("linear+{}", fm()),
            Method::Lolcats => {
                let c = self.lolcats_config();
                format!(
                    "lolcats-{}{}+{}",
                    c.window_shape.as_str(),
                    c.window_size,
                    fm()
                )
            }
            Method::Lizard => {
                let c = self.lizard_config();
                format!(
                    "lizard-{}{}+{}",
                    c.window_shape.as_str(),
                    c.window_size,
                    fm()
                )
            }
            Method::SlidingWindow => format!("sliding_window-{}", self.window()),
            Method::LigerGla => "liger_gla".into(),
            Method::Liger => format!("liger-sw{}", self.window()),
            Method::GatedDeltanet => format!("gated_deltanet{}", self.delta_suffix()),
            Method::GdnWindow => format!("gdn_window-sw{}{}", self.window(), self.delta_suffix()),
        }
    }

    /// `+rope` and `+silu` of the delta-rule methods, where set.
    fn delta_suffix(&self) -> String {
        let rope = if self.rope.unwrap_or(false) {
            "+rope"
        } else {
            ""
        };
        match self.qk_activation.unwrap_or_default() {
            QkActivation::Identity => rope.into(),
            act => format!("{rope}+{}", act.as_str()),
        }
    }
}

/// `hedgehog64`, `hedgehog64-half`, `t2r32`, `elu`, `based`, `softmax_dim`.
fn feature_map_name(cfg: &FeatureMapConfig) -> String {
    match *cfg {
        FeatureMapConfig::Hedgehog {
            feature_dim,
            half_space,
            ..
        } => {
            let half = if half_space { "-half" } else { "" };
            format!("hedgehog{feature_dim}{half}")
        }
        FeatureMapConfig::T2r { feature_dim, .. } => format!("t2r{feature_dim}"),
        FeatureMapConfig::Elu => "elu".into(),
        FeatureMapConfig::Based => "based".into(),
        FeatureMapConfig::SoftmaxDim => "softmax_dim".into(),
    }
}

/// The attention geometry of a model's layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    /// The teacher's own softmax window (Mistral's `sliding_window`), kept by the `softmax`
    /// method so that an unconverted layer computes exactly what the original did.
    pub sliding_window: Option<i64>,
}

impl LayerShape {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            sliding_window: cfg.sliding_window,
        }
    }
}

/// The method-specific parts of a [`LinearizedMixer`].
enum Kernel {
    Softmax(SoftmaxMixer),
    Linear {
        feature_map_q: FeatureMap,
        feature_map_k: FeatureMap,
        cfg: LinearAttnConfig,
    },
    Lolcats {
        feature_map_q: FeatureMap,
        feature_map_k: FeatureMap,
        window_factors: WindowFactors,
        cfg: LolcatsConfig,
        /// False in [`LinearizedMixer::window_only`]: φ(q) is zero, so the linear terms vanish.
        linear: bool,
    },
    SlidingWindow(SwaConfig),
    LigerGla {
        cfg: GlaConfig,
        gate_normalizer: f64,
    },
    Liger(LigerConfig),
    GatedDeltanet {
        gates: DeltaGates,
        cfg: GatedDeltaNetConfig,
        rope: bool,
        activation: QkActivation,
    },
    Lizard {
        feature_map_q: FeatureMap,
        feature_map_k: FeatureMap,
        window_factors: WindowFactors,
        gates: LizardGates,
        cfg: LizardConfig,
    },
    GdnWindow {
        gates: DeltaGates,
        /// λ (h): the scale of the delta term, per head.
        delta_scale: Tensor,
        cfg: GdnWindowConfig,
        rope: bool,
        activation: QkActivation,
    },
}

/// The attention core of a converted layer. Its parameters (feature maps `feature_map_q`,
/// `feature_map_k`, LoLCATs' and Lizard's `window_factors`, Lizard's `gate_proj`, the delta-rule
/// gates and `gdn_window`'s `delta_scale`) live under the `nn::Path` it was built at;
/// [`LinearizedMixer::shallow_clone`] makes a second mixer over the same parameter tensors.
pub struct LinearizedMixer {
    kernel: Kernel,
    config: AttentionConfig,
    shape: LayerShape,
    /// The query heads that keep the teacher's softmax (`softmax_heads`), if any.
    softmax_heads: Option<SoftmaxHeads>,
}

/// The softmax part of a head-level hybrid. The teacher's softmax runs on the chosen heads'
/// key/value heads and on every query head that reads them, so that GQA stays intact and the KV
/// cache holds exactly those key/value heads; the outputs of the query heads that were not chosen
/// are dropped (at most h/h_kv - 1 extra query heads per key/value head, no extra cache).
#[derive(Clone, Debug)]
struct SoftmaxHeads {
    /// The chosen query heads, ascending.
    heads: Vec<i64>,
    /// The key/value heads they read, ascending.
    kv_heads: Vec<i64>,
    /// Every query head of `kv_heads`, in order (h/h_kv per key/value head).
    group_heads: Vec<i64>,
    /// Where each of `heads` is in `group_heads`.
    picked: Vec<i64>,
    teacher: SoftmaxMixer,
}

impl SoftmaxHeads {
    fn new(heads: &[usize], shape: &LayerShape) -> Result<Self> {
        let group = shape.num_heads / shape.num_kv_heads;
        let heads: Vec<i64> = heads.iter().map(|&h| h as i64).collect();
        if let Some(&bad) = heads.iter().find(|&&h| h >= shape.num_heads) {
            bail!(
                "attention.softmax_heads: query head {bad} does not exist (the layer has {} \
                 heads, 0..{})",
                shape.num_heads,
                shape.num_heads - 1
            );
        }
        let mut kv_heads: Vec<i64> = heads.iter().map(|h| h / group).collect();
        kv_heads.dedup(); // `heads` ascend, so their key/value heads do too
        let group_heads: Vec<i64> = kv_heads
            .iter()
            .flat_map(|kv| kv * group..(kv + 1) * group)
            .collect();
        // Query head h is row h % g of its key/value head's block of g rows.
        let picked = heads
            .iter()
            .map(|h| {
                let block = kv_heads.partition_point(|&kv| kv < h / group) as i64;
                block * group + h % group
            })
            .collect();
        Ok(Self {
            heads,
            kv_heads,
            group_heads,
            picked,
            teacher: SoftmaxMixer::new(shape.sliding_window),
        })
    }

    /// The chosen heads' softmax output (b, n, L, d), continuing from `cache` when given.
    fn forward(&self, x: &MixerInput, cache: Option<&mut MixerState>) -> Result<Tensor> {
        let device = x.q.device();
        let index = |list: &[i64]| Tensor::from_slice(list).to_device(device);
        let kv = index(&self.kv_heads);
        let q = x.q.index_select(1, &index(&self.group_heads)); // (b, m*g, L, d)
        let (k, v) = (x.k.index_select(1, &kv), x.v.index_select(1, &kv)); // (b, m, L, d)
        let sub = MixerInput {
            q: &q,
            k: &k,
            v: &v,
            q_raw: &q,
            k_raw: &k,
            offset: x.offset,
            position: x.position,
        };
        let y = self.teacher.forward(&sub, cache)?; // (b, m*g, L, d)
        Ok(y.index_select(1, &index(&self.picked))) // (b, n, L, d)
    }

    /// `linear` (b, h, L, d) with the chosen heads' rows replaced by `softmax` (b, n, L, d).
    fn merge(&self, linear: &Tensor, softmax: &Tensor) -> Tensor {
        let heads = Tensor::from_slice(&self.heads).to_device(linear.device());
        linear.index_copy(1, &heads, &softmax.to_kind(linear.kind()))
    }
}

/// Decoding state of a [`LinearizedMixer`] (other than softmax, which uses the teacher's KV
/// cache): the kernel's state once a token has been seen, and the KV cache of the softmax heads
/// of a head-level hybrid. The kernel runs on every head (each head's output depends only on its
/// own q, k, v, so the softmax heads' linear outputs are simply dropped): its state is of a fixed
/// size, the growing KV cache holds the softmax heads' key/value heads only.
struct LinearizedState {
    batch: i64,
    seen: i64,
    kernel: Option<KernelState>,
    softmax_heads: Option<MixerState>,
}

enum KernelState {
    Linear(LinearState),
    Lolcats(LolcatsState),
    SlidingWindow(SwaState),
    LigerGla(GlaState),
    Liger(LigerState),
    GatedDeltanet(GatedDeltaNetState),
    Lizard(LizardState),
    GdnWindow(GdnWindowState),
}

impl KernelState {
    fn map_tensors(&self, f: &dyn Fn(&Tensor) -> Tensor) -> Self {
        match self {
            Self::Linear(s) => Self::Linear(s.map_tensors(f)),
            Self::Lolcats(s) => Self::Lolcats(s.map_tensors(f)),
            Self::SlidingWindow(s) => Self::SlidingWindow(s.map_tensors(f)),
            Self::LigerGla(s) => Self::LigerGla(s.map_tensors(f)),
            Self::Liger(s) => Self::Liger(s.map_tensors(f)),
            Self::GatedDeltanet(s) => Self::GatedDeltanet(s.map_tensors(f)),
            Self::Lizard(s) => Self::Lizard(s.map_tensors(f)),
            Self::GdnWindow(s) => Self::GdnWindow(s.map_tensors(f)),
        }
    }

    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            Self::Linear(s) => s.tensors(),
            Self::Lolcats(s) => s.tensors(),
            Self::SlidingWindow(s) => s.tensors(),
            Self::LigerGla(s) => s.tensors(),
            Self::Liger(s) => s.tensors(),
            Self::GatedDeltanet(s) => s.tensors(),
            Self::Lizard(s) => s.tensors(),
            Self::GdnWindow(s) => s.tensors(),
        }
    }
}

impl LinearizedMixer {
    /// Builds the mixer for a layer of `shape`, creating its trainable parameters under `path`
    /// (e.g. `student.root() / "model" / "layers" / i / "self_attn"`).
    pub fn new(path: &nn::Path, shape: &LayerShape, config: &AttentionConfig) -> Result<Self> {
        config.validate()?;
        ensure!(
            shape.num_heads >= 1
                && shape.num_kv_heads >= 1
                && shape.head_dim >= 1
                && shape.num_heads % shape.num_kv_heads == 0,
            "attention needs heads >= 1 with key/value heads dividing them, got {} query heads, \
             {} key/value heads of dim {}",
            shape.num_heads,
            shape.num_kv_heads,
            shape.head_dim
        );
        let maps = || -> Result<(FeatureMap, FeatureMap)> {
            let fm = config.feature_map();
            let map = |name: &str| {
                FeatureMap::new(&path.sub(name), shape.num_heads, shape.head_dim, &fm)
                    .with_context(|| format!("building {name}"))
            };
            Ok((map("feature_map_q")?, map("feature_map_k")?))
        };
        let kernel = match config.method {
            Method::Softmax => Kernel::Softmax(SoftmaxMixer::new(shape.sliding_window)),
            Method::Linear => {
                let (feature_map_q, feature_map_k) = maps()?;
                Kernel::Linear {
                    feature_map_q,
                    feature_map_k,
                    cfg: config.linear_attn_config(),
                }
            }
            Method::Lolcats => {
                let (feature_map_q, feature_map_k) = maps()?;
                Kernel::Lolcats {
                    feature_map_q,
                    feature_map_k,
                    window_factors: WindowFactors::new(path, shape.num_heads),
                    cfg: config.lolcats_config(),
                    linear: true,
                }
            }
            Method::SlidingWindow => Kernel::SlidingWindow(config.swa_config()),
            Method::LigerGla => Kernel::LigerGla {
                cfg: config.gla_config(),
                gate_normalizer: config.liger_config().gate_normalizer,
            },
            Method::Liger => Kernel::Liger(config.liger_config()),
            Method::GatedDeltanet => {
                let resolved = config.resolved();
                let width = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim;
                Kernel::GatedDeltanet {
                    gates: DeltaGates::new(path, shape.num_heads, width),
                    cfg: config.gated_deltanet_config(),
                    rope: resolved.rope.unwrap_or(false),
                    activation: resolved.qk_activation.unwrap_or_default(),
                }
            }
            Method::Lizard => {
                let (feature_map_q, feature_map_k) = maps()?;
                let normalizer = config.gate_normalizer.unwrap_or(DEFAULT_GATE_NORMALIZER);
                Kernel::Lizard {
                    feature_map_q,
                    feature_map_k,
                    window_factors: WindowFactors::new(path, shape.num_heads),
                    gates: LizardGates::new(path, shape.num_heads, shape.head_dim, normalizer),
                    cfg: config.lizard_config(),
                }
            }
            Method::GdnWindow => {
                let resolved = config.resolved();
                let width = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim;
                Kernel::GdnWindow {
                    gates: DeltaGates::new(path, shape.num_heads, width),
                    delta_scale: path.var(
                        "delta_scale",
                        &[shape.num_heads],
                        nn::Init::Const(gdn_window::DELTA_SCALE_INIT),
                    ),
                    cfg: config.gdn_window_config(),
                    rope: resolved.rope.unwrap_or(false),
                    activation: resolved.qk_activation.unwrap_or_default(),
                }
            }
        };
        let softmax_heads = match &config.softmax_heads {
            Some(heads) => Some(SoftmaxHeads::new(heads, shape)?),
            None => None,
        };
        Ok(Self {
            kernel,
            config: config.resolved(),
            shape: *shape,
            softmax_heads,
        })
    }

    /// The mixer over the same parameters with `heads` (ascending query heads; none: no head)
    /// keeping the teacher's softmax attention: a head-level hybrid, or the plain layer back.
    pub fn with_softmax_heads(&self, heads: Option<Vec<usize>>) -> Result<Self> {
        ensure!(
            self.method() != Method::Softmax,
            "a softmax layer has no converted heads to choose from"
        );
        let mut mixer = self.shallow_clone();
        mixer.config.softmax_heads = heads;
        mixer.config.validate()?;
        mixer.softmax_heads = match &mixer.config.softmax_heads {
            Some(heads) => Some(SoftmaxHeads::new(heads, &self.shape)?),
            None => None,
        };
        Ok(mixer)
    }

    /// The query heads that keep the teacher's softmax, ascending (none for a plain layer).
    pub fn softmax_heads(&self) -> &[usize] {
        self.config.softmax_heads.as_deref().unwrap_or(&[])
    }

    /// The query heads that run the layer's method, ascending.
    pub fn linear_heads(&self) -> Vec<usize> {
        let softmax = self.softmax_heads();
        (0..self.shape.num_heads as usize)
            .filter(|h| !softmax.contains(h))
            .collect()
    }

    /// The layer's geometry (its teacher window included).
    pub fn shape(&self) -> &LayerShape {
        &self.shape
    }

    /// A mixer over the same parameter tensors (gradients of both land in the same place).
    pub fn shallow_clone(&self) -> Self {
        let kernel = match &self.kernel {
            Kernel::Softmax(m) => Kernel::Softmax(*m),
            Kernel::Linear {
                feature_map_q,
                feature_map_k,
                cfg,
            } => Kernel::Linear {
                feature_map_q: feature_map_q.shallow_clone(),
                feature_map_k: feature_map_k.shallow_clone(),
                cfg: *cfg,
            },
            Kernel::Lolcats {
                feature_map_q,
                feature_map_k,
                window_factors,
                cfg,
                linear,
            } => Kernel::Lolcats {
                feature_map_q: feature_map_q.shallow_clone(),
                feature_map_k: feature_map_k.shallow_clone(),
                window_factors: WindowFactors {
                    logits: window_factors.logits.shallow_clone(),
                },
                cfg: *cfg,
                linear: *linear,
            },
            Kernel::SlidingWindow(cfg) => Kernel::SlidingWindow(*cfg),
            Kernel::LigerGla {
                cfg,
                gate_normalizer,
            } => Kernel::LigerGla {
                cfg: *cfg,
                gate_normalizer: *gate_normalizer,
            },
            Kernel::Liger(cfg) => Kernel::Liger(*cfg),
            Kernel::GatedDeltanet {
                gates,
                cfg,
                rope,
                activation,
            } => Kernel::GatedDeltanet {
                gates: gates.shallow_clone(),
                cfg: *cfg,
                rope: *rope,
                activation: *activation,
            },
            Kernel::Lizard {
                feature_map_q,
                feature_map_k,
                window_factors,
                gates,
                cfg,
            } => Kernel::Lizard {
                feature_map_q: feature_map_q.shallow_clone(),
                feature_map_k: feature_map_k.shallow_clone(),
                window_factors: WindowFactors {
                    logits: window_factors.logits.shallow_clone(),
                },
                gates: gates.shallow_clone(),
                cfg: *cfg,
            },
            Kernel::GdnWindow {
                gates,
                delta_scale,
                cfg,
                rope,
                activation,
            } => Kernel::GdnWindow {
                gates: gates.shallow_clone(),
                delta_scale: delta_scale.shallow_clone(),
                cfg: *cfg,
                rope: *rope,
                activation: *activation,
            },
        };
        Self {
            kernel,
            config: self.config.clone(),
            shape: self.shape,
            softmax_heads: self.softmax_heads.clone(),
        }
    }

    /// The mixer with its linear part switched off, over the same parameters: the ablation that
    /// shows how much the linear (recurrent) path contributes, which trained hybrids can learn
    /// to bypass. LoLCATs keeps its window softmax alone (with φ(q) = 0 the linear terms leave
    /// numerator and normaliser, and γ cancels), and so does Lizard (its gates only scale the
    /// linear terms); Liger keeps its sliding-window half at full
    /// weight, and `gdn_window` its window-and-sinks softmax (the delta term is added to it);
    /// softmax and sliding-window layers are unchanged. `None` for the methods with no
    /// window (`linear`, `liger_gla`, `gated_deltanet`).
    pub fn window_only(&self) -> Option<Self> {
        let mut mixer = self.shallow_clone();
        match &mut mixer.kernel {
            Kernel::Lolcats { linear, .. } => *linear = false,
            Kernel::Liger(cfg) => {
                mixer.config = AttentionConfig {
                    window_size: Some(cfg.window_size),
                    chunk_size: Some(cfg.chunk_size),
                    sinks: Some(cfg.sinks),
                    softmax_heads: mixer.config.softmax_heads.clone(),
                    ..AttentionConfig::new(Method::SlidingWindow)
                }
                .resolved();
                mixer.kernel = Kernel::SlidingWindow(cfg.swa_config());
            }
            Kernel::GdnWindow { cfg, .. } => {
                mixer.config = AttentionConfig {
                    window_size: Some(cfg.window_size),
                    chunk_size: Some(cfg.chunk_size),
                    sinks: Some(cfg.sinks),
                    softmax_heads: mixer.config.softmax_heads.clone(),
                    ..AttentionConfig::new(Method::SlidingWindow)
                }
                .resolved();
                mixer.kernel = Kernel::SlidingWindow(cfg.swa());
            }
            Kernel::Lizard {
                feature_map_q,
                feature_map_k,
                window_factors,
                cfg,
                ..
            } => {
                // With φ(q) = 0 the decayed linear terms vanish as LoLCATs' do: what is left is
                // LoLCATs' window alone, over the same window factors.
                mixer.kernel = Kernel::Lolcats {
                    feature_map_q: feature_map_q.shallow_clone(),
                    feature_map_k: feature_map_k.shallow_clone(),
                    window_factors: WindowFactors {
                        logits: window_factors.logits.shallow_clone(),
                    },
                    cfg: LolcatsConfig {
                        window_shape: cfg.window_shape,
                        window_size: cfg.window_size,
                        chunk_size: cfg.chunk_size,
                        fused: true,
                        sinks: cfg.sinks,
                    },
                    linear: false,
                };
            }
            Kernel::Softmax(_) | Kernel::SlidingWindow(_) => {}
            Kernel::Linear { .. } | Kernel::LigerGla { .. } | Kernel::GatedDeltanet { .. } => {
                return None
            }
        }
        Some(mixer)
    }

    /// The resolved config this mixer runs.
    pub fn config(&self) -> &AttentionConfig {
        &self.config
    }

    pub fn method(&self) -> Method {
        self.config.method
    }

    /// `(feature_map_q, feature_map_k)` of the `linear`, `lolcats` and `lizard` methods.
    pub fn feature_maps(&self) -> Option<(&FeatureMap, &FeatureMap)> {
        match &self.kernel {
            Kernel::Linear {
                feature_map_q,
                feature_map_k,
                ..
            }
            | Kernel::Lolcats {
                feature_map_q,
                feature_map_k,
                ..
            }
            | Kernel::Lizard {
                feature_map_q,
                feature_map_k,
                ..
            } => Some((feature_map_q, feature_map_k)),
            _ => None,
        }
    }

    /// The chunked form's output (b, h, L, d) from the empty state, for whole sequences
    /// (training, scoring): kernels that can skip building the final state do.
    fn output(&self, x: &MixerInput) -> Result<Tensor> {
        match &self.kernel {
            Kernel::Linear {
                feature_map_q,
                feature_map_k,
                cfg,
            } => {
                let phi_q = feature_map_q.forward(x.q)?; // (b, h, L, f)
                let phi_k = feature_map_k.forward(x.k)?; // (b, h, L, f), GQA heads repeated
                let _range = linearize_profile::range("attention kernel");
                Ok(linear_attn::chunked_output(&phi_q, &phi_k, x.v, cfg)?)
            }
            Kernel::Lolcats {
                feature_map_q,
                feature_map_k,
                window_factors,
                cfg,
                linear,
            } => {
                let phi_q = lolcats_phi_q(feature_map_q, x, *linear)?;
                let phi_k = feature_map_k.forward(x.k)?;
                let inputs = lolcats_inputs(x, &phi_q, &phi_k, window_factors);
                let _range = linearize_profile::range("attention kernel");
                Ok(lolcats::chunked_output(&inputs, cfg)?)
            }
            Kernel::Lizard {
                feature_map_q,
                feature_map_k,
                window_factors,
                gates,
                cfg,
            } => {
                let f = LizardFeatures::new(x, feature_map_q, feature_map_k, gates)?;
                let _range = linearize_profile::range("attention kernel");
                Ok(lizard::chunked_output(&f.inputs(x, window_factors), cfg)?)
            }
            Kernel::LigerGla {
                cfg,
                gate_normalizer,
            } => {
                let (q, k, g) = liger::gla_inputs(x.q_raw, x.k_raw, *gate_normalizer)?;
                let _range = linearize_profile::range("attention kernel");
                Ok(gla::chunked_output(&q, &k, x.v, &g, cfg)?)
            }
            Kernel::Liger(cfg) => {
                let _range = linearize_profile::range("attention kernel");
                Ok(liger::chunked_output(&liger_inputs(x), cfg)?)
            }
            _ => Ok(self.chunked(x, None)?.0),
        }
    }

    /// Runs the kernel's chunked form from `state` (the empty state when `None`) and returns the
    /// output (b, h, L, d) with the final state.
    fn chunked(
        &self,
        x: &MixerInput,
        state: Option<&KernelState>,
    ) -> Result<(Tensor, KernelState)> {
        Ok(match &self.kernel {
            Kernel::Softmax(_) => unreachable!("softmax runs through the teacher mixer"),
            Kernel::Linear {
                feature_map_q,
                feature_map_k,
                cfg,
            } => {
                let state = match state {
                    Some(KernelState::Linear(s)) => Some(s),
                    _ => None,
                };
                let phi_q = feature_map_q.forward(x.q)?; // (b, h, L, f)
                let phi_k = feature_map_k.forward(x.k)?; // (b, h, L, f), GQA heads repeated
                let _range = linearize_profile::range("attention kernel");
                let (y, next) = linear_attn::chunked(&phi_q, &phi_k, x.v, cfg, state)?;
                (y, KernelState::Linear(next))
            }
            Kernel::Lolcats {
                feature_map_q,
                feature_map_k,
                window_factors,
                cfg,
                linear,
            } => {
                let state = match state {
                    Some(KernelState::Lolcats(s)) => Some(s),
                    _ => None,
                };
                let phi_q = lolcats_phi_q(feature_map_q, x, *linear)?;
                let phi_k = feature_map_k.forward(x.k)?;
                let inputs = lolcats_inputs(x, &phi_q, &phi_k, window_factors);
                let _range = linearize_profile::range("attention kernel");
                let (y, next) = lolcats::chunked(&inputs, cfg, state)?;
                (y, KernelState::Lolcats(next))
            }
            Kernel::SlidingWindow(cfg) => {
                let state = match state {
                    Some(KernelState::SlidingWindow(s)) => Some(s),
                    _ => None,
                };
                let _range = linearize_profile::range("attention kernel");
                let (y, next) = swa::chunked(x.q, x.k, x.v, cfg, state)?;
                (y, KernelState::SlidingWindow(next))
            }
            Kernel::LigerGla {
                cfg,
                gate_normalizer,
            } => {
                let state = match state {
                    Some(KernelState::LigerGla(s)) => Some(s),
                    _ => None,
                };
                let (q, k, g) = liger::gla_inputs(x.q_raw, x.k_raw, *gate_normalizer)?;
                let _range = linearize_profile::range("attention kernel");
                let (y, next) = gla::chunked(&q, &k, x.v, &g, cfg, state)?;
                (y, KernelState::LigerGla(next))
            }
            Kernel::Liger(cfg) => {
                let state = match state {
                    Some(KernelState::Liger(s)) => Some(s),
                    _ => None,
                };
                let _range = linearize_profile::range("attention kernel");
                let (y, next) = liger::chunked(&liger_inputs(x), cfg, state)?;
                (y, KernelState::Liger(next))
            }
            Kernel::GatedDeltanet {
                gates,
                cfg,
                rope,
                activation,
            } => {
                let state = match state {
                    Some(KernelState::GatedDeltanet(s)) => Some(s),
                    _ => None,
                };
                let d = DeltaInputs::new(x, gates, *rope, *activation)?;
                let _range = linearize_profile::range("attention kernel");
                let (y, next) =
                    gated_deltanet::chunked(&d.q, &d.k, x.v, &d.g, &d.beta, cfg, state)?;
                (y, KernelState::GatedDeltanet(next))
            }
            Kernel::Lizard {
                feature_map_q,
                feature_map_k,
                window_factors,
                gates,
                cfg,
            } => {
                let state = match state {
                    Some(KernelState::Lizard(s)) => Some(s),
                    _ => None,
                };
                let f = LizardFeatures::new(x, feature_map_q, feature_map_k, gates)?;
                let _range = linearize_profile::range("attention kernel");
                let (y, next) = lizard::chunked(&f.inputs(x, window_factors), cfg, state)?;
                (y, KernelState::Lizard(next))
            }
            Kernel::GdnWindow {
                gates,
                delta_scale,
                cfg,
                rope,
                activation,
            } => {
                let state = match state {
                    Some(KernelState::GdnWindow(s)) => Some(s),
                    _ => None,
                };
                let d = DeltaInputs::new(x, gates, *rope, *activation)?;
                let _range = linearize_profile::range("attention kernel");
                let (y, next) = gdn_window::chunked(&d.window_inputs(x, delta_scale), cfg, state)?;
                (y, KernelState::GdnWindow(next))
            }
        })
    }

    /// One token through the recurrent form, updating `state`.
    fn step(&self, x: &MixerInput, state: &mut KernelState) -> Result<Tensor> {
        Ok(match (&self.kernel, state) {
            (
                Kernel::Linear {
                    feature_map_q,
                    feature_map_k,
                    cfg,
                },
                KernelState::Linear(s),
            ) => {
                let phi_q = feature_map_q.forward(x.q)?;
                let phi_k = feature_map_k.forward(x.k)?;
                linear_attn::step(s, &phi_q, &phi_k, x.v, cfg)?
            }
            (
                Kernel::Lolcats {
                    feature_map_q,
                    feature_map_k,
                    window_factors,
                    cfg,
                    linear,
                },
                KernelState::Lolcats(s),
            ) => {
                let phi_q = lolcats_phi_q(feature_map_q, x, *linear)?;
                let phi_k = feature_map_k.forward(x.k)?;
                let inputs = lolcats_inputs(x, &phi_q, &phi_k, window_factors);
                lolcats::step(s, &inputs, cfg, x.position)?
            }
            (Kernel::SlidingWindow(cfg), KernelState::SlidingWindow(s)) => {
                swa::step(s, x.q, x.k, x.v, cfg, x.position)?
            }
            (
                Kernel::LigerGla {
                    gate_normalizer, ..
                },
                KernelState::LigerGla(s),
            ) => {
                let (q, k, g) = liger::gla_inputs(x.q_raw, x.k_raw, *gate_normalizer)?;
                gla::step(s, &q, &k, x.v, &g)?
            }
            (Kernel::Liger(cfg), KernelState::Liger(s)) => {
                liger::step(s, &liger_inputs(x), cfg, x.position)?
            }
            (
                Kernel::GatedDeltanet {
                    gates,
                    rope,
                    activation,
                    ..
                },
                KernelState::GatedDeltanet(s),
            ) => {
                let d = DeltaInputs::new(x, gates, *rope, *activation)?;
                gated_deltanet::step(s, &d.q, &d.k, x.v, &d.g, &d.beta)?
            }
            (
                Kernel::Lizard {
                    feature_map_q,
                    feature_map_k,
                    window_factors,
                    gates,
                    cfg,
                },
                KernelState::Lizard(s),
            ) => {
                let f = LizardFeatures::new(x, feature_map_q, feature_map_k, gates)?;
                lizard::step(s, &f.inputs(x, window_factors), cfg, x.position)?
            }
            (
                Kernel::GdnWindow {
                    gates,
                    delta_scale,
                    cfg,
                    rope,
                    activation,
                },
                KernelState::GdnWindow(s),
            ) => {
                let d = DeltaInputs::new(x, gates, *rope, *activation)?;
                gdn_window::step(s, &d.window_inputs(x, delta_scale), cfg, x.position)?
            }
            _ => bail!("{}: decoding state of another method", self.name()),
        })
    }
}

/// φ(q) of a LoLCATs layer, or zeros of its shape when the linear part is switched off.
fn lolcats_phi_q(feature_map_q: &FeatureMap, x: &MixerInput, linear: bool) -> Result<Tensor> {
    let phi_q = feature_map_q.forward(x.q)?;
    Ok(if linear { phi_q } else { phi_q.zeros_like() })
}

fn lolcats_inputs<'a>(
    x: &MixerInput<'a>,
    phi_q: &'a Tensor,
    phi_k: &'a Tensor,
    window_factors: &'a WindowFactors,
) -> LolcatsInputs<'a> {
    LolcatsInputs {
        q: x.q,
        k: x.k,
        v: x.v,
        phi_q,
        phi_k,
        window_factors: &window_factors.logits,
    }
}

/// What a Lizard layer computes from the projections before its kernel: φ(q), φ(k) after RoPE
/// and the log-gates from the raw keys.
struct LizardFeatures {
    phi_q: Tensor, // (b, h, L, f)
    phi_k: Tensor, // (b, h, L, f)
    g: Tensor,     // (b, h, L)
}

impl LizardFeatures {
    fn new(
        x: &MixerInput,
        feature_map_q: &FeatureMap,
        feature_map_k: &FeatureMap,
        gates: &LizardGates,
    ) -> Result<Self> {
        Ok(Self {
            phi_q: feature_map_q.forward(x.q)?,
            phi_k: feature_map_k.forward(x.k)?,
            g: gates.forward(x.k_raw)?,
        })
    }

    fn inputs<'a>(
        &'a self,
        x: &MixerInput<'a>,
        window_factors: &'a WindowFactors,
    ) -> LizardInputs<'a> {
        LizardInputs {
            q: x.q,
            k: x.k,
            v: x.v,
            phi_q: &self.phi_q,
            phi_k: &self.phi_k,
            log_gates: &self.g,
            window_factors: &window_factors.logits,
        }
    }
}

/// Gated DeltaNet's unit q and k (after RoPE or before, as configured) and its gates.
struct DeltaInputs {
    q: Tensor,    // (b, h, L, d), unit rows
    k: Tensor,    // (b, h_kv, L, d), unit rows
    g: Tensor,    // (b, h, L) log-decays
    beta: Tensor, // (b, h, L)
}

impl DeltaInputs {
    fn new(x: &MixerInput, gates: &DeltaGates, rope: bool, act: QkActivation) -> Result<Self> {
        let (q, k) = if rope { (x.q, x.k) } else { (x.q_raw, x.k_raw) };
        let (g, beta) = gates.forward(x.q_raw, x.k_raw, x.v)?;
        Ok(Self {
            q: act.unit(q)?,
            k: act.unit(k)?,
            g,
            beta,
        })
    }

    /// A `gdn_window` call: the window's softmax on the projections after RoPE, the memory on
    /// these.
    fn window_inputs<'a>(
        &'a self,
        x: &MixerInput<'a>,
        delta_scale: &'a Tensor,
    ) -> GdnWindowInputs<'a> {
        GdnWindowInputs {
            q: x.q,
            k: x.k,
            v: x.v,
            delta_q: &self.q,
            delta_k: &self.k,
            g: &self.g,
            beta: &self.beta,
            delta_scale,
        }
    }
}

/// Liger's GLA half reads the projections before RoPE, its window half those after.
fn liger_inputs<'a>(x: &MixerInput<'a>) -> LigerInputs<'a> {
    LigerInputs {
        q: x.q_raw,
        k: x.k_raw,
        q_rope: x.q,
        k_rope: x.k,
        v: x.v,
    }
}

impl LinearizedMixer {
    fn own_state<'s>(&self, state: &'s MixerState) -> Result<&'s LinearizedState> {
        state.downcast_ref::<LinearizedState>().with_context(|| {
            format!(
                "{} was given a decoding state made by another mixer",
                self.name()
            )
        })
    }
}

impl Mixer for LinearizedMixer {
    fn forward(&self, input: &MixerInput, state: Option<&mut MixerState>) -> Result<Tensor> {
        if let Kernel::Softmax(teacher) = &self.kernel {
            return teacher.forward(input, state);
        }
        let Some(state) = state else {
            let y = self.output(input)?;
            return match &self.softmax_heads {
                Some(split) => Ok(split.merge(&y, &split.forward(input, None)?)),
                None => Ok(y),
            };
        };
        let name = self.name();
        let state = state
            .downcast_mut::<LinearizedState>()
            .with_context(|| format!("{name} was given a decoding state made by another mixer"))?;
        let (batch, len) = (input.q.size()[0], input.q.size()[2]);
        ensure!(
            batch == state.batch,
            "{name}: decoding state made for batch {} was given a batch of {batch}",
            state.batch
        );
        ensure!(
            state.seen == input.offset,
            "{name}: decoding state holds {} tokens but the new tokens start at position {}",
            state.seen,
            input.offset
        );
        let y = match state.kernel.as_mut() {
            Some(kernel) if len == 1 => self.step(input, kernel)?,
            current => {
                let (y, next) = self.chunked(input, current.as_deref())?;
                state.kernel = Some(next);
                y
            }
        };
        let y = match (&self.softmax_heads, state.softmax_heads.as_mut()) {
            (Some(split), Some(cache)) => split.merge(&y, &split.forward(input, Some(cache))?),
            (None, None) => y,
            _ => bail!("{name}: decoding state made for other softmax heads"),
        };
        state.seen += len;
        Ok(y)
    }

    fn new_state(&self, batch: i64) -> Result<MixerState> {
        if let Kernel::Softmax(teacher) = &self.kernel {
            return teacher.new_state(batch);
        }
        ensure!(batch >= 1, "decoding state needs batch >= 1, got {batch}");
        let softmax_heads = match &self.softmax_heads {
            Some(split) => Some(split.teacher.new_state(batch)?),
            None => None,
        };
        Ok(Box::new(LinearizedState {
            batch,
            seen: 0,
            kernel: None,
            softmax_heads,
        }))
    }

    fn fork_state(
        &self,
        state: &MixerState,
        times: i64,
        reserve: i64,
        device: Device,
    ) -> Result<MixerState> {
        if let Kernel::Softmax(teacher) = &self.kernel {
            return teacher.fork_state(state, times, reserve, device);
        }
        ensure!(times >= 1, "fork: times must be >= 1, got {times}");
        let state = self.own_state(state)?;
        // The kernel's state does not grow with the sequence: only the softmax heads' KV cache
        // takes `reserve`.
        let repeat = |t: &Tensor| {
            t.to_device(device)
                .repeat_interleave_self_int(times, 0, None)
        };
        let softmax_heads = match (&self.softmax_heads, &state.softmax_heads) {
            (Some(split), Some(cache)) => {
                Some(split.teacher.fork_state(cache, times, reserve, device)?)
            }
            (None, None) => None,
            _ => bail!(
                "{}: decoding state made for other softmax heads",
                self.name()
            ),
        };
        Ok(Box::new(LinearizedState {
            batch: state.batch * times,
            seen: state.seen,
            kernel: state.kernel.as_ref().map(|k| k.map_tensors(&repeat)),
            softmax_heads,
        }))
    }

    fn step_capturable(&self, state: &MixerState) -> bool {
        let Ok(state) = self.own_state(state) else {
            return false;
        };
        if self.softmax_heads.is_some() {
            // The softmax heads' KV cache grows by a token per step.
            return false;
        }
        match (&self.kernel, &state.kernel) {
            (Kernel::Linear { .. }, Some(KernelState::Linear(_)))
            | (Kernel::LigerGla { .. }, Some(KernelState::LigerGla(_)))
            | (Kernel::GatedDeltanet { .. }, Some(KernelState::GatedDeltanet(_))) => true,
            // The window cache is full and the window has passed the sinks: the state's shapes
            // (and the sinks each step sees) no longer change.
            (Kernel::Lolcats { cfg, .. }, Some(KernelState::Lolcats(s))) => {
                s.cached() >= cfg.window().reach() && s.pos >= cfg.sinks + cfg.window().reach()
            }
            (Kernel::Lizard { cfg, .. }, Some(KernelState::Lizard(s))) => {
                s.cached() >= cfg.window().reach() && s.pos >= cfg.sinks + cfg.window().reach()
            }
            (Kernel::SlidingWindow(cfg), Some(KernelState::SlidingWindow(s))) => {
                s.cached() >= cfg.window().reach() && s.pos >= cfg.sinks + cfg.window().reach()
            }
            (Kernel::GdnWindow { cfg, .. }, Some(KernelState::GdnWindow(s))) => {
                s.cached() >= cfg.window().reach() && s.pos() >= cfg.sinks + cfg.window().reach()
            }
            (Kernel::Liger(cfg), Some(KernelState::Liger(s))) => {
                let reach = cfg.swa_config().window().reach();
                s.window.cached() >= reach && s.window.pos >= cfg.sinks + reach
            }
            _ => false,
        }
    }

    fn state_tensors(&self, state: &MixerState) -> Result<Vec<Tensor>> {
        if let Kernel::Softmax(teacher) = &self.kernel {
            return teacher.state_tensors(state);
        }
        ensure!(
            self.softmax_heads.is_none(),
            "{}: the softmax heads' KV cache grows by a token per step: its decoding cannot be \
             captured into a CUDA graph",
            self.name()
        );
        let state = self.own_state(state)?;
        Ok(state.kernel.as_ref().map_or_else(Vec::new, |k| {
            k.tensors().into_iter().map(Tensor::shallow_clone).collect()
        }))
    }

    fn state_bytes(&self, state: &MixerState) -> Result<u64> {
        if let Kernel::Softmax(teacher) = &self.kernel {
            return teacher.state_bytes(state);
        }
        let state = self.own_state(state)?;
        let kernel: u64 = state
            .kernel
            .as_ref()
            .map_or(0, |k| k.tensors().into_iter().map(tensor_bytes).sum());
        let cache = match (&self.softmax_heads, &state.softmax_heads) {
            (Some(split), Some(cache)) => split.teacher.state_bytes(cache)?,
            _ => 0,
        };
        Ok(kernel + cache)
    }

    fn name(&self) -> String {
        match &self.kernel {
            Kernel::Softmax(teacher) => teacher.name(),
            Kernel::Lolcats { linear: false, .. } => format!("{}-window_only", self.config.name()),
            _ => self.config.name(),
        }
    }
}
