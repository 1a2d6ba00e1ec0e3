"""Runs the fused normalised linear attention kernels (lolcats.py's sums, gradient terms and
feature-map gradients with no window, and its linear_forward and linear_backward_v) in Triton's
interpreter on the CPU, launched in the order csrc/lolcats.cpp launches them, and compares the
output and the gradients of φq, φk and v with the quadratic definition in f64, on random inputs
with GQA values, ragged lengths, Hedgehog-like (softmax) and T2R-like (ReLU, with zero rows)
features, and eps from 1e-12 to 0.5; in f32, and in f16 with values whose chunk sums pass f16's
range (kept in f32, as csrc/lolcats.cpp keeps them for f16). Exits non-zero on a mismatch.

    TRITON_INTERPRET=1 python check_linear_attn.py
"""
import os
import sys

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lolcats as k  # noqa: E402

C = 16


def reference(phi_q, phi_k, v, eps):
    """The quadratic definition (linearize-attention's `ops/linear_attn/naive.rs`), f64."""
    v = v.repeat_interleave(phi_q.shape[1] // v.shape[1], 1)
    L = phi_q.shape[2]
    future = torch.ones(L, L, dtype=torch.bool).triu(1)
    a = (phi_q @ phi_k.transpose(-1, -2)).masked_fill(future, 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def fused(phi_q, phi_k, v, eps, g):
    b, h, L, F = phi_q.shape
    D = v.shape[-1]
    hv = v.shape[1]
    n = -(-L // C)
    BF = min(F, 64)
    f32 = torch.float32
    sum_dtype = f32 if v.dtype == torch.float16 else v.dtype
    sums = torch.empty(b * h, n, F, D, dtype=sum_dtype)
    k_sums = torch.empty(b * h, n, F, dtype=f32)
    k.chunk_sums[(b * h, F // BF)](phi_k, v, k_sums, sums, k_sums, L, n, h, h, hv, 0, C=C, F=F,
                                   D=D, BF=BF, REVERSE=False, WEIGHTED=False)
    y = torch.empty(b, h, L, D, dtype=v.dtype)
    den = torch.empty(b, h, L, dtype=f32)
    k.linear_forward[(n, b * h)](v, phi_q, phi_k, sums, k_sums, y, den, L, n, h, hv, eps, C=C,
                                 D=D, F=F)

    gn = torch.empty_like(y)
    gd = torch.empty_like(den)
    rows = b * h * L
    k.grad_terms[(-(-rows // 32),)](g, y, den, gn, gd, rows, D=D, ROWS=32)
    d_phi_q = torch.empty_like(phi_q)
    mu = torch.empty(b, h, L, dtype=f32)
    k.backward_phi_q[(n, b * h)](gn, gd, v, phi_q, phi_k, sums, k_sums, d_phi_q, mu, L, n, h, hv,
                                 0, 0, C=C, D=D, F=F, TERRACE=False)
    q_sums = torch.empty(b * h, n, F, D, dtype=sum_dtype)
    q_gd_sums = torch.empty(b * h, n, F, dtype=f32)
    k.chunk_sums[(b * h, F // BF)](phi_q, gn, gd, q_sums, q_gd_sums, L, n, h, h, h, 0, C=C, F=F,
                                   D=D, BF=BF, REVERSE=True, WEIGHTED=True)
    d_phi_k = torch.empty_like(phi_k)
    k.backward_phi_k[(n, b * h)](gn, gd, v, phi_q, q_sums, q_gd_sums, d_phi_k, L, n, h, hv, 0,
                                 0, C=C, D=D, F=F, TERRACE=False)
    dv = torch.empty(b, h, L, D, dtype=v.dtype)
    k.linear_backward_v[(n, b * h)](phi_q, phi_k, gn, q_sums, dv, L, n, C=C, D=D, F=F)
    dv = dv.view(b, hv, h // hv, L, D).sum(2)
    return y, d_phi_q, d_phi_k, dv


def case(seed, b, h, hv, L, D, F, features, eps, dtype=torch.float32):
    torch.manual_seed(seed)
    if features == "softmax":
        phi_q = torch.softmax(torch.randn(b, h, L, F), -1)
        phi_k = torch.softmax(torch.randn(b, h, L, F), -1)
    else:
        # ReLU features, some rows all zero (a normaliser of eps alone).
        phi_q = torch.relu(torch.randn(b, h, L, F) - 0.5)
        phi_k = torch.relu(torch.randn(b, h, L, F) - 0.5)
        phi_k[:, :, ::7] = 0.0
        phi_q[:, :, 3::11] = 0.0
    v = torch.randn(b, hv, L, D)
    g = torch.randn(b, h, L, D)
    # f16: values in [0, 2e4] put the sums of φk^T v (about L·1e4 / F) past f16's 65504; output
    # gradients of 1e-3 keep the backward's in-chunk terms g·v / den, which are rounded to f16 for
    # their products (as the libtorch form's are), within it.
    tol = 1e-4
    if dtype == torch.float16:
        v = torch.rand(b, hv, L, D) * 2e4
        g = g * 1e-3
        tol = 5e-3
    phi_q, phi_k, v, g = (t.to(dtype) for t in (phi_q, phi_k, v, g))

    leaves = [t.double().requires_grad_() for t in (phi_q, phi_k, v)]
    want = reference(*leaves, eps)
    want.backward(g.double())
    got = fused(phi_q, phi_k, v, eps, g)
    worst = 0.0
    for name, a, e in zip(["y", "d_phi_q", "d_phi_k", "dv"], got,
                          [want.detach()] + [t.grad for t in leaves]):
        err = (a.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-6)
        worst = max(worst, err)
        if not err <= tol:
            print(f"MISMATCH seed {seed} h={h}/{hv} L={L} D={D} F={F} {features} eps={eps} "
                  f"{dtype} {name}: relative error {err:.3g}")
            return False
    print(f"ok seed {seed} b={b} h={h}/{hv} L={L} D={D} F={F} {features} eps={eps} {dtype}: "
          f"worst {worst:.2g}")
    return True


def main():
    cases = [
        (0, 2, 4, 2, 64, 16, 32, "softmax", 1e-12),
        (1, 1, 4, 4, 53, 32, 16, "softmax", 1e-12),
        (2, 2, 2, 1, 71, 16, 16, "relu", 1e-3),
        (3, 1, 2, 2, 10, 16, 16, "softmax", 0.5),
        (4, 1, 2, 1, 40, 16, 128, "relu", 1e-12),
        (5, 1, 4, 2, 150, 32, 64, "softmax", 1e-6),
        (6, 1, 2, 1, 150, 16, 16, "softmax", 1e-12, torch.float16),
    ]
    ok = all([case(*c) for c in cases])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
