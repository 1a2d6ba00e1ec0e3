//! One benchmark case: random inputs for a method at one length, and its naive or chunked form.
use anyhow::Result;
use linearize_attention::ops::lolcats::{LolcatsConfig, LolcatsInputs, WINDOW_FACTOR_INIT};
use linearize_attention::ops::window::WindowShape;
use linearize_attention::ops::{gated_deltanet, gla, liger, linear_attn, lizard, lolcats, swa};
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// Normalised linear attention (Hedgehog-sized features).
    Linear,
    /// LoLCATs sliding window + linear.
    LolcatsSw,
    /// LoLCATs terrace window + linear.
    LolcatsTk,
    /// Lizard: LoLCATs' terrace window + linear terms decayed by a scalar gate per head and
    /// token.
    LizardTk,
    /// Sliding-window softmax.
    Swa,
    /// Gated linear attention (Liger's recurrence).
    Gla,
    /// Liger: 0.5 sliding window + 0.5 GLA.
    Liger,
    /// Gated DeltaNet (unit keys, a log-decay and β per head and token): the naive form is the
    /// per-token definition, the chunked one the WY / UT form.
    GatedDeltanet,
    /// The teacher's causal softmax attention: libtorch's fused SDPA (flash on GPU) as the
    /// chunked form, the explicit L x L softmax as the naive one.
    Sdpa,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::LolcatsSw => "lolcats-sw",
            Self::LolcatsTk => "lolcats-tk",
            Self::LizardTk => "lizard-tk",
            Self::Swa => "swa",
            Self::Gla => "gla",
            Self::Liger => "liger",
            Self::GatedDeltanet => "gated-deltanet",
            Self::Sdpa => "sdpa",
        }
    }

    /// Rough bytes the naive form holds at once (forward + backward): its (L x L) f32 buffers,
    /// (L x L x d) for the gated forms; Gated DeltaNet's per-token loop keeps a (d, d)
    /// transition and a state per token for the backward.
    pub fn naive_bytes(self, shape: &Shape, len: i64) -> f64 {
        let heads = (shape.batch * shape.heads) as f64;
        let square = heads * (len as f64).powi(2) * 4.0;
        let gated = 8.0 * shape.head_dim as f64;
        square
            * match self {
                Self::Linear | Self::Swa | Self::Sdpa => 5.0,
                Self::LolcatsSw | Self::LolcatsTk => 10.0,
                Self::LizardTk => 14.0,
                Self::Gla => gated,
                Self::Liger => gated + 5.0,
                Self::GatedDeltanet => {
                    let d = shape.head_dim as f64;
                    return heads * len as f64 * 3.0 * d * d * 4.0 * 3.0;
                }
            }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Form {
    Naive,
    Chunked,
    /// The fused CUDA kernels (linear, LoLCATs, GLA, Liger's GLA half), gradients to every input.
    Fused,
    /// Attention transfer's call of the fused kernels: gradients to the features and window
    /// factors only (q, k, v are the teacher's).
    Transfer,
}

impl Form {
    pub fn name(self) -> &'static str {
        match self {
            Self::Naive => "naive",
            Self::Chunked => "chunked",
            Self::Fused => "fused",
            Self::Transfer => "transfer",
        }
    }
}

/// Sizes shared by every case of a run.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub batch: i64,
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    pub features: i64,
    pub window: i64,
    pub chunk: i64,
    /// Sink tokens of the LoLCATs and Lizard cases.
    pub sinks: i64,
    pub kind: Kind,
    pub device: Device,
}

/// Inputs of one case (leaves; the transfer form's q, k, v take no gradient) and how to run it.
pub struct Case {
    method: Method,
    form: Form,
    shape: Shape,
    leaves: Vec<Tensor>,
}

impl Case {
    pub fn new(method: Method, form: Form, len: i64, shape: Shape) -> Self {
        let s = shape;
        let opts = (s.kind, s.device);
        let normal = |heads: i64, dim: i64| Tensor::randn([s.batch, heads, len, dim], opts);
        // Hedgehog-like features: positive, each row summing to one.
        let features = |heads: i64| normal(heads, s.features).softmax(-1, s.kind);
        let leaves = match method {
            Method::Linear => vec![
                features(s.heads),
                features(s.heads),
                normal(s.kv_heads, s.head_dim),
            ],
            Method::LolcatsSw | Method::LolcatsTk => vec![
                normal(s.heads, s.head_dim),
                normal(s.kv_heads, s.head_dim),
                normal(s.kv_heads, s.head_dim),
                features(s.heads),
                features(s.heads),
                Tensor::full([s.heads], WINDOW_FACTOR_INIT, (Kind::Float, s.device)),
            ],
            Method::LizardTk => vec![
                normal(s.heads, s.head_dim),
                normal(s.kv_heads, s.head_dim),
                normal(s.kv_heads, s.head_dim),
                features(s.heads),
                features(s.heads),
                Tensor::full([s.heads], WINDOW_FACTOR_INIT, (Kind::Float, s.device)),
                // f32 log-gates per query head, about -0.05 per token (as Gated DeltaNet's).
                Tensor::randn([s.batch, s.heads, len], (Kind::Float, s.device)).log_sigmoid()
                    / 16.0,
            ],
            Method::Swa | Method::Sdpa => vec![
                normal(s.heads, s.head_dim),
                normal(s.kv_heads, s.head_dim),
                normal(s.kv_heads, s.head_dim),
            ],
            Method::Gla => vec![
                normal(s.heads, s.head_dim).softmax(-1, s.kind),
                normal(s.kv_heads, s.head_dim).softmax(-1, s.kind),
                normal(s.kv_heads, s.head_dim),
                normal(s.kv_heads, s.head_dim).log_sigmoid() / 16.0,
            ],
            Method::Liger => vec![
                normal(s.heads, s.head_dim),
                normal(s.kv_heads, s.head_dim),
                normal(s.heads, s.head_dim),
                normal(s.kv_heads, s.head_dim),
                normal(s.kv_heads, s.head_dim),
            ],
            Method::GatedDeltanet => {
                // As the layer feeds the kernel (and fla's benchmarks): unit q and k, f32 gates
                // (log-decays about -0.05 per token, β about 1/2) per query head.
                let unit = |heads| {
                    let x = normal(heads, s.head_dim);
                    gated_deltanet::l2_normalize(&x).expect("a float dtype")
                };
                let gate = || Tensor::randn([s.batch, s.heads, len], (Kind::Float, s.device));
                vec![
                    unit(s.heads),
                    unit(s.kv_heads),
                    normal(s.kv_heads, s.head_dim),
                    gate().log_sigmoid() / 16.0,
                    gate().sigmoid(),
                ]
            }
        };
        // In the transfer form q, k and v (the first three LoLCATs inputs) are the teacher's.
        let frozen = if form == Form::Transfer { 3 } else { 0 };
        let leaves = leaves
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.detach().set_requires_grad(i >= frozen))
            .collect();
        Self {
            method,
            form,
            shape,
            leaves,
        }
    }

    pub fn forward(&self) -> Result<Tensor> {
        let x = &self.leaves;
        let s = &self.shape;
        let chunked = self.form != Form::Naive;
        Ok(match self.method {
            Method::Linear => {
                let cfg = linear_attn::LinearAttnConfig {
                    chunk_size: s.chunk,
                    fused: self.form == Form::Fused,
                    ..Default::default()
                };
                match self.form {
                    Form::Naive => linear_attn::naive(&x[0], &x[1], &x[2], &cfg)?,
                    Form::Chunked => linear_attn::chunked(&x[0], &x[1], &x[2], &cfg, None)?.0,
                    Form::Fused | Form::Transfer => {
                        linear_attn::chunked_output(&x[0], &x[1], &x[2], &cfg)?
                    }
                }
            }
            Method::LolcatsSw | Method::LolcatsTk => {
                let window_shape = if self.method == Method::LolcatsSw {
                    WindowShape::Sw
                } else {
                    WindowShape::Tk
                };
                let cfg = LolcatsConfig {
                    window_shape,
                    window_size: s.window,
                    chunk_size: s.chunk,
                    fused: matches!(self.form, Form::Fused | Form::Transfer),
                    sinks: s.sinks,
                };
                let inputs = LolcatsInputs {
                    q: &x[0],
                    k: &x[1],
                    v: &x[2],
                    phi_q: &x[3],
                    phi_k: &x[4],
                    window_factors: &x[5],
                };
                match self.form {
                    Form::Naive => lolcats::naive(&inputs, &cfg)?,
                    Form::Chunked => lolcats::chunked(&inputs, &cfg, None)?.0,
                    Form::Fused | Form::Transfer => lolcats::chunked_output(&inputs, &cfg)?,
                }
            }
            Method::LizardTk => {
                let cfg = lizard::LizardConfig {
                    window_shape: WindowShape::Tk,
                    window_size: s.window,
                    chunk_size: s.chunk,
                    sinks: s.sinks,
                };
                let inputs = lizard::LizardInputs {
                    q: &x[0],
                    k: &x[1],
                    v: &x[2],
                    phi_q: &x[3],
                    phi_k: &x[4],
                    window_factors: &x[5],
                    log_gates: &x[6],
                };
                if chunked {
                    lizard::chunked(&inputs, &cfg, None)?.0
                } else {
                    lizard::naive(&inputs, &cfg)?
                }
            }
            Method::Sdpa => {
                let gqa = s.heads != s.kv_heads;
                if chunked {
                    Tensor::scaled_dot_product_attention(
                        &x[0],
                        &x[1],
                        &x[2],
                        None::<&Tensor>,
                        0.0,
                        true,
                        None,
                        gqa,
                    )
                } else {
                    let group = s.heads / s.kv_heads;
                    let k = x[1].repeat_interleave_self_int(group, 1, None);
                    let v = x[2].repeat_interleave_self_int(group, 1, None);
                    let len = x[0].size()[2];
                    let scores = x[0]
                        .to_kind(Kind::Float)
                        .matmul(&k.to_kind(Kind::Float).transpose(-1, -2))
                        / (s.head_dim as f64).sqrt();
                    let future = Tensor::ones([len, len], (Kind::Bool, s.device)).triu(1);
                    scores
                        .masked_fill(&future, f64::NEG_INFINITY)
                        .softmax(-1, Kind::Float)
                        .matmul(&v.to_kind(Kind::Float))
                        .to_kind(s.kind)
                }
            }
            Method::Swa => {
                let cfg = swa::SwaConfig {
                    window_size: s.window,
                    chunk_size: s.chunk,
                    sinks: 0,
                };
                if chunked {
                    swa::chunked(&x[0], &x[1], &x[2], &cfg, None)?.0
                } else {
                    swa::naive(&x[0], &x[1], &x[2], &cfg)?
                }
            }
            Method::Gla => {
                let cfg = gla::GlaConfig {
                    chunk_size: s.chunk,
                    sub_chunk: sub_chunk(s.chunk),
                    fused: self.form == Form::Fused,
                };
                match self.form {
                    Form::Naive => gla::naive(&x[0], &x[1], &x[2], &x[3])?,
                    Form::Chunked => gla::chunked(&x[0], &x[1], &x[2], &x[3], &cfg, None)?.0,
                    Form::Fused | Form::Transfer => {
                        gla::chunked_output(&x[0], &x[1], &x[2], &x[3], &cfg)?
                    }
                }
            }
            Method::Liger => {
                let cfg = liger::LigerConfig {
                    window_size: s.window,
                    chunk_size: s.chunk,
                    sub_chunk: sub_chunk(s.chunk),
                    fused: self.form == Form::Fused,
                    ..Default::default()
                };
                let inputs = liger::LigerInputs {
                    q: &x[0],
                    k: &x[1],
                    q_rope: &x[2],
                    k_rope: &x[3],
                    v: &x[4],
                };
                match self.form {
                    Form::Naive => liger::naive(&inputs, &cfg)?,
                    Form::Chunked => liger::chunked(&inputs, &cfg, None)?.0,
                    Form::Fused | Form::Transfer => liger::chunked_output(&inputs, &cfg)?,
                }
            }
            Method::GatedDeltanet => {
                let cfg = gated_deltanet::GatedDeltaNetConfig {
                    chunk_size: s.chunk,
                };
                if chunked {
                    gated_deltanet::chunked(&x[0], &x[1], &x[2], &x[3], &x[4], &cfg, None)?.0
                } else {
                    gated_deltanet::naive(&x[0], &x[1], &x[2], &x[3], &x[4])?
                }
            }
        })
    }

    /// One forward and the backward to every input that takes a gradient; the gradients are
    /// dropped.
    pub fn forward_backward(&self) -> Result<()> {
        let y = self.forward()?;
        let loss = y.sum(y.kind());
        let inputs: Vec<&Tensor> = self.leaves.iter().filter(|t| t.requires_grad()).collect();
        Tensor::f_run_backward(&[loss], &inputs, false, false)?;
        Ok(())
    }
}

/// The default GLA sub-chunk (16) where it divides the chunk, else the whole chunk.
fn sub_chunk(chunk: i64) -> i64 {
    if chunk % 16 == 0 {
        16
    } else {
        chunk
    }
}
