//! Chunked form for training and prefill, in log space. With `B` the cumulative log-gates from a
//! chunk's start, every decay `exp(B_t − B_s)` (s <= t) is evaluated as a product of factors that
//! are each a decay over a forward span (at most 1), except inside the small diagonal sub-chunks,
//! where it is factored around the middle token and the sub-chunk is sized so that neither factor
//! exceeds e^60. Outputs and gradients therefore stay finite for any gate strength; only the state
//! scan across chunks runs sequentially (one fused update per chunk). For f16 / bf16 inputs the
//! matmuls take operands in the input dtype; gates, decays and the state stay in f32.
use super::{check_inputs, GlaConfig, GlaState};
use crate::error::{Error, Result};
use crate::tensors::{ceil_div, pad_seq, prepare, Precision};
use linearize_torch_ext::gla as fused;
use tch::{Kind, Tensor};

/// The largest exponent a factored decay may reach inside a diagonal sub-chunk: e^60 ≈ 1e26
/// leaves products with the inputs far below the f32 limit (3.4e38). These products are always
/// taken in f32 (see [`intra_chunk`]), so f16's narrower range never meets them.
const MAX_FACTOR_EXPONENT: f64 = 60.0;

/// Runs the sequence on from `state` (zero when `None`) and returns the output (b, h, L, d_v) and
/// the state after the last token.
pub fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_gates: &Tensor,
    cfg: &GlaConfig,
    state: Option<&GlaState>,
) -> Result<(Tensor, GlaState)> {
    cfg.validate()?;
    let s = check_inputs(q, k, v, log_gates)?;
    let p = Precision::of("v", v)?;
    let init = GlaState::initial(state, &s, (p.acc, v.device()))?;
    let (chunk, sub) = plan(cfg, log_gates)?;
    let (b, h) = (s.batch, s.heads);
    let n = ceil_div(s.len, chunk);
    // Padding tokens have k = v = 0 and gate 1 (log 0): they change neither outputs nor state.
    let chunks = |x: &Tensor, kind: Kind| {
        let x = prepare(x, kind, h);
        let width = x.size()[3];
        pad_seq(&x, 0, n * chunk - s.len).reshape([b, h, n, chunk, width])
    };
    // q and k only reach the matmuls scaled by decays, so they are kept in `acc` and rounded to
    // the operand dtype once, after the scaling.
    let (q, k, g) = (chunks(q, p.acc), chunks(k, p.acc), chunks(log_gates, p.acc));
    let values = chunks(v, p.operand);
    let cum = g.cumsum(3, p.acc); // (b, h, n, C, d_k): log-decay from the chunk start through t
    let total = cum.select(3, chunk - 1); // (b, h, n, d_k)

    // What each chunk adds to the state (decayed to its end), then the scan across chunks.
    let updates = p.mm(
        &(&k * (total.unsqueeze(3) - &cum).exp()).transpose(-1, -2),
        &values,
    ); // (b, h, n, d_k, d_v)
    let decay = total.exp().unsqueeze(-1); // (b, h, n, d_k, 1)

    // Per-chunk views through `unbind`, whose backward stacks the gradients once (a `select` per
    // chunk would scatter each into a zero tensor of all chunks: quadratic in the chunk count).
    let mut before = Vec::with_capacity(n as usize);
    let mut carried = init.s;
    for (update, decay) in updates.unbind(2).iter().zip(decay.unbind(2)) {
        let next = update + decay * &carried;
        before.push(carried);
        carried = next;
    }
    let before = Tensor::stack(&before, 2); // (b, h, n, d_k, d_v): state entering each chunk

    let y = p.mm_state(&(&q * cum.exp()), &before) + intra_chunk(&q, &k, &values, &cum, sub, p);
    let y = y
        .reshape([b, h, n * chunk, s.value_dim])
        .narrow(2, 0, s.len);
    Ok((y.to_kind(v.kind()), GlaState { s: carried }))
}

/// [`chunked`]'s output from the empty state, without the state after the last token (training
/// and scoring need only the output). With `cfg.fused`, calls that the fused CUDA kernels support
/// (CUDA, bf16 or f16 values, d_k = d_v of 64 or 128) take them; the log-gates must then be <= 0
/// as everywhere, but are not read back to the host to check (that would wait for the GPU on
/// every call): the methods here make them as log-sigmoids.
pub fn chunked_output(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    log_gates: &Tensor,
    cfg: &GlaConfig,
) -> Result<Tensor> {
    cfg.validate()?;
    check_inputs(q, k, v, log_gates)?;
    if cfg.fused && fused::unsupported(q, k, v, log_gates).is_none() {
        return fused::attention(q, k, v, log_gates).map_err(Error::Kernel);
    }
    Ok(chunked(q, k, v, log_gates, cfg, None)?.0)
}

/// Chunk and sub-chunk sizes for this call: the configured ones, scaled down together when the
/// steepest log-gate would push a diagonal sub-chunk's factors past [`MAX_FACTOR_EXPONENT`].
fn plan(cfg: &GlaConfig, log_gates: &Tensor) -> Result<(i64, i64)> {
    let (lowest, highest) = log_gates.aminmax(None::<i64>, false);
    let (lowest, highest) = (lowest.double_value(&[]), highest.double_value(&[]));
    if highest.is_nan() || highest > 0.0 || lowest.is_nan() {
        return Err(Error::Value {
            tensor: "log_gates",
            message: format!(
                "must be finite and <= 0 (log of a gate in (0, 1]), found values up to {highest}"
            ),
        });
    }
    let steepest = -lowest;
    let per_sub = cfg.chunk_size / cfg.sub_chunk;
    let mut sub = cfg.sub_chunk;
    // Around the middle token, a factor spans at most sub/2 steps.
    while sub > 1 && (sub / 2) as f64 * steepest > MAX_FACTOR_EXPONENT {
        sub /= 2;
    }
    if sub < cfg.sub_chunk {
        tracing::debug!(sub, steepest, "gla: strong decay, smaller sub-chunks");
    }
    Ok((sub * per_sub, sub))
}

/// `Σ_{s<=t, same chunk} (q_t ⊙ exp(B_t − B_s))·k_s v_s` for chunked q, k (b, h, n, C, d_k), v
/// (b, h, n, C, d_v) and in-chunk cumulative log-gates `cum`.
fn intra_chunk(q: &Tensor, k: &Tensor, v: &Tensor, cum: &Tensor, sub: i64, p: Precision) -> Tensor {
    let size = q.size();
    let (b, h, n, c) = (size[0], size[1], size[2], size[3]);
    let dv = v.size()[4];
    let ns = c / sub;
    let split = |x: &Tensor| x.reshape([b, h, n, ns, sub, x.size()[4]]);
    let (q6, k6, v6, g6) = (split(q), split(k), split(v), split(cum)); // (b, h, n, ns, sub, ·)

    // Within a sub-chunk: exp(B_t − B_s) = exp(B_t − B_r)·exp(B_r − B_s), r its middle token.
    // These products stay in `acc`, as flash-linear-attention keeps its diagonal blocks: a gate's
    // gradient is the q-side minus the k-side sum of them, and the t = s terms (no decay) cancel
    // only if neither side's gradient is rounded; the factors may also exceed f16's range. The
    // blocks (sub x sub) are too small for tensor cores to pay anyway.
    let mid = g6.narrow(4, (sub - 1) / 2, 1);
    let a = (&q6 * (&g6 - &mid).exp()).matmul(&(&k6 * (&mid - &g6).exp()).transpose(-1, -2));
    let future = Tensor::ones([sub, sub], (Kind::Bool, q.device())).triu(1);
    let diagonal = p.mm(&a.masked_fill(&future, 0.0), &v6); // (b, h, n, ns, sub, d_v)
    if ns == 1 {
        return diagonal.reshape([b, h, n, c, dv]);
    }

    // Sub-chunk j before sub-chunk i: exp(B_t − E_i)·exp(E_i − F_j)·exp(F_j − B_s), with E_i the
    // cumulative gate just before sub-chunk i and F_j at the end of j: three decays, each <= 1.
    let end = g6.select(4, sub - 1); // F (b, h, n, ns, d_k)
    let start = Tensor::cat(
        &[end.narrow(3, 0, 1).zeros_like(), end.narrow(3, 0, ns - 1)],
        3,
    ); // E
    let q_from_start = &q6 * (&g6 - start.unsqueeze(4)).exp();
    let k_to_end = &k6 * (end.unsqueeze(4) - &g6).exp();
    let later = Tensor::ones([ns, ns], (Kind::Bool, q.device()))
        .tril(-1)
        .logical_not();
    let between = (start.unsqueeze(4) - end.unsqueeze(3)) // (b, h, n, ns_i, ns_j, d_k)
        .masked_fill(&later.unsqueeze(-1), f64::NEG_INFINITY)
        .exp();
    let a = p.mm(
        &(q_from_start.unsqueeze(4) * between.unsqueeze(5)), // (b, h, n, ns_i, ns_j, sub, d_k)
        &k_to_end.unsqueeze(3).transpose(-1, -2),
    ); // (.., ns_i, ns_j, sub_t, sub_s)
    let a = a
        .permute([0, 1, 2, 3, 5, 4, 6])
        .reshape([b, h, n, ns, sub, c]); // keys in chunk order
    (diagonal + p.mm(&a, &v.unsqueeze(3))).reshape([b, h, n, c, dv])
}
