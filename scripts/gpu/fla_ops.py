#!/usr/bin/env python3
"""flash-linear-attention's kernels timed on the inputs `linearize bench kernels` builds for the
same op, batch 1 (issues 22 and 26). Prints one JSON line per length: median forward and
forward+backward ms over --iters runs and the peak memory of one forward+backward above the
inputs. A backward that raises (fla guards its gated backward on Hopper with some Triton
versions, fla issue 640) is reported as failed, with the forward time kept.

  --op linear_attn        chunk_linear_attn (normalize=True) as `--methods linear` builds it:
                          φq and φk softmaxed over --features (Hedgehog-like rows summing to
                          one), v ~ N(0, 1), all in --dtype, scale 1 (linearize's has none)
  --op gla                chunk_gla as `--methods gla` builds it: q and k softmaxed over the head
                          dimension, v ~ N(0, 1), log-gates logsigmoid(N(0, 1)) / 16 per key dim,
                          all in --dtype (the gates too), scale 1 (linearize's GLA has none)
  --op gated_delta_rule   chunk_gated_delta_rule as `--methods gated-deltanet` builds it: unit q
                          and k, v ~ N(0, 1), f32 log-decays logsigmoid(N(0, 1)) / 16 and
                          beta = sigmoid(N(0, 1)) per head and token, scale 1 (q is a unit vector)

  python3 scripts/gpu/fla_ops.py --op gla --lengths 16384,65536 --heads 32 --head-dim 128
  python3 scripts/gpu/fla_ops.py --op linear_attn --lengths 16384,65536 --heads 32 --head-dim 128 \
    --features 128
"""
import argparse
import json

import torch
import torch.nn.functional as F


def median_ms(fn, iters):
    fn()  # warm-up: Triton compiles on the first call
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def linear_attn_call(length, heads, head_dim, dtype, features):
    from fla.ops.linear_attn import chunk_linear_attn

    def leaf(width, softmax):
        x = torch.randn((1, length, heads, width), device="cuda", dtype=dtype)  # (B, T, H, ·)
        return (x.softmax(-1) if softmax else x).requires_grad_()

    q, k, v = leaf(features, True), leaf(features, True), leaf(head_dim, False)
    return ("fla chunk_linear_attn",
            lambda: chunk_linear_attn(q, k, v, scale=1.0, normalize=True)[0])


def gla_call(length, heads, head_dim, dtype, features):
    from fla.ops.gla import chunk_gla

    shape = (1, length, heads, head_dim)  # fla's (B, T, H, K)
    q = torch.randn(shape, device="cuda", dtype=dtype).softmax(-1).requires_grad_()
    k = torch.randn(shape, device="cuda", dtype=dtype).softmax(-1).requires_grad_()
    v = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    g = (F.logsigmoid(torch.randn(shape, device="cuda", dtype=dtype)) / 16).requires_grad_()
    return "fla chunk_gla", lambda: chunk_gla(q, k, v, g, scale=1.0)[0]


def gated_delta_rule_call(length, heads, head_dim, dtype, features):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    shape = (1, length, heads, head_dim)
    q = F.normalize(torch.randn(shape, device="cuda"), dim=-1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(shape, device="cuda"), dim=-1).to(dtype).requires_grad_()
    v = torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True)
    gates = (1, length, heads)
    g = (F.logsigmoid(torch.randn(gates, device="cuda")) / 16).requires_grad_()
    beta = torch.sigmoid(torch.randn(gates, device="cuda")).to(dtype).requires_grad_()
    return ("fla chunk_gated_delta_rule",
            lambda: chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0)[0])


OPS = {"linear_attn": linear_attn_call, "gla": gla_call,
       "gated_delta_rule": gated_delta_rule_call}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--op", required=True, choices=sorted(OPS))
    p.add_argument("--lengths", default="16384,65536")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--features", type=int, default=128,
                   help="feature width of φq, φk (linear_attn only; as bench kernels --features)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    for length in [int(x) for x in args.lengths.split(",")]:
        torch.manual_seed(0)
        name, forward = OPS[args.op](length, args.heads, args.head_dim, dtype, args.features)

        def forward_backward():
            forward().sum().backward()

        with torch.no_grad():
            fwd = median_ms(forward, args.iters)
        row = {"impl": name, "len": length, "fwd_ms": fwd,
               "gpu": torch.cuda.get_device_name(), "dtype": args.dtype}
        try:
            row["fwd_bwd_ms"] = median_ms(forward_backward, args.iters)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            forward_backward()
            torch.cuda.synchronize()
            row["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        except Exception as e:  # noqa: BLE001 -- reported, not hidden
            row["fwd_bwd_ms"] = None
            row["note"] = f"backward failed: {type(e).__name__}: {e}"[:300]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
