"""Fused LoLCATs sliding-window attention (DESIGN.md "LoLCATs", `sw`) for whole sequences from the
empty state, forward and the backward to the feature maps and the window factors, in chunks of C
tokens. The window is w = M·C tokens: query t sees keys t − w < s <= t through γ·exp(s − m_t), the
keys s <= t − w through φq_t·φk_s, one normaliser over both.

For query chunk j the linear keys are every chunk before j − M (one carried sum) and the tokens of
chunk j − M at or before the query's place in its chunk; the window keys are the rest of chunk
j − M and chunks j − M + 1 … j. Tensors are contiguous (b, heads, L, dim); program (i, bh) works on
chunk i of batch-head bh; key and value heads are shared by H / HK and H / HV query heads.

The backward needs no pass over the window: with g = dL/dy, gn_t = g_t / den_t and
gd_t = −g_t·y_t / den_t, the linear scores' gradient is gn_t·v_s + gd_t, and y is unchanged when
γ and φq scale together, so dγ = −Σ_t φq_t·dφq_t / γ (summed by the caller).
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
def chunk_sums(a, bm, weights, sums, weight_sums, L, n_chunks, H, HA, HB,
               C: tl.constexpr, F: tl.constexpr, D: tl.constexpr, BF: tl.constexpr,
               REVERSE: tl.constexpr, WEIGHTED: tl.constexpr):
    """sums[bh, c] = Σ over the chunks before c (after c when REVERSE) of a_c^T b_c, (F, D) in b's
    dtype, and weight_sums[bh, c] = Σ_t w_t a_t over the same tokens, (F) in f32, w = 1 unless
    WEIGHTED (then `weights` (b, h, L) f32). One program per (bh, block of BF features)."""
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
        a_c = tl.load(a_base + t[:, None] * F + cols[None, :], mask=live[:, None], other=0.0)
        b_c = tl.load(b_base + t[:, None] * D + tl.arange(0, D)[None, :], mask=live[:, None],
                      other=0.0)
        acc += tl.dot(tl.trans(a_c), b_c)
        if WEIGHTED:
            w = tl.load(weights + bh.to(tl.int64) * L + t, mask=live, other=0.0)
            wacc += tl.sum(a_c.to(tl.float32) * w[:, None], 0)
        else:
            wacc += tl.sum(a_c.to(tl.float32), 0)


@triton.jit
def forward(q, k, v, phi_q, phi_k, sums, k_sums, gammas, y, den, L, n_chunks, H, HK, HV, M,
            scale, C: tl.constexpr, D: tl.constexpr, F: tl.constexpr):
    """y (b, h, L, D) in v's dtype and the normaliser den (b, h, L) in f32, from the key-feature
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

    # Window: chunk j first (its diagonal makes every row's max finite), then back to j − M.
    m = tl.full([C], float("-inf"), tl.float32)
    w_den = tl.zeros([C], tl.float32)
    w_num = tl.zeros([C, D], tl.float32)
    for i in tl.range(0, M + 1):
        c = j - i
        if c >= 0:
            k_ptrs, keys_live = _chunk(k_base, c, L, D, C)
            v_ptrs, _ = _chunk(v_base, c, L, D, C)
            k_c = tl.load(k_ptrs, mask=keys_live, other=0.0)
            v_c = tl.load(v_ptrs, mask=keys_live, other=0.0)
            s = tl.dot(q_j, tl.trans(k_c)) * scale
            key = c * C + rows
            inside = (key[None, :] <= t[:, None]) & (key[None, :] > t[:, None] - M * C)
            s = tl.where(inside, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            # Numerator and denominator read the same rounded weights.
            p = tl.exp(s - m_new[:, None]).to(v.dtype.element_ty)
            w_den = w_den * alpha + tl.sum(p.to(tl.float32), 1)
            w_num = w_num * alpha[:, None] + tl.dot(p, v_c)
            m = m_new

    gamma = tl.load(gammas + bh % H)
    num = gamma * w_num
    total = gamma * w_den
    c = j - M
    if c >= 0:
        fq_ptrs, _ = _chunk(phi_q + bh64 * L * F, j, L, F, C)
        phi_q_j = tl.load(fq_ptrs, mask=live, other=0.0)
        s_ptrs = sums + (bh64 * n_chunks + c) * F * D + tl.arange(0, F)[:, None] * D \
            + tl.arange(0, D)[None, :]
        kv = tl.load(s_ptrs)
        z = tl.load(k_sums + (bh64 * n_chunks + c) * F + tl.arange(0, F))
        num += tl.dot(phi_q_j, kv)
        total += tl.sum(phi_q_j.to(tl.float32) * z[None, :], 1)
        fk_ptrs, _ = _chunk(phi_k + bh64 * L * F, c, L, F, C)
        v_ptrs, _ = _chunk(v_base, c, L, D, C)
        phi_k_c = tl.load(fk_ptrs)
        v_c = tl.load(v_ptrs)
        a = tl.dot(phi_q_j, tl.trans(phi_k_c))
        a = tl.where(rows[None, :] <= rows[:, None], a, 0.0).to(v.dtype.element_ty)
        num += tl.dot(a, v_c)
        total += tl.sum(a.to(tl.float32), 1)

    y_ptrs, _ = _chunk(y + bh64 * L * D, j, L, D, C)
    tl.store(y_ptrs, (num / total[:, None]).to(y.dtype.element_ty), mask=live)
    tl.store(den + bh64 * L + t, total, mask=t < L)


@triton.jit
def backward_phi_q(grad_num, grad_den, v, phi_k, sums, k_sums, d_phi_q, L, n_chunks, H, HV, M,
                   C: tl.constexpr, D: tl.constexpr, F: tl.constexpr):
    """dφq_t = Σ_{s <= t − w} (gn_t·v_s + gd_t) φk_s, from the forward's sums."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tl.arange(0, C)
    t = j * C + rows
    bh64 = bh.to(tl.int64)
    out_ptrs, live = _chunk(d_phi_q + bh64 * L * F, j, L, F, C)
    grad = tl.zeros([C, F], tl.float32)
    c = j - M
    if c >= 0:
        gn_ptrs, _ = _chunk(grad_num + bh64 * L * D, j, L, D, C)
        gn = tl.load(gn_ptrs, mask=live, other=0.0)
        gd = tl.load(grad_den + bh64 * L + t, mask=t < L, other=0.0)
        # kv^T as (D, F)
        s_ptrs = sums + (bh64 * n_chunks + c) * F * D + tl.arange(0, F)[None, :] * D \
            + tl.arange(0, D)[:, None]
        kv_t = tl.load(s_ptrs)
        z = tl.load(k_sums + (bh64 * n_chunks + c) * F + tl.arange(0, F))
        grad += tl.dot(gn, kv_t)
        grad += gd[:, None] * z[None, :]
        v_ptrs, _ = _chunk(v + _head(bh, H, HV).to(tl.int64) * L * D, c, L, D, C)
        fk_ptrs, _ = _chunk(phi_k + bh64 * L * F, c, L, F, C)
        v_c = tl.load(v_ptrs)
        phi_k_c = tl.load(fk_ptrs)
        e = tl.dot(gn, tl.trans(v_c)) + gd[:, None]
        e = tl.where(rows[None, :] <= rows[:, None], e, 0.0).to(phi_k.dtype.element_ty)
        grad += tl.dot(e, phi_k_c)
    tl.store(out_ptrs, grad.to(d_phi_q.dtype.element_ty), mask=live)


@triton.jit
def backward_phi_k(grad_num, grad_den, v, phi_q, sums, q_sums, d_phi_k, L, n_chunks, H, HV, M,
                   C: tl.constexpr, D: tl.constexpr, F: tl.constexpr):
    """dφk_s = Σ_{t >= s + w} (gn_t·v_s + gd_t) φq_t, from `sums` (bh, n, F, D) = Σ φq^T gn and
    `q_sums` (bh, n, F) = Σ gd φq over the chunks after each chunk."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    rows = tl.arange(0, C)
    bh64 = bh.to(tl.int64)
    out_ptrs, live = _chunk(d_phi_k + bh64 * L * F, c, L, F, C)
    grad = tl.zeros([C, F], tl.float32)
    j = c + M
    if j < n_chunks:
        t = j * C + rows
        later = t < L
        v_ptrs, _ = _chunk(v + _head(bh, H, HV).to(tl.int64) * L * D, c, L, D, C)
        v_c = tl.load(v_ptrs)
        # Σ φq^T gn as (D, F)
        s_ptrs = sums + (bh64 * n_chunks + j) * F * D + tl.arange(0, F)[None, :] * D \
            + tl.arange(0, D)[:, None]
        qg_t = tl.load(s_ptrs)
        r = tl.load(q_sums + (bh64 * n_chunks + j) * F + tl.arange(0, F))
        grad += tl.dot(v_c, qg_t)
        grad += r[None, :]
        gn_ptrs, _ = _chunk(grad_num + bh64 * L * D, j, L, D, C)
        fq_ptrs, _ = _chunk(phi_q + bh64 * L * F, j, L, F, C)
        gn = tl.load(gn_ptrs, mask=later[:, None], other=0.0)
        gd = tl.load(grad_den + bh64 * L + t, mask=later, other=0.0)
        phi_q_j = tl.load(fq_ptrs, mask=later[:, None], other=0.0)
        # e[s, t] = gn_t·v_s + gd_t for query place t at or after key place s
        e = tl.dot(v_c, tl.trans(gn)) + gd[None, :]
        e = tl.where(rows[:, None] <= rows[None, :], e, 0.0).to(phi_q.dtype.element_ty)
        grad += tl.dot(e, phi_q_j)
    tl.store(out_ptrs, grad.to(d_phi_k.dtype.element_ty), mask=live)
