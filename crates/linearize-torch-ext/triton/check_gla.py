"""Runs the fused GLA kernels (gla.py) in Triton's interpreter on the CPU, launched in the order
csrc/gla.cpp launches them, and compares their output and every gradient (q, k, v, log-gates)
with the quadratic definition, on random inputs with GQA, ragged lengths, head sizes 64 and 128,
and decays from mild (Liger's logsigmoid(k) / 16) to strong (log-gates down to −10 per token).
Exits non-zero on a mismatch.

    TRITON_INTERPRET=1 python check_gla.py
"""
import os
import sys

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gla  # noqa: E402

# As csrc/gla.cpp and compile.py: tokens per chunk and sub-chunk, the block of keys or values.
C, BC, BLOCK = 64, 16, 64


def reference(q, k, v, g):
    """The quadratic definition (linearize-attention's `ops/gla/naive.rs`), f64."""
    h = q.shape[1]
    k, v, g = (x.repeat_interleave(h // x.shape[1], 1) for x in (k, v, g))
    cum = g.cumsum(2)
    L = q.shape[2]
    future = torch.ones(L, L, dtype=torch.bool).triu(1)[..., None]
    decay = (cum[:, :, :, None] - cum[:, :, None]).masked_fill(future, float("-inf")).exp()
    a = (q[:, :, :, None] * k[:, :, None] * decay).sum(-1)
    return a @ v


def fused(q, k, v, g, do, warps=None):
    """Output and gradients (dq, dk, dv, dg) through the kernels, on q's device; `warps`
    {kernel name: num_warps} for a GPU run."""
    b, h, L, K = q.shape
    V = v.shape[-1]
    hk, hv, hg = k.shape[1], v.shape[1], g.shape[1]
    n = -(-L // C)
    Lp = n * C
    ns = C // BC
    bk, bv = min(K, BLOCK), min(V, BLOCK)
    f32 = {"dtype": torch.float32, "device": q.device}
    like_v = {"dtype": v.dtype, "device": q.device}

    def launch(kernel, grid, *args, **constexprs):
        extra = {"num_warps": warps[kernel.__name__]} if warps else {}
        kernel[grid](*args, **constexprs, **extra)

    gc = torch.empty(b * hg, Lp, K, **f32)
    launch(gla.chunk_cumsum, (n, b * hg), g, gc, L, Lp, C=C, K=K)
    hs = torch.empty(b * h, n, K, V, **like_v)
    launch(gla.forward_states, ((K // bk) * (V // bv), b * h), k, v, gc, hs, L, Lp, n, h, hk,
           hv, hg, C=C, K=K, V=V, BK=bk, BV=bv)
    scores = torch.empty(b * h, Lp, C, **f32)
    launch(gla.forward_scores, (n * ns, b * h), q, k, gc, scores, L, Lp, h, hk, hg, C=C, BC=BC,
           K=K)
    o = torch.empty(b, h, L, V, **like_v)
    launch(gla.forward_output, (n * (V // bv), b * h), q, v, gc, hs, scores, o, L, Lp, n, h, hv,
           hg, C=C, K=K, V=V, BV=bv)

    grad_states = torch.empty(b * h, n, K, V, **like_v)
    launch(gla.backward_states, ((K // bk) * (V // bv), b * h), q, do, gc, grad_states, L, Lp, n,
           h, hg, C=C, K=K, V=V, BK=bk, BV=bv)
    grad_scores = torch.empty(b * h, Lp, C, **f32)
    launch(gla.backward_scores, (n, b * h), do, v, grad_scores, L, Lp, h, hv, C=C, V=V)
    dq_intra, dk_intra = torch.empty(b, h, L, K, **f32), torch.empty(b, h, L, K, **f32)
    launch(gla.backward_intra, (n * ns, b * h), q, k, gc, grad_scores, dq_intra, dk_intra, L, Lp,
           h, hk, hg, C=C, BC=BC, K=K)
    dv = torch.empty(b, h, L, V, **like_v)
    launch(gla.backward_dv, (n * (V // bv), b * h), k, gc, scores, do, grad_states, dv, L, Lp, n,
           h, hk, hg, C=C, K=K, V=V, BV=bv)
    dq, dk = torch.empty(b, h, L, K, **like_v), torch.empty(b, h, L, K, **like_v)
    dgs = torch.empty(b, h, L, K, **f32)
    launch(gla.backward_inter, (n * (K // bk), b * h), q, k, v, gc, hs, grad_states, do,
           dq_intra, dk_intra, dq, dk, dgs, L, Lp, n, h, hk, hv, hg, C=C, K=K, V=V, BK=bk)
    dg = torch.empty(b, h, L, K, **f32)
    launch(gla.reverse_cumsum, (K // bk, b * h), dgs, dg, L, n, C=C, K=K, BK=bk)

    def per_head(x, shared):
        return x.view(b, shared, h // shared, L, x.shape[-1]).sum(2)

    return o, dq, per_head(dk, hk), per_head(dv, hv), per_head(dg, hg)


def case(seed, b, h, hk, hv, hg, L, D, strength):
    torch.manual_seed(seed)
    q = torch.randn(b, h, L, D) / D ** 0.5
    k = torch.randn(b, hk, L, D)
    v = torch.randn(b, hv, L, D)
    if strength == "liger":
        g = torch.nn.functional.logsigmoid(torch.randn(b, hg, L, D)) / 16
    else:
        # Many gates near 1, some strong: log-gates from 0 down to −strength per token.
        g = -strength * torch.rand(b, hg, L, D) ** 3
    do = torch.randn(b, h, L, D)

    leaves = [t.double().requires_grad_() for t in (q, k, v, g)]
    want = reference(*leaves)
    want.backward(do.double())
    got = fused(q, k, v, g, do)
    worst = 0.0
    for name, a, e in zip(["o", "dq", "dk", "dv", "dg"], got,
                          [want.detach()] + [t.grad for t in leaves]):
        err = (a.double() - e).abs().max().item() / max(e.abs().max().item(), 1e-6)
        worst = max(worst, err)
        if not err <= 1e-4:
            print(f"MISMATCH seed {seed} h={h}/{hk}/{hv}/{hg} L={L} D={D} decay {strength} "
                  f"{name}: relative error {err:.3g}")
            return False
    print(f"ok seed {seed} b={b} h={h}/{hk}/{hv}/{hg} L={L} D={D} decay {strength}: "
          f"worst {worst:.2g}")
    return True


def main():
    cases = [
        (0, 1, 2, 2, 2, 2, 128, 64, "liger"),
        (1, 2, 4, 2, 1, 2, 150, 64, 10.0),
        (2, 1, 4, 1, 4, 2, 192, 64, 3.0),
        (3, 1, 2, 1, 2, 1, 131, 128, 10.0),
        (4, 1, 2, 2, 1, 2, 128, 128, "liger"),
        (5, 1, 4, 4, 2, 1, 100, 128, 1.0),
    ]
    ok = all([case(*c) for c in cases])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
