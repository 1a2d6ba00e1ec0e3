"""Runs the fused LoLCATs kernels (lolcats.py) in Triton's interpreter on the CPU and compares
their output and gradients with the quadratic definition, for both window shapes, on random inputs
with GQA, ragged lengths, windows of one to three chunks, and without and with sink tokens (one,
four, and more than a chunk of them; key features on the sink rows are random, which the kernels
must ignore). Exits non-zero on a mismatch.

    TRITON_INTERPRET=1 python check_lolcats.py
"""
import math
import os
import sys

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lolcats as k  # noqa: E402

C = 16


def reference(q, kk, v, phi_q, phi_k, gamma, w, terrace, sinks):
    """The quadratic definition (linearize-attention's `ops/lolcats/mod.rs`), f64: the first
    `sinks` keys are window keys of every later query, never linear ones."""
    h = q.shape[1]
    kk = kk.repeat_interleave(h // kk.shape[1], 1)
    v = v.repeat_interleave(h // v.shape[1], 1)
    L = q.shape[2]
    t = torch.arange(L)[:, None]
    s = torch.arange(L)[None, :]
    if terrace:
        window = (s <= t) & (s // w >= t // w - 1)
        linear = s // w < t // w - 1
    else:
        window = (s <= t) & (s > t - w)
        linear = s <= t - w
    window = window | ((s <= t) & (s < sinks))
    linear = linear & (s >= sinks)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~window, float("-inf"))
    m = scores.amax(-1, keepdim=True)
    a = gamma.view(1, -1, 1, 1) * (scores - m).exp()
    a = a + (phi_q @ phi_k.transpose(-1, -2)).masked_fill(~linear, 0.0)
    return (a @ v) / a.sum(-1, keepdim=True)


def fused(q, kk, v, phi_q, phi_k, gamma, w, terrace, sinks, g):
    b, h, L, D = q.shape
    F = phi_q.shape[-1]
    hk, hv = kk.shape[1], v.shape[1]
    n = -(-L // C)
    M = w // C
    BF = min(F, 64)
    sums = torch.empty(b * h, n, F, D, dtype=v.dtype)
    k_sums = torch.empty(b * h, n, F, dtype=torch.float32)
    k.chunk_sums[(b * h, F // BF)](phi_k, v, k_sums, sums, k_sums, L, n, h, h, hv, sinks, C=C,
                                   F=F, D=D, BF=BF, REVERSE=False, WEIGHTED=False)
    y = torch.empty_like(q)
    den, maxes = (torch.empty(b, h, L, dtype=torch.float32) for _ in range(2))
    argmaxes = torch.empty(b, h, L, dtype=torch.int32)
    scale = 1.0 / math.sqrt(D)
    k.forward[(n, b * h)](q, kk, v, phi_q, phi_k, sums, k_sums, gamma, y, den, maxes, argmaxes, L,
                          n, h, hk, hv, M, sinks, scale, C=C, D=D, F=F, TERRACE=terrace)
    gn = torch.empty_like(g)
    gd = torch.empty_like(den)
    rows = b * h * L
    k.grad_terms[(-(-rows // 32),)](g, y, den, gn, gd, rows, D=D, ROWS=32)
    d_phi_q = torch.empty_like(phi_q)
    mu = torch.empty(b, h, L, dtype=torch.float32)
    k.backward_phi_q[(n, b * h)](gn, gd, v, phi_q, phi_k, sums, k_sums, d_phi_q, mu, L, n, h, hv,
                                 M, sinks, C=C, D=D, F=F, TERRACE=terrace)
    q_sums = torch.empty(b * h, n, F, D, dtype=v.dtype)
    q_gd_sums = torch.empty(b * h, n, F, dtype=torch.float32)
    k.chunk_sums[(b * h, F // BF)](phi_q, gn, gd, q_sums, q_gd_sums, L, n, h, h, h, 0, C=C, F=F,
                                   D=D, BF=BF, REVERSE=True, WEIGHTED=True)
    d_phi_k = torch.empty_like(phi_k)
    k.backward_phi_k[(n, b * h)](gn, gd, v, phi_q, q_sums, q_gd_sums, d_phi_k, L, n, h, hv, M,
                                 sinks, C=C, D=D, F=F, TERRACE=terrace)
    d_gamma = -mu.double().sum((0, 2)) / gamma.double()
    dq = torch.empty_like(q)
    k.backward_q[(n, b * h)](q, kk, v, gn, gd, maxes, argmaxes, mu, gamma, dq, L, h, hk, hv, M,
                             sinks, scale, C=C, D=D, TERRACE=terrace)
    dk, dv = torch.empty_like(q), torch.empty_like(q)
    k.backward_kv[(n, b * h)](q, kk, v, phi_q, phi_k, gn, gd, maxes, argmaxes, mu, gamma, q_sums,
                              dk, dv, L, n, h, hk, hv, M, sinks, scale, C=C, D=D, F=F,
                              TERRACE=terrace)
    if sinks > 0:
        # As csrc/lolcats.cpp: the sink chunks' gradients past their window range, in segments
        # of at least 4 query chunks, about 512 programs in all.
        n_seg = max(1, min(512 // (b * h), -(-n // 4)))
        seg_len = -(-n // n_seg)
        n_seg = -(-n // seg_len)
        rows = -(-sinks // C) * C
        part_k = torch.empty(b * h, n_seg, rows, D, dtype=torch.float32)
        part_v = torch.empty_like(part_k)
        k.backward_sink_kv[(n_seg, b * h)](q, kk, v, gn, gd, maxes, argmaxes, mu, gamma, part_k,
                                           part_v, L, n, h, hk, hv, M, sinks, seg_len, scale,
                                           C=C, D=D, TERRACE=terrace)
        rows = min(rows, L)
        dk.view(b * h, L, D)[:, :rows] += part_k.sum(1)[:, :rows]
        dv.view(b * h, L, D)[:, :rows] += part_v.sum(1)[:, :rows]
    dk = dk.view(b, hk, h // hk, L, D).sum(2)
    dv = dv.view(b, hv, h // hv, L, D).sum(2)
    return y, d_phi_q, d_phi_k, d_gamma, dq, dk, dv


def case(seed, b, h, hk, hv, L, D, F, w, terrace, sinks=0):
    torch.manual_seed(seed)
    q = torch.randn(b, h, L, D)
    kk = torch.randn(b, hk, L, D)
    v = torch.randn(b, hv, L, D)
    phi_q = torch.softmax(torch.randn(b, h, L, F), -1)
    phi_k = torch.softmax(torch.randn(b, h, L, F), -1)
    gamma = torch.rand(h) * 0.8 + 0.1
    g = torch.randn(b, h, L, D)

    leaves = [t.double().requires_grad_() for t in (phi_q, phi_k, gamma, q, kk, v)]
    want = reference(*leaves[3:], *leaves[:3], w, terrace, sinks)
    want.backward(g.double())
    got = fused(q, kk, v, phi_q, phi_k, gamma, w, terrace, sinks, g)
    worst = 0.0
    for name, a, e in zip(["y", "d_phi_q", "d_phi_k", "d_gamma", "dq", "dk", "dv"], got,
                          [want.detach()] + [t.grad for t in leaves]):
        err = (a.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-6)
        worst = max(worst, err)
        if err > 1e-4:
            print(f"MISMATCH seed {seed} L={L} w={w} terrace={terrace} sinks={sinks} {name}: "
                  f"relative error {err:.3g}")
            return False
    print(f"ok seed {seed} b={b} h={h}/{hk}/{hv} L={L} D={D} F={F} w={w} terrace={terrace} "
          f"sinks={sinks}: worst {worst:.2g}")
    return True


def main():
    cases = [
        (0, 2, 4, 2, 1, 64, 16, 32, C),
        (1, 1, 4, 4, 4, 53, 32, 16, C),
        (2, 2, 2, 1, 2, 71, 16, 16, 2 * C),
        (3, 1, 2, 2, 2, 10, 16, 16, C),
        (4, 1, 2, 1, 1, 40, 16, 128, 2 * C),
        (5, 1, 2, 1, 2, 150, 16, 16, 3 * C),
    ]
    # Sinks: lengths shorter than the window, ragged, and of several chunks beyond the window;
    # more sinks than a chunk holds (their chunks before the window range take two passes).
    sink_cases = [
        (6, 2, 4, 2, 1, 10, 16, 16, 2 * C, 1),
        (7, 1, 4, 2, 2, 53, 32, 16, C, 4),
        (8, 2, 2, 1, 2, 71, 16, 32, 2 * C, 1),
        (9, 1, 4, 1, 1, 150, 16, 16, C, 4),
        (10, 1, 2, 1, 2, 150, 16, 16, 2 * C, 4),
        (11, 1, 2, 2, 1, 130, 16, 16, C, C + 4),
    ]
    ok = all([case(*c, terrace) for terrace in (False, True) for c in cases]
             + [case(*c[:-1], terrace, c[-1]) for terrace in (False, True) for c in sink_cases])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
