"""Fused gated linear attention with per-key-dim log-gates (defined in linearize-attention's
`ops/gla/mod.rs`) for whole sequences from the empty state, forward and backward:

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = q_t S_t,   g_t <= 0

no normaliser, no scale. Tokens go in chunks of C, each split into sub-chunks of BC. With gc the
cumulative log-gates from a chunk's start (through t), the state entering chunk j is H_j and

    o_t = (q_t ⊙ exp(gc_t)) H_j + Σ_{s <= t in chunk j} A_ts v_s,
    A_ts = Σ_k q_tk k_sk exp(gc_tk − gc_sk).

Every exponent taken is <= 0, so nothing overflows however strong the decay: the state update
uses exp(G − gc) (G the chunk's total), scores between sub-chunks are split at a reference row of
the later sub-chunk (both factors decay forward in time), and scores within a diagonal sub-chunk
are summed over k one key at a time, exactly, with exp(gc_t − gc_s) for s <= t only.

Backward, with do = dL/do: D_j = dL/dH_{j+1} comes from a reverse scan; dA = do v^T (s <= t);
dq, dk, dv are the transposes of the forward's products; and since q_t meets the gates only as
q_t ⊙ exp(B_t) and k_s only as k_s ⊙ exp(−B_s) (B the cumulative log-gate over the sequence),
dL/dB_t = q_t ⊙ dq_t − k_t ⊙ dk_t and dg_t = Σ_{τ >= t} dL/dB_τ, a reverse cumulative sum over the
whole sequence.

Tensors are contiguous: q (b, h, L, K), k (b, h_k, L, K), v (b, h_v, L, V), log-gates (b, h_g, L,
K) in f32; key, value and gate heads are shared by H / HK, H / HV and H / HG query heads. Every
per-chunk scratch tensor is per query head bh and padded to n·C rows (Lp). Gradients of k and v
are per query head (the caller sums heads that share one), and so is dg's.
"""
import triton
import triton.language as tl


@triton.jit
def _head(bh, H, HX):
    """Row of (b·HX + head) for query batch-head bh when HX heads serve H query heads."""
    return (bh // H) * HX + (bh % H) // (H // HX)


@triton.jit
def _rows(base, t, cols, WIDTH: tl.constexpr):
    """Pointers to rows t, columns cols of a (rows, WIDTH) matrix at base."""
    return base + t[:, None] * WIDTH + cols[None, :]


@triton.jit
def chunk_cumsum(g, gc, L, Lp, C: tl.constexpr, K: tl.constexpr):
    """gc (b·h_g, Lp, K) f32: the log-gates summed from each chunk's start through each token;
    padding rows hold the chunk's total (their gate is 1). Program (chunk, gate head)."""
    j = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    t = j * C + tl.arange(0, C)
    cols = tl.arange(0, K)
    x = tl.load(_rows(g + bh * L * K, t, cols, K), mask=(t < L)[:, None], other=0.0)
    tl.store(_rows(gc + bh * Lp * K, t, cols, K), tl.cumsum(x, 0))


@triton.jit
def forward_states(k, v, gc, hs, L, Lp, n_chunks, H, HK, HV, HG, C: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """hs (b·h, n, K, V) in v's dtype: the state entering each chunk, from the empty state.
    Program (block of BK keys · V / BV + block of BV values, bh)."""
    ik = tl.program_id(0) // (V // BV)
    iv = tl.program_id(0) % (V // BV)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    rk = ik * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    k_base = k + _head(bh, H, HK).to(tl.int64) * L * K
    v_base = v + _head(bh, H, HV).to(tl.int64) * L * V
    g_base = gc + _head(bh, H, HG).to(tl.int64) * Lp * K
    out = hs + bh64 * n_chunks * K * V + rk[:, None] * V + rv[None, :]
    state = tl.zeros([BK, BV], tl.float32)
    for c in tl.range(0, n_chunks):
        tl.store(out + c * K * V, state.to(hs.dtype.element_ty))
        t = c * C + tl.arange(0, C)
        live = (t < L)[:, None]
        k_c = tl.load(_rows(k_base, t, rk, K), mask=live, other=0.0)
        v_c = tl.load(_rows(v_base, t, rv, V), mask=live, other=0.0)
        g_c = tl.load(_rows(g_base, t, rk, K))
        total = tl.load(g_base + (c * C + C - 1) * K + rk)
        # Each key decayed to the chunk's end: exp(G − gc_s) <= 1.
        k_end = (k_c * tl.exp(total[None, :] - g_c)).to(v.dtype.element_ty)
        state = state * tl.exp(total)[:, None] + tl.dot(tl.trans(k_end), v_c)


@triton.jit
def forward_scores(q, k, gc, A, L, Lp, H, HK, HG, C: tl.constexpr, BC: tl.constexpr,
                   K: tl.constexpr):
    """A (b·h, Lp, C) f32: the decayed scores A_ts of each chunk (zero for s > t), for the rows of
    one sub-chunk i. Program (chunk · C / BC + i, bh)."""
    NS: tl.constexpr = C // BC
    j = tl.program_id(0) // NS
    i = tl.program_id(0) % NS
    bh = tl.program_id(1)
    ri = tl.arange(0, BC)
    cols = tl.arange(0, K)
    t = j * C + i * BC + ri
    q_base = q + bh.to(tl.int64) * L * K
    k_base = k + _head(bh, H, HK).to(tl.int64) * L * K
    g_base = gc + _head(bh, H, HG).to(tl.int64) * Lp * K
    a_base = A + bh.to(tl.int64) * Lp * C + t[:, None] * C
    q_i = tl.load(_rows(q_base, t, cols, K), mask=(t < L)[:, None], other=0.0).to(tl.float32)
    g_i = tl.load(_rows(g_base, t, cols, K))
    # Earlier sub-chunks, split at the first row r of sub-chunk i: exp(gc_t − gc_r) and
    # exp(gc_r − gc_s) are decays over forward spans.
    g_ref = tl.load(g_base + (j * C + i * BC) * K + cols)
    q_ref = (q_i * tl.exp(g_i - g_ref[None, :])).to(q.dtype.element_ty)
    for jj in tl.range(0, i):
        s = j * C + jj * BC + ri
        k_s = tl.load(_rows(k_base, s, cols, K), mask=(s < L)[:, None], other=0.0)
        g_s = tl.load(_rows(g_base, s, cols, K))
        k_ref = (k_s * tl.exp(g_ref[None, :] - g_s)).to(k.dtype.element_ty)
        tl.store(a_base + jj * BC + ri[None, :], tl.dot(q_ref, tl.trans(k_ref)))
    # The diagonal sub-chunk, one key at a time, in f32.
    diagonal = tl.zeros([BC, BC], tl.float32)
    for s in tl.range(0, BC):
        row = j * C + i * BC + s
        k_r = tl.load(k_base + row * K + cols, mask=(row < L) & (cols < K), other=0.0)
        g_r = tl.load(g_base + row * K + cols)
        causal = ri[:, None] >= s
        decay = tl.exp(tl.where(causal, g_i - g_r[None, :], 0.0))
        column = tl.sum(tl.where(causal, q_i * k_r.to(tl.float32)[None, :] * decay, 0.0), 1)
        diagonal = tl.where(ri[None, :] == s, column[:, None], diagonal)
    tl.store(a_base + i * BC + ri[None, :], diagonal)
    for jj in tl.range(i + 1, NS):
        tl.store(a_base + jj * BC + ri[None, :], tl.zeros([BC, BC], tl.float32))


@triton.jit
def forward_output(q, v, gc, hs, A, o, L, Lp, n_chunks, H, HV, HG, C: tl.constexpr,
                   K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """o (b, h, L, V) in v's dtype. Program (chunk · V / BV + block of BV values, bh)."""
    j = tl.program_id(0) // (V // BV)
    iv = tl.program_id(0) % (V // BV)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    t = j * C + tl.arange(0, C)
    live = (t < L)[:, None]
    cols = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    q_j = tl.load(_rows(q + bh64 * L * K, t, cols, K), mask=live, other=0.0)
    g_j = tl.load(_rows(gc + _head(bh, H, HG).to(tl.int64) * Lp * K, t, cols, K))
    state = tl.load(hs + (bh64 * n_chunks + j) * K * V + cols[:, None] * V + rv[None, :])
    out = tl.dot((q_j * tl.exp(g_j)).to(v.dtype.element_ty), state)
    a = tl.load(_rows(A + bh64 * Lp * C, t, tl.arange(0, C), C))
    v_j = tl.load(_rows(v + _head(bh, H, HV).to(tl.int64) * L * V, t, rv, V), mask=live,
                  other=0.0)
    out += tl.dot(a.to(v.dtype.element_ty), v_j)
    tl.store(_rows(o + bh64 * L * V, t, rv, V), out.to(o.dtype.element_ty), mask=live)


@triton.jit
def backward_states(q, do, gc, dhs, L, Lp, n_chunks, H, HG, C: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """dhs (b·h, n, K, V) in do's dtype: dL/dH_{j+1}, the gradient of the state leaving each
    chunk j (zero for the last). Program (block of keys · V / BV + block of values, bh)."""
    ik = tl.program_id(0) // (V // BV)
    iv = tl.program_id(0) % (V // BV)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    rk = ik * BK + tl.arange(0, BK)
    rv = iv * BV + tl.arange(0, BV)
    q_base = q + bh64 * L * K
    do_base = do + bh64 * L * V
    g_base = gc + _head(bh, H, HG).to(tl.int64) * Lp * K
    out = dhs + bh64 * n_chunks * K * V + rk[:, None] * V + rv[None, :]
    grad = tl.zeros([BK, BV], tl.float32)
    for i in tl.range(0, n_chunks):
        c = n_chunks - 1 - i
        tl.store(out + c * K * V, grad.to(dhs.dtype.element_ty))
        t = c * C + tl.arange(0, C)
        live = (t < L)[:, None]
        q_c = tl.load(_rows(q_base, t, rk, K), mask=live, other=0.0)
        do_c = tl.load(_rows(do_base, t, rv, V), mask=live, other=0.0)
        g_c = tl.load(_rows(g_base, t, rk, K))
        total = tl.load(g_base + (c * C + C - 1) * K + rk)
        q_start = (q_c * tl.exp(g_c)).to(do.dtype.element_ty)
        grad = grad * tl.exp(total)[:, None] + tl.dot(tl.trans(q_start), do_c)


@triton.jit
def backward_scores(do, v, dA, L, Lp, H, HV, C: tl.constexpr, V: tl.constexpr):
    """dA (b·h, Lp, C) f32 = do_t·v_s of each chunk for s <= t, zero above. Program (chunk, bh)."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    rows = tl.arange(0, C)
    t = j * C + rows
    live = (t < L)[:, None]
    cols = tl.arange(0, V)
    do_j = tl.load(_rows(do + bh64 * L * V, t, cols, V), mask=live, other=0.0)
    v_j = tl.load(_rows(v + _head(bh, H, HV).to(tl.int64) * L * V, t, cols, V), mask=live,
                  other=0.0)
    grad = tl.where(rows[None, :] <= rows[:, None], tl.dot(do_j, tl.trans(v_j)), 0.0)
    tl.store(_rows(dA + bh64 * Lp * C, t, rows, C), grad)


@triton.jit
def backward_intra(q, k, gc, dA, dq, dk, L, Lp, H, HK, HG, C: tl.constexpr, BC: tl.constexpr,
                   K: tl.constexpr):
    """The in-chunk parts of dq and dk (b·h, L, K) f32 for the rows of sub-chunk i:
    dq_t = Σ_{s <= t} dA_ts exp(gc_t − gc_s) ⊙ k_s and dk_s = Σ_{t >= s} dA_ts exp(gc_t − gc_s) ⊙ q_t,
    split like the forward's scores. Program (chunk · C / BC + i, bh)."""
    NS: tl.constexpr = C // BC
    j = tl.program_id(0) // NS
    i = tl.program_id(0) % NS
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    ri = tl.arange(0, BC)
    cols = tl.arange(0, K)
    t = j * C + i * BC + ri
    live = (t < L)[:, None]
    q_base = q + bh64 * L * K
    k_base = k + _head(bh, H, HK).to(tl.int64) * L * K
    g_base = gc + _head(bh, H, HG).to(tl.int64) * Lp * K
    da_base = dA + bh64 * Lp * C
    g_i = tl.load(_rows(g_base, t, cols, K))

    # dq from earlier sub-chunks, split at the first row r of sub-chunk i.
    g_ref = tl.load(g_base + (j * C + i * BC) * K + cols)
    grad_q = tl.zeros([BC, K], tl.float32)
    for jj in tl.range(0, i):
        s = j * C + jj * BC + ri
        k_s = tl.load(_rows(k_base, s, cols, K), mask=(s < L)[:, None], other=0.0)
        g_s = tl.load(_rows(g_base, s, cols, K))
        k_ref = (k_s * tl.exp(g_ref[None, :] - g_s)).to(k.dtype.element_ty)
        da = tl.load(_rows(da_base, t, jj * BC + ri, C)).to(k.dtype.element_ty)
        grad_q += tl.dot(da, k_ref)
    grad_q *= tl.exp(g_i - g_ref[None, :])
    # dk from later sub-chunks, split at the last row m of sub-chunk i.
    g_end = tl.load(g_base + (j * C + i * BC + BC - 1) * K + cols)
    grad_k = tl.zeros([BC, K], tl.float32)
    for jj in tl.range(i + 1, NS):
        u = j * C + jj * BC + ri
        q_u = tl.load(_rows(q_base, u, cols, K), mask=(u < L)[:, None], other=0.0)
        g_u = tl.load(_rows(g_base, u, cols, K))
        q_end = (q_u * tl.exp(g_u - g_end[None, :])).to(q.dtype.element_ty)
        da = tl.load(_rows(da_base, u, i * BC + ri, C)).to(q.dtype.element_ty)
        grad_k += tl.dot(tl.trans(da), q_end)
    grad_k *= tl.exp(g_end[None, :] - g_i)

    # The diagonal sub-chunk, one token at a time, in f32: row s as the key of dq's sum, and as
    # the query of dk's.
    for s in tl.range(0, BC):
        row = j * C + i * BC + s
        inside = (row < L) & (cols < K)
        g_r = tl.load(g_base + row * K + cols)
        k_r = tl.load(k_base + row * K + cols, mask=inside, other=0.0).to(tl.float32)
        q_r = tl.load(q_base + row * K + cols, mask=inside, other=0.0).to(tl.float32)
        later = ri[:, None] >= s
        da_col = tl.load(da_base + t * C + i * BC + s)  # dA_ts for the rows t, key s
        decay = tl.exp(tl.where(later, g_i - g_r[None, :], 0.0))
        grad_q += tl.where(later, da_col[:, None] * k_r[None, :] * decay, 0.0)
        earlier = ri[:, None] <= s
        da_row = tl.load(da_base + row * C + i * BC + ri)  # dA_st for query s, the keys t
        decay = tl.exp(tl.where(earlier, g_r[None, :] - g_i, 0.0))
        grad_k += tl.where(earlier, da_row[:, None] * q_r[None, :] * decay, 0.0)
    tl.store(_rows(dq + bh64 * L * K, t, cols, K), grad_q, mask=live)
    tl.store(_rows(dk + bh64 * L * K, t, cols, K), grad_k, mask=live)


@triton.jit
def backward_dv(k, gc, A, do, dhs, dv, L, Lp, n_chunks, H, HK, HG, C: tl.constexpr,
                K: tl.constexpr, V: tl.constexpr, BV: tl.constexpr):
    """dv (b, h, L, V) per query head: Σ_{t >= s in chunk} A_ts do_t plus the key decayed to the
    chunk's end times D_j. Program (chunk · V / BV + block of values, bh)."""
    j = tl.program_id(0) // (V // BV)
    iv = tl.program_id(0) % (V // BV)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    t = j * C + tl.arange(0, C)
    live = (t < L)[:, None]
    cols = tl.arange(0, K)
    rv = iv * BV + tl.arange(0, BV)
    g_base = gc + _head(bh, H, HG).to(tl.int64) * Lp * K
    k_j = tl.load(_rows(k + _head(bh, H, HK).to(tl.int64) * L * K, t, cols, K), mask=live,
                  other=0.0)
    g_j = tl.load(_rows(g_base, t, cols, K))
    total = tl.load(g_base + (j * C + C - 1) * K + cols)
    k_end = (k_j * tl.exp(total[None, :] - g_j)).to(do.dtype.element_ty)
    grad_state = tl.load(dhs + (bh64 * n_chunks + j) * K * V + cols[:, None] * V + rv[None, :])
    grad = tl.dot(k_end, grad_state)
    a = tl.load(_rows(A + bh64 * Lp * C, t, tl.arange(0, C), C)).to(do.dtype.element_ty)
    do_j = tl.load(_rows(do + bh64 * L * V, t, rv, V), mask=live, other=0.0)
    grad += tl.dot(tl.trans(a), do_j)
    tl.store(_rows(dv + bh64 * L * V, t, rv, V), grad.to(dv.dtype.element_ty), mask=live)


@triton.jit
def backward_inter(q, k, v, gc, hs, dhs, do, dq_intra, dk_intra, dq, dk, dgs, L, Lp, n_chunks,
                   H, HK, HV, HG, C: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BK: tl.constexpr):
    """dq (b, h, L, K) in q's dtype and dk per query head: the in-chunk parts plus the state's,
    dq_t += exp(gc_t) ⊙ (do_t H_j^T) and dk_s += exp(G − gc_s) ⊙ (v_s D_j^T); and
    dgs (b, h, L, K) f32 = q ⊙ dq − k ⊙ dk, dL/dB before its reverse cumulative sum. Program
    (chunk · K / BK + block of keys, bh)."""
    j = tl.program_id(0) // (K // BK)
    ik = tl.program_id(0) % (K // BK)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    t = j * C + tl.arange(0, C)
    live = (t < L)[:, None]
    rk = ik * BK + tl.arange(0, BK)
    vc = tl.arange(0, V)
    g_base = gc + _head(bh, H, HG).to(tl.int64) * Lp * K
    q_j = tl.load(_rows(q + bh64 * L * K, t, rk, K), mask=live, other=0.0).to(tl.float32)
    k_j = tl.load(_rows(k + _head(bh, H, HK).to(tl.int64) * L * K, t, rk, K), mask=live,
                  other=0.0).to(tl.float32)
    g_j = tl.load(_rows(g_base, t, rk, K))
    total = tl.load(g_base + (j * C + C - 1) * K + rk)
    do_j = tl.load(_rows(do + bh64 * L * V, t, vc, V), mask=live, other=0.0)
    v_j = tl.load(_rows(v + _head(bh, H, HV).to(tl.int64) * L * V, t, vc, V), mask=live,
                  other=0.0)
    # H_j^T and D_j^T as (V, BK)
    offsets = (bh64 * n_chunks + j) * K * V + rk[None, :] * V + vc[:, None]
    state_t = tl.load(hs + offsets)
    grad_state_t = tl.load(dhs + offsets)
    # Offsets of this block in the (b·h, L, K) tensors.
    scratch = _rows(bh64 * L * K, t, rk, K)
    grad_q = tl.load(dq_intra + scratch, mask=live, other=0.0) \
        + tl.exp(g_j) * tl.dot(do_j, state_t)
    grad_k = tl.load(dk_intra + scratch, mask=live, other=0.0) \
        + tl.exp(total[None, :] - g_j) * tl.dot(v_j, grad_state_t)
    tl.store(dq + scratch, grad_q.to(dq.dtype.element_ty), mask=live)
    tl.store(dk + scratch, grad_k.to(dk.dtype.element_ty), mask=live)
    tl.store(dgs + scratch, q_j * grad_q - k_j * grad_k, mask=live)


@triton.jit
def reverse_cumsum(x, out, L, n_chunks, C: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    """out (b·h, L, K) f32 = Σ_{τ >= t} x_τ over the whole sequence. Program (block of BK, bh)."""
    rk = tl.program_id(0) * BK + tl.arange(0, BK)
    base = tl.program_id(1).to(tl.int64) * L * K
    after = tl.zeros([BK], tl.float32)
    for i in tl.range(0, n_chunks):
        c = n_chunks - 1 - i
        t = c * C + tl.arange(0, C)
        live = (t < L)[:, None]
        x_c = tl.load(_rows(x + base, t, rk, K), mask=live, other=0.0)
        total = tl.sum(x_c, 0)
        # Through each row from the chunk's end: the total less what came before the row.
        tl.store(_rows(out + base, t, rk, K), after[None, :] + total[None, :] - tl.cumsum(x_c, 0)
                 + x_c, mask=live)
        after += total
