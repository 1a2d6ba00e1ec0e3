"""Fused LoLCATs attention (defined in linearize-attention's `ops/lolcats/mod.rs`) for whole
sequences from the empty state, forward and backward, in chunks of C tokens, for both window
shapes of w = M·C tokens. Query t sees the keys of its window through γ·exp(s − m_t), m_t the
window's largest score, and the keys before the window through φq_t·φk_s, one normaliser over both.

Normalised linear attention (`ops/linear_attn`) is the sw shape's linear terms with no window
(M = 0: every key at or before the query is linear, the query's own chunk summed in place), with
eps added to the normaliser: the same sums, gradient terms and feature-map gradients, and its own
forward (`linear_forward`) and value gradient (`linear_backward_v`).

`sw` (TERRACE false): the window is t − w < s <= t. For query chunk j the linear keys are every
chunk before j − M (one carried sum) and the tokens of chunk j − M at or before the query's place
in its chunk; the window keys are the rest of chunk j − M and chunks j − M + 1 … j.
`tk` (TERRACE true): the window is the query's terrace block of w tokens (M chunks) and the block
before, up to the query; the linear keys are the blocks before that, whole chunks only.

Sinks (`sinks` = N, 0 for none): the keys s < N are window keys of every query t >= s, under the
same max m_t and factor γ, and never linear keys. Where a sink lies in a query's window it counts
once; the sink chunks before the window range are one more pass of the window loop, masked to the
sinks, and their keys' gradients from the query chunks past their window range are a kernel of
their own (`backward_sink_kv`). The linear terms read φk as zero on the sink rows (the forward's
sums skip them) and give them no feature gradient.

Tensors are contiguous (b, heads, L, dim); program (i, bh) works on chunk i of batch-head bh; key
and value heads are shared by H / HK and H / HV query heads. The chunk sums are kept in the inputs'
dtype for bf16 and in f32 for f16, whose range sums over long sequences can exceed; products with
f32 sums take their other operand in f32 (TF32 on the GPU).

Backward, with g = dL/dy, gn_t = g_t / den_t and gd_t = −g_t·y_t / den_t: a linear score's
gradient is gn_t·v_s + gd_t, a window score's γ·e_ts·(gn_t·v_s + gd_t). y is unchanged when γ and
φq scale together, so the window's total share is −mu_t with mu_t = φq_t·dφq_t; mu_t is also the
gradient of m_t, which goes to the largest score, and dγ = −Σ_t mu_t / γ (summed by the caller).
The feature-map gradients need no pass over the window; q, k and v gradients do.
"""
import triton
import triton.language as tl


@triton.jit
def _chunk(base, chunk, L, DIM: tl.constexpr, C: tl.constexpr):
    """Pointers to one chunk's rows [C, DIM] of an (L, DIM) matrix, and the mask of rows < L."""
    t = chunk * C + tl.arange(0, C)
    return base + t[:, None] * DIM + tl.arange(0, DIM)[None, :], (t < L)[:, None]


@triton.jit
def _head(bh, H, HX):
    """Row of (b·HX + head) for query batch-head bh when HX heads serve H query heads."""
    return (bh // H) * HX + (bh % H) // (H // HX)


@triton.jit
def _first_window_chunk(j, M, TERRACE: tl.constexpr):
    """The first key chunk in the windows of query chunk j."""
    if TERRACE:
        first = (j // M - 1) * M
    else:
        first = j - M
    return tl.maximum(first, 0)


@triton.jit
def _last_window_chunk(c, M, TERRACE: tl.constexpr):
    """The last query chunk whose windows reach into key chunk c."""
    if TERRACE:
        last = (c // M + 2) * M - 1
    else:
        last = c + M
    return last


@triton.jit
def _linear_chunk(j, M, TERRACE: tl.constexpr):
    """The chunk whose exclusive key sums start query chunk j's linear terms (< 0: none); for sw
    its own tokens at or before the query's place are linear too."""
    if TERRACE:
        first = (j // M - 1) * M
    else:
        first = j - M
    return first


@triton.jit
def _in_window(t, key, M, sinks, C: tl.constexpr, TERRACE: tl.constexpr):
    """[C, C] mask of the keys in the queries' windows, the sinks (keys < `sinks`) included."""
    if TERRACE:
        near = key[None, :] >= (t[:, None] // (M * C) - 1) * (M * C)
    else:
        near = key[None, :] > t[:, None] - M * C
    return (key[None, :] <= t[:, None]) & (near | (key[None, :] < sinks))


@triton.jit
def grad_terms(g, y, den, grad_num, grad_den, n_rows, D: tl.constexpr, ROWS: tl.constexpr):
    """The backward's per-token terms from the output gradient g and the output y, (rows, D) in
    y's dtype: gn = g / den in y's dtype and gd = −g·y / den (rows) in f32."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = r < n_rows
    offsets = r.to(tl.int64)[:, None] * D + tl.arange(0, D)[None, :]
    g_r = tl.load(g + offsets, mask=live[:, None], other=0.0).to(tl.float32)
    y_r = tl.load(y + offsets, mask=live[:, None], other=0.0).to(tl.float32)
    den_r = tl.load(den + r, mask=live, other=1.0)
    tl.store(grad_num + offsets, (g_r / den_r[:, None]).to(grad_num.dtype.element_ty),
             mask=live[:, None])
    tl.store(grad_den + r, -tl.sum(g_r * y_r, 1) / den_r, mask=live)


@triton.jit
def chunk_sums(a, bm, weights, sums, weight_sums, L, n_chunks, H, HA, HB, skip,
               C: tl.constexpr, F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr,
               REVERSE: tl.constexpr, WEIGHTED: tl.constexpr):
    """sums[bh, c] = Σ over the chunks before c (after c when REVERSE) of a_c^T b_c, (F, D) in the
    dtype of `sums`, and weight_sums[bh, c] = Σ_t w_t a_t over the same tokens, (F) in f32, w = 1
    unless WEIGHTED (then `weights` (b, h, L) f32); the rows t < `skip` (sinks) are left out.
    One program per (bh, block of BF features)."""
    bh = tl.program_id(0)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    a_base = a + _head(bh, H, HA).to(tl.int64) * L * F
    b_base = bm + _head(bh, H, HB).to(tl.int64) * L * D
    out = sums + bh.to(tl.int64) * n_chunks * F * D + cols[:, None] * D + tl.arange(0, D)[None, :]
    wout = weight_sums + bh.to(tl.int64) * n_chunks * F + cols
    acc = tl.zeros([BF, D], tl.float32)
    wacc = tl.zeros([BF], tl.float32)
    for i in tl.range(0, n_chunks):
        if REVERSE:
            c = n_chunks - 1 - i
        else:
            c = i
        tl.store(out + c * F * D, acc.to(sums.dtype.element_ty))
        tl.store(wout + c * F, wacc)
        t = c * C + tl.arange(0, C)
        live = t < L
        a_c = tl.load(a_base + t[:, None] * F + cols[None, :], mask=(live & (t >= skip))[:, None],
                      other=0.0)
        b_c = tl.load(b_base + t[:, None] * D + tl.arange(0, D)[None, :], mask=live[:, None],
                      other=0.0)
        acc += tl.dot(tl.trans(a_c), b_c)
        if WEIGHTED:
            w = tl.load(weights + bh.to(tl.int64) * L + t, mask=live, other=0.0)
            wacc += tl.sum(a_c.to(tl.float32) * w[:, None], 0)
        else:
            wacc += tl.sum(a_c.to(tl.float32), 0)


@triton.jit
def _linear_terms(phi_q_j, phi_k, v_base, sums, k_sums, bh64, c, L, n_chunks, sinks,
                  C: tl.constexpr, D: tl.constexpr, F: tl.constexpr, TERRACE: tl.constexpr):
    """The linear terms' numerator [C, D] and normaliser [C] (f32) of query chunk rows φq_j: the
    keys before chunk c through the exclusive sums at c, and for sw (TERRACE false) the keys of
    chunk c at or before each query's place in its chunk, but the sinks."""
    s_ptrs = sums + (bh64 * n_chunks + c) * F * D + tl.arange(0, F)[:, None] * D \
        + tl.arange(0, D)[None, :]
    kv = tl.load(s_ptrs)
    z = tl.load(k_sums + (bh64 * n_chunks + c) * F + tl.arange(0, F))
    num = tl.dot(phi_q_j.to(kv.dtype), kv)
    total = tl.sum(phi_q_j.to(tl.float32) * z[None, :], 1)
    if not TERRACE:
        rows = tl.arange(0, C)
        # Chunk c is the sequence's last (and may be short) when the window is empty.
        fk_ptrs, keys_live = _chunk(phi_k + bh64 * L * F, c, L, F, C)
        v_ptrs, _ = _chunk(v_base, c, L, D, C)
        phi_k_c = tl.load(fk_ptrs, mask=keys_live & (c * C + rows >= sinks)[:, None], other=0.0)
        v_c = tl.load(v_ptrs, mask=keys_live, other=0.0)
        a = tl.dot(phi_q_j, tl.trans(phi_k_c))
        # Numerator and normaliser read the same rounded weights.
        a = tl.where(rows[None, :] <= rows[:, None], a, 0.0).to(v_c.dtype)
        num += tl.dot(a, v_c)
        total += tl.sum(a.to(tl.float32), 1)
    return num, total


@triton.jit
def _sink_chunks(first, sinks, C: tl.constexpr):
    """The number of chunks from 0 holding sinks that lie before the window range's `first`."""
    return tl.minimum((sinks + C - 1) // C, first)


@triton.jit
def _window_block(q_j, k_base, v_base, c, t, m, star, w_den, w_num, L, M, sinks, scale,
                  C: tl.constexpr, D: tl.constexpr, TERRACE: tl.constexpr):
    """Key chunk c's step of the online softmax over the queries' windows and sinks: the running
    max m [C] and its key `star`, and the sums w_den [C] and w_num [C, D] under the new max."""
    k_ptrs, keys_live = _chunk(k_base, c, L, D, C)
    v_ptrs, _ = _chunk(v_base, c, L, D, C)
    k_c = tl.load(k_ptrs, mask=keys_live, other=0.0)
    v_c = tl.load(v_ptrs, mask=keys_live, other=0.0)
    s = tl.dot(q_j, tl.trans(k_c)) * scale
    s = tl.where(_in_window(t, c * C + tl.arange(0, C), M, sinks, C, TERRACE), s, float("-inf"))
    block_max = tl.max(s, 1)
    star = tl.where(block_max > m, c * C + tl.argmax(s, 1), star)
    m_new = tl.maximum(m, block_max)
    alpha = tl.exp(m - m_new)
    # Numerator and denominator read the same rounded weights.
    p = tl.exp(s - m_new[:, None]).to(v_c.dtype)
    w_den = w_den * alpha + tl.sum(p.to(tl.float32), 1)
    w_num = w_num * alpha[:, None] + tl.dot(p, v_c)
    return m_new, star, w_den, w_num


@triton.jit
def forward(q, k, v, phi_q, phi_k, sums, k_sums, gammas, y, den, maxes, argmaxes, L, n_chunks, H,
            HK, HV, M, sinks, scale, C: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
            TERRACE: tl.constexpr):
    """y (b, h, L, D) in v's dtype, and per query (b, h, L) the normaliser `den`, the largest
    score of the window and sinks `maxes` (f32) and its key `argmaxes` (i32), from the key-feature
    sums `sums` (bh, n, F, D) / `k_sums` (bh, n, F) over the chunks before each chunk."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tl.arange(0, C)
    t = j * C + rows
    bh64 = bh.to(tl.int64)
    k_base = k + _head(bh, H, HK).to(tl.int64) * L * D
    v_base = v + _head(bh, H, HV).to(tl.int64) * L * D
    q_ptrs, live = _chunk(q + bh64 * L * D, j, L, D, C)
    q_j = tl.load(q_ptrs, mask=live, other=0.0)

    # Window: chunk j first (its diagonal makes every row's max finite), then back, then the
    # sink chunks before the window range.
    m = tl.full([C], float("-inf"), tl.float32)
    star = tl.zeros([C], tl.int32)
    w_den = tl.zeros([C], tl.float32)
    w_num = tl.zeros([C, D], tl.float32)
    first = _first_window_chunk(j, M, TERRACE)
    for i in tl.range(0, j - first + 1):
        m, star, w_den, w_num = _window_block(q_j, k_base, v_base, j - i, t, m, star, w_den,
                                              w_num, L, M, sinks, scale, C, D, TERRACE)
    for c in tl.range(0, _sink_chunks(first, sinks, C)):
        m, star, w_den, w_num = _window_block(q_j, k_base, v_base, c, t, m, star, w_den, w_num,
                                              L, M, sinks, scale, C, D, TERRACE)

    gamma = tl.load(gammas + bh % H)
    num = gamma * w_num
    total = gamma * w_den
    c = _linear_chunk(j, M, TERRACE)
    if c >= 0:
        fq_ptrs, _ = _chunk(phi_q + bh64 * L * F, j, L, F, C)
        phi_q_j = tl.load(fq_ptrs, mask=live, other=0.0)
        linear_num, linear_den = _linear_terms(phi_q_j, phi_k, v_base, sums, k_sums, bh64, c, L,
                                               n_chunks, sinks, C, D, F, TERRACE)
        num += linear_num
        total += linear_den

    y_ptrs, _ = _chunk(y + bh64 * L * D, j, L, D, C)
    tl.store(y_ptrs, (num / total[:, None]).to(y.dtype.element_ty), mask=live)
    tl.store(den + bh64 * L + t, total, mask=t < L)
    tl.store(maxes + bh64 * L + t, m, mask=t < L)
    tl.store(argmaxes + bh64 * L + t, star, mask=t < L)


@triton.jit
def linear_forward(v, phi_q, phi_k, sums, k_sums, y, den, L, n_chunks, H, HV, eps,
                   C: tl.constexpr, D: tl.constexpr, F: tl.constexpr):
    """Normalised linear attention: y (b, h, L, D) in v's dtype and per query (b, h, L) the
    normaliser `den` with eps added (f32), from `sums` (bh, n, F, D) / `k_sums` (bh, n, F) over
    the chunks before each chunk; the keys of the query's own chunk are summed in place."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    t = j * C + tl.arange(0, C)
    bh64 = bh.to(tl.int64)
    fq_ptrs, live = _chunk(phi_q + bh64 * L * F, j, L, F, C)
    phi_q_j = tl.load(fq_ptrs, mask=live, other=0.0)
    num, total = _linear_terms(phi_q_j, phi_k, v + _head(bh, H, HV).to(tl.int64) * L * D, sums,
                               k_sums, bh64, j, L, n_chunks, 0, C, D, F, False)
    total += eps
    y_ptrs, _ = _chunk(y + bh64 * L * D, j, L, D, C)
    tl.store(y_ptrs, (num / total[:, None]).to(y.dtype.element_ty), mask=live)
    tl.store(den + bh64 * L + t, total, mask=t < L)


@triton.jit
def backward_phi_q(grad_num, grad_den, v, phi_q, phi_k, sums, k_sums, d_phi_q, mu, L, n_chunks, H,
                   HV, M, sinks, C: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                   TERRACE: tl.constexpr):
    """dφq_t = Σ_{s before t's window, not a sink} (gn_t·v_s + gd_t) φk_s, from the forward's
    sums, and mu_t = φq_t·dφq_t (b, h, L) in f32: minus the share of the window and sinks in the
    gradient, which is also the gradient of their largest score m_t (the linear terms are not
    scaled by exp(−m_t))."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tl.arange(0, C)
    t = j * C + rows
    bh64 = bh.to(tl.int64)
    out_ptrs, live = _chunk(d_phi_q + bh64 * L * F, j, L, F, C)
    grad = tl.zeros([C, F], tl.float32)
    c = _linear_chunk(j, M, TERRACE)
    if c >= 0:
        gn_ptrs, _ = _chunk(grad_num + bh64 * L * D, j, L, D, C)
        gn = tl.load(gn_ptrs, mask=live, other=0.0)
        gd = tl.load(grad_den + bh64 * L + t, mask=t < L, other=0.0)
        # kv^T as (D, F)
        s_ptrs = sums + (bh64 * n_chunks + c) * F * D + tl.arange(0, F)[None, :] * D \
            + tl.arange(0, D)[:, None]
        kv_t = tl.load(s_ptrs)
        z = tl.load(k_sums + (bh64 * n_chunks + c) * F + tl.arange(0, F))
        grad += tl.dot(gn.to(kv_t.dtype), kv_t)
        grad += gd[:, None] * z[None, :]
        if not TERRACE:
            # Chunk c is j itself, maybe the short last one, when the window is empty.
            v_ptrs, keys_live = _chunk(v + _head(bh, H, HV).to(tl.int64) * L * D, c, L, D, C)
            fk_ptrs, _ = _chunk(phi_k + bh64 * L * F, c, L, F, C)
            v_c = tl.load(v_ptrs, mask=keys_live, other=0.0)
            phi_k_c = tl.load(fk_ptrs, mask=keys_live & (c * C + rows >= sinks)[:, None],
                              other=0.0)
            e = tl.dot(gn, tl.trans(v_c)) + gd[:, None]
            e = tl.where(rows[None, :] <= rows[:, None], e, 0.0).to(phi_k.dtype.element_ty)
            grad += tl.dot(e, phi_k_c)
    fq_ptrs, _ = _chunk(phi_q + bh64 * L * F, j, L, F, C)
    phi_q_j = tl.load(fq_ptrs, mask=live, other=0.0)
    tl.store(mu + bh64 * L + t, tl.sum(phi_q_j.to(tl.float32) * grad, 1), mask=t < L)
    tl.store(out_ptrs, grad.to(d_phi_q.dtype.element_ty), mask=live)


@triton.jit
def backward_phi_k(grad_num, grad_den, v, phi_q, sums, q_sums, d_phi_k, L, n_chunks, H, HV, M,
                   sinks, C: tl.constexpr, D: tl.constexpr, F: tl.constexpr,
                   TERRACE: tl.constexpr):
    """dφk_s = Σ_{t whose window is after s} (gn_t·v_s + gd_t) φq_t, from `sums` (bh, n, F, D) =
    Σ φq^T gn and `q_sums` (bh, n, F) = Σ gd φq over the chunks after each chunk; zero for the
    sinks, never linear keys."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tl.arange(0, C)
    bh64 = bh.to(tl.int64)
    out_ptrs, live = _chunk(d_phi_k + bh64 * L * F, c, L, F, C)
    grad = tl.zeros([C, F], tl.float32)
    # sw: the queries of chunk j at or after the key's place, and every chunk after j; tk: the
    # chunks after j, the last that still has key chunk c in its windows.
    j = _last_window_chunk(c, M, TERRACE)
    if j < n_chunks:
        t = j * C + rows
        later = t < L
        v_ptrs, _ = _chunk(v + _head(bh, H, HV).to(tl.int64) * L * D, c, L, D, C)
        v_c = tl.load(v_ptrs, mask=live, other=0.0)
        # Σ φq^T gn as (D, F)
        s_ptrs = sums + (bh64 * n_chunks + j) * F * D + tl.arange(0, F)[None, :] * D \
            + tl.arange(0, D)[:, None]
        qg_t = tl.load(s_ptrs)
        r = tl.load(q_sums + (bh64 * n_chunks + j) * F + tl.arange(0, F))
        grad += tl.dot(v_c.to(qg_t.dtype), qg_t)
        grad += r[None, :]
        if not TERRACE:
            gn_ptrs, _ = _chunk(grad_num + bh64 * L * D, j, L, D, C)
            fq_ptrs, _ = _chunk(phi_q + bh64 * L * F, j, L, F, C)
            gn = tl.load(gn_ptrs, mask=later[:, None], other=0.0)
            gd = tl.load(grad_den + bh64 * L + t, mask=later, other=0.0)
            phi_q_j = tl.load(fq_ptrs, mask=later[:, None], other=0.0)
            # e[s, t] = gn_t·v_s + gd_t for query place t at or after key place s
            e = tl.dot(v_c, tl.trans(gn)) + gd[None, :]
            e = tl.where(rows[:, None] <= rows[None, :], e, 0.0).to(phi_q.dtype.element_ty)
            grad += tl.dot(e, phi_q_j)
    grad = tl.where((c * C + rows >= sinks)[:, None], grad, 0.0)
    tl.store(out_ptrs, grad.to(d_phi_k.dtype.element_ty), mask=live)


@triton.jit
def _window_score_grad(q_j, k_c, v_c, gn, gd, m, star, mu, gamma, t, key, M, sinks, scale,
                       C: tl.constexpr, TERRACE: tl.constexpr):
    """The window weights e = exp(s − m) of one (query chunk, key chunk) pair [C, C] (zero outside
    the windows and sinks) and the scores' gradient: γ·e·(gn_t·v_s + gd_t), plus mu_t at each
    query's largest score (through m_t)."""
    s = tl.dot(q_j, tl.trans(k_c)) * scale
    e = tl.where(_in_window(t, key, M, sinks, C, TERRACE), tl.exp(s - m[:, None]), 0.0)
    d = tl.dot(gn, tl.trans(v_c)) + gd[:, None]
    ds = gamma * e * d + tl.where(key[None, :] == star[:, None], mu[:, None], 0.0)
    return e, ds


@triton.jit
def _query_terms(q, grad_num, grad_den, maxes, argmaxes, mu, bh64, j, L, D: tl.constexpr,
                 C: tl.constexpr):
    """What the window backward reads of query chunk j: its places t, its rows' mask, q, gn, gd,
    the window max and argmax, and mu. Rows past L read zeros, so they add nothing."""
    t = j * C + tl.arange(0, C)
    q_ptrs, live = _chunk(q + bh64 * L * D, j, L, D, C)
    gn_ptrs, _ = _chunk(grad_num + bh64 * L * D, j, L, D, C)
    row = bh64 * L + t
    return (t, live, tl.load(q_ptrs, mask=live, other=0.0), tl.load(gn_ptrs, mask=live, other=0.0),
            tl.load(grad_den + row, mask=t < L, other=0.0),
            tl.load(maxes + row, mask=t < L, other=0.0),
            tl.load(argmaxes + row, mask=t < L, other=-1),
            tl.load(mu + row, mask=t < L, other=0.0))


@triton.jit
def _key_chunk_dq(q_j, k_base, v_base, c, t, gn, gd, m, star, mu_j, gamma, L, M, sinks, scale,
                  C: tl.constexpr, D: tl.constexpr, TERRACE: tl.constexpr):
    """Key chunk c's share of dq / scale [C, D] (f32) for query chunk rows q_j."""
    k_ptrs, keys_live = _chunk(k_base, c, L, D, C)
    v_ptrs, _ = _chunk(v_base, c, L, D, C)
    k_c = tl.load(k_ptrs, mask=keys_live, other=0.0)
    v_c = tl.load(v_ptrs, mask=keys_live, other=0.0)
    ds = _window_score_grad(q_j, k_c, v_c, gn, gd, m, star, mu_j, gamma, t,
                            c * C + tl.arange(0, C), M, sinks, scale, C, TERRACE)[1]
    return tl.dot(ds.to(k_c.dtype), k_c)


@triton.jit
def backward_q(q, k, v, grad_num, grad_den, maxes, argmaxes, mu, gammas, dq, L, H, HK, HV, M,
               sinks, scale, C: tl.constexpr, D: tl.constexpr, TERRACE: tl.constexpr):
    """dq (b, h, L, D): only the scores of the window and sinks depend on q."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    k_base = k + _head(bh, H, HK).to(tl.int64) * L * D
    v_base = v + _head(bh, H, HV).to(tl.int64) * L * D
    t, live, q_j, gn, gd, m, star, mu_j = _query_terms(q, grad_num, grad_den, maxes, argmaxes, mu,
                                                        bh64, j, L, D, C)
    gamma = tl.load(gammas + bh % H)
    grad = tl.zeros([C, D], tl.float32)
    # The forward's key chunks: the window range, then the sink chunks before it.
    first = _first_window_chunk(j, M, TERRACE)
    for i in tl.range(0, j - first + 1):
        grad += _key_chunk_dq(q_j, k_base, v_base, j - i, t, gn, gd, m, star, mu_j, gamma, L, M,
                              sinks, scale, C, D, TERRACE)
    for c in tl.range(0, _sink_chunks(first, sinks, C)):
        grad += _key_chunk_dq(q_j, k_base, v_base, c, t, gn, gd, m, star, mu_j, gamma, L, M,
                              sinks, scale, C, D, TERRACE)
    dq_ptrs, _ = _chunk(dq + bh64 * L * D, j, L, D, C)
    tl.store(dq_ptrs, (grad * scale).to(dq.dtype.element_ty), mask=live)


@triton.jit
def _linear_value_grad(phi_q, phi_k, grad_num, sums, bh64, c, j, L, n_chunks, sinks,
                       C: tl.constexpr, D: tl.constexpr, F: tl.constexpr, TERRACE: tl.constexpr):
    """The linear terms' share of dv for key chunk c [C, D] (f32), none for the sinks: the
    queries after chunk j through `sums` (bh, n, F, D) = Σ φq^T gn over the chunks after each
    chunk, and for sw (TERRACE false) the queries of chunk j at or after each key's place in its
    chunk."""
    rows = tl.arange(0, C)
    # Σ φq^T gn over the chunks after j, (F, D)
    s_ptrs = sums + (bh64 * n_chunks + j) * F * D + tl.arange(0, F)[:, None] * D \
        + tl.arange(0, D)[None, :]
    qg = tl.load(s_ptrs)
    fk_ptrs, keys_live = _chunk(phi_k + bh64 * L * F, c, L, F, C)
    phi_k_c = tl.load(fk_ptrs, mask=keys_live & (c * C + rows >= sinks)[:, None], other=0.0)
    grad = tl.dot(phi_k_c.to(qg.dtype), qg)
    if not TERRACE:
        t = j * C + rows
        later = t < L
        fq_ptrs, _ = _chunk(phi_q + bh64 * L * F, j, L, F, C)
        gn_ptrs, _ = _chunk(grad_num + bh64 * L * D, j, L, D, C)
        phi_q_j = tl.load(fq_ptrs, mask=later[:, None], other=0.0)
        gn = tl.load(gn_ptrs, mask=later[:, None], other=0.0)
        # a[s, t] = φq_t·φk_s for query place t at or after key place s
        a = tl.dot(phi_k_c, tl.trans(phi_q_j))
        a = tl.where(rows[:, None] <= rows[None, :], a, 0.0).to(gn.dtype)
        grad += tl.dot(a, gn)
    return grad


@triton.jit
def _window_kv_grads(q, grad_num, grad_den, maxes, argmaxes, mu, k_c, v_c, key, gamma, bh64, lo,
                     hi, L, M, sinks, scale, C: tl.constexpr, D: tl.constexpr,
                     TERRACE: tl.constexpr):
    """The window and sink scores' share of dk / scale and of dv [C, D] (f32) for the key chunk
    rows k_c, v_c at places `key`, from query chunks lo .. hi − 1."""
    grad_k = tl.zeros([C, D], tl.float32)
    grad_v = tl.zeros([C, D], tl.float32)
    for j in tl.range(lo, hi):
        t, _, q_j, gn, gd, m, star, mu_j = _query_terms(q, grad_num, grad_den, maxes, argmaxes, mu,
                                                         bh64, j, L, D, C)
        e, ds = _window_score_grad(q_j, k_c, v_c, gn, gd, m, star, mu_j, gamma, t, key, M,
                                   sinks, scale, C, TERRACE)
        grad_v += tl.dot(tl.trans((gamma * e).to(gn.dtype)), gn)
        grad_k += tl.dot(tl.trans(ds.to(q_j.dtype)), q_j)
    return grad_k, grad_v


@triton.jit
def backward_kv(q, k, v, phi_q, phi_k, grad_num, grad_den, maxes, argmaxes, mu, gammas, sums,
                dk, dv, L, n_chunks, H, HK, HV, M, sinks, scale,
                C: tl.constexpr, D: tl.constexpr, F: tl.constexpr, TERRACE: tl.constexpr):
    """dk and dv (b, h, L, D) per query head (the caller sums heads that share a key or value
    head): window scores over the query chunks whose windows reach key chunk c, and for dv the
    linear terms, from `sums` (bh, n, F, D) = Σ φq^T gn over the chunks after each chunk. The
    sinks' scores from the query chunks after that are `backward_sink_kv`'s."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    key = c * C + tl.arange(0, C)
    bh64 = bh.to(tl.int64)
    k_ptrs, live = _chunk(k + _head(bh, H, HK).to(tl.int64) * L * D, c, L, D, C)
    v_ptrs, _ = _chunk(v + _head(bh, H, HV).to(tl.int64) * L * D, c, L, D, C)
    k_c = tl.load(k_ptrs, mask=live, other=0.0)
    v_c = tl.load(v_ptrs, mask=live, other=0.0)
    gamma = tl.load(gammas + bh % H)
    j = _last_window_chunk(c, M, TERRACE)
    grad_k, grad_v = _window_kv_grads(q, grad_num, grad_den, maxes, argmaxes, mu, k_c, v_c, key,
                                      gamma, bh64, c, tl.minimum(j, n_chunks - 1) + 1, L, M,
                                      sinks, scale, C, D, TERRACE)
    if j < n_chunks:
        grad_v += _linear_value_grad(phi_q, phi_k, grad_num, sums, bh64, c, j, L, n_chunks,
                                     sinks, C, D, F, TERRACE)
    out = bh64 * L * D + key[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(dk + out, (grad_k * scale).to(dk.dtype.element_ty), mask=live)
    tl.store(dv + out, grad_v.to(dv.dtype.element_ty), mask=live)


@triton.jit
def backward_sink_kv(q, k, v, grad_num, grad_den, maxes, argmaxes, mu, gammas, part_k, part_v, L,
                     n_chunks, H, HK, HV, M, sinks, seg_len, scale, C: tl.constexpr,
                     D: tl.constexpr, TERRACE: tl.constexpr):
    """The sink chunks' dk and dv from the query chunks after their window range, which
    `backward_kv` leaves out: program (s, bh) sums query chunks s·seg_len .. (s + 1)·seg_len − 1
    into part_k and part_v (bh, segments, sink chunks · C, D) in f32, which the caller sums over
    segments and adds. Segments spread a sink's work, which grows with the sequence, over the
    grid instead of one long program per head."""
    seg = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tl.arange(0, C)
    bh64 = bh.to(tl.int64)
    k_base = k + _head(bh, H, HK).to(tl.int64) * L * D
    v_base = v + _head(bh, H, HV).to(tl.int64) * L * D
    gamma = tl.load(gammas + bh % H)
    n_sink = (sinks + C - 1) // C
    part = (bh64 * tl.num_programs(0) + seg) * n_sink * C * D + rows[:, None] * D \
        + tl.arange(0, D)[None, :]
    for c in tl.range(0, n_sink):
        k_ptrs, live = _chunk(k_base, c, L, D, C)
        v_ptrs, _ = _chunk(v_base, c, L, D, C)
        k_c = tl.load(k_ptrs, mask=live, other=0.0)
        v_c = tl.load(v_ptrs, mask=live, other=0.0)
        lo = tl.maximum(seg * seg_len, _last_window_chunk(c, M, TERRACE) + 1)
        hi = tl.minimum((seg + 1) * seg_len, n_chunks)
        grad_k, grad_v = _window_kv_grads(q, grad_num, grad_den, maxes, argmaxes, mu, k_c, v_c,
                                          c * C + rows, gamma, bh64, lo, hi, L, M, sinks, scale,
                                          C, D, TERRACE)
        tl.store(part_k + part + c * C * D, grad_k * scale)
        tl.store(part_v + part + c * C * D, grad_v)


@triton.jit
def linear_backward_v(phi_q, phi_k, grad_num, sums, dv, L, n_chunks, C: tl.constexpr,
                      D: tl.constexpr, F: tl.constexpr):
    """Normalised linear attention's dv (b, h, L, D) per query head (the caller sums heads that
    share a value head), from `sums` (bh, n, F, D) = Σ φq^T gn over the chunks after each chunk."""
    c = tl.program_id(0)
    bh64 = tl.program_id(1).to(tl.int64)
    grad = _linear_value_grad(phi_q, phi_k, grad_num, sums, bh64, c, c, L, n_chunks, 0, C, D, F,
                              False)
    dv_ptrs, live = _chunk(dv + bh64 * L * D, c, L, D, C)
    tl.store(dv_ptrs, grad.to(dv.dtype.element_ty), mask=live)
