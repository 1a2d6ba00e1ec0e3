#!/usr/bin/env python3
"""flash-linear-attention's chunk_gla timed on the inputs `linearize bench kernels --methods gla`
builds (issue 26): q and k softmaxed over the head dimension, v ~ N(0, 1), log-gates
logsigmoid(N(0, 1)) / 16 per key dim, all bf16 (the gates too, as the bench makes them), batch 1,
scale 1 (linearize's GLA has none). Prints one JSON line per length: median forward and
forward+backward ms over --iters runs (gradients to q, k, v, g) and the peak memory of one
forward+backward above the inputs.

  python3 scripts/gpu/fla_gla.py --lengths 16384,65536 --heads 32 --head-dim 128
"""
import argparse
import json

import torch
import torch.nn.functional as F
from fla.ops.gla import chunk_gla


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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lengths", default="16384,65536")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[args.dtype]
    dev = "cuda"
    for length in [int(x) for x in args.lengths.split(",")]:
        torch.manual_seed(0)
        shape = (1, length, args.heads, args.head_dim)  # fla's (B, T, H, K)
        q = torch.randn(shape, device=dev, dtype=dtype).softmax(-1).requires_grad_()
        k = torch.randn(shape, device=dev, dtype=dtype).softmax(-1).requires_grad_()
        v = torch.randn(shape, device=dev, dtype=dtype, requires_grad=True)
        g = (F.logsigmoid(torch.randn(shape, device=dev, dtype=dtype)) / 16).requires_grad_()

        def forward():
            return chunk_gla(q, k, v, g, scale=1.0)[0]

        def forward_backward():
            forward().sum().backward()

        with torch.no_grad():
            fwd = median_ms(forward, args.iters)
        fwd_bwd = median_ms(forward_backward, args.iters)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward_backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        print(json.dumps({"impl": "fla chunk_gla", "len": length, "fwd_ms": fwd,
                          "fwd_bwd_ms": fwd_bwd, "peak_bytes": peak,
                          "gpu": torch.cuda.get_device_name(), "dtype": args.dtype}), flush=True)


if __name__ == "__main__":
    main()
