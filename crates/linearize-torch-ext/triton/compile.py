"""Compiles the Triton kernels (lolcats.py, gla.py) ahead of time into cubins under OUT, for
Hopper (sm_90: H100, H200) and for Ampere and Ada (sm_80, whose cubins also run on sm_86 and
sm_89), and writes OUT/kernels.rs, which embeds them with what a launch needs. Triton ships its own ptxas, so no GPU
and no CUDA toolkit is needed. Keys read `sm<arch>/<kernel>/...`.

    python compile.py OUT
"""
import importlib
import itertools
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

ARCHS = [80, 90]
CHUNK = 64
HEAD_DIMS = [64, 128]
FEATURE_DIMS = [64, 128, 256]
SHAPES = ["sw", "tk"]
GRAD_ROWS = 32
# q, k, v, features and their gradients: bf16 or f16 (sums and normalisers are f32).
DTYPES = {"bf16": "*bf16", "f16": "*fp16"}
# The LoLCATs kernels run in bf16; those that normalised linear attention runs (the sums, the
# gradient terms, the sw shape's feature-map gradients, and its own) in bf16 and f16.
LINEAR_DTYPES = ["bf16", "f16"]

# The fused GLA kernels (gla.py): chunks of GLA_CHUNK tokens in sub-chunks of GLA_SUB_CHUNK,
# states in blocks of GLA_BLOCK keys and values, q, k, v in bf16 or f16, log-gates in f32.
GLA_CHUNK = 64
GLA_SUB_CHUNK = 16
GLA_BLOCK = 64

POINTERS = {
    "grad_terms": ["g", "y", "den", "grad_num", "grad_den"],
    "chunk_sums": ["a", "bm", "weights", "sums", "weight_sums"],
    "forward": ["q", "k", "v", "phi_q", "phi_k", "sums", "k_sums", "gammas", "y", "den", "maxes",
                "argmaxes"],
    "backward_phi_q": ["grad_num", "grad_den", "v", "phi_q", "phi_k", "sums", "k_sums", "d_phi_q",
                       "mu"],
    "backward_phi_k": ["grad_num", "grad_den", "v", "phi_q", "sums", "q_sums", "d_phi_k"],
    "backward_q": ["q", "k", "v", "grad_num", "grad_den", "maxes", "argmaxes", "mu", "gammas",
                   "dq"],
    "backward_kv": ["q", "k", "v", "phi_q", "phi_k", "grad_num", "grad_den", "maxes", "argmaxes",
                    "mu", "gammas", "sums", "dk", "dv"],
    "backward_sink_kv": ["q", "k", "v", "grad_num", "grad_den", "maxes", "argmaxes", "mu", "gammas",
                         "part_k", "part_v"],
    "linear_forward": ["v", "phi_q", "phi_k", "sums", "k_sums", "y", "den"],
    "linear_backward_v": ["phi_q", "phi_k", "grad_num", "sums", "dv"],
}
GLA_POINTERS = {
    "chunk_cumsum": ["g", "gc"],
    "forward_states": ["k", "v", "gc", "hs"],
    "forward_scores": ["q", "k", "gc", "A"],
    "forward_output": ["q", "v", "gc", "hs", "A", "o"],
    "backward_states": ["q", "do", "gc", "dhs"],
    "backward_scores": ["do", "v", "dA"],
    "backward_intra": ["q", "k", "gc", "dA", "dq", "dk"],
    "backward_dv": ["k", "gc", "A", "do", "dhs", "dv"],
    "backward_inter": ["q", "k", "v", "gc", "hs", "dhs", "do", "dq_intra", "dk_intra", "dq", "dk",
                       "dgs"],
    "reverse_cumsum": ["x", "out"],
}
GLA_F32_POINTERS = {"g", "gc", "A", "dA", "dq_intra", "dk_intra", "dgs", "x", "out"}
# backward_intra's dq and dk are its f32 in-chunk parts.
GLA_F32_BY_KERNEL = {"backward_intra": {"dq", "dk"}}
F32_POINTERS = {"weights", "weight_sums", "k_sums", "gammas", "den", "grad_den", "q_sums", "maxes",
                "mu", "part_k", "part_v"}
# The chunk sums of φk^T v (or φq^T gn): f32 for f16 inputs, whose range they can exceed.
SUM_POINTERS = {"sums"}
I32_POINTERS = {"argmaxes"}
INTS = {"L", "Lp", "n_chunks", "H", "HA", "HB", "HG", "HK", "HV", "M", "n_rows", "sinks", "skip",
        "seg_len"}


def variants():
    """(module, kernel, key, constexprs, warps, pointer types) for every compiled form of one
    architecture."""
    for name, key, constexprs, warps, dtypes in lolcats_variants():
        for dtype in dtypes:
            f32 = F32_POINTERS | (SUM_POINTERS if dtype == "f16" else set())
            types = {arg: "*fp32" if arg in f32 else "*i32" if arg in I32_POINTERS else
                     DTYPES[dtype] for arg in POINTERS[name]}
            yield ("lolcats", name, f"{key}/{dtype}", constexprs, warps, types)
    yield from gla_variants()


def gla_variants():
    """The GLA kernels: per head size (K = V = d), and per q/k/v dtype where one is read."""
    for d in HEAD_DIMS:
        block = min(d, GLA_BLOCK)
        wide = 8 if d > 64 else 4
        shapes = {
            "chunk_cumsum": ({"C": GLA_CHUNK, "K": d}, 4),
            "reverse_cumsum": ({"C": GLA_CHUNK, "K": d, "BK": block}, 4),
            "forward_states": ({"C": GLA_CHUNK, "K": d, "V": d, "BK": block, "BV": block}, 4),
            "forward_scores": ({"C": GLA_CHUNK, "BC": GLA_SUB_CHUNK, "K": d}, 4),
            "forward_output": ({"C": GLA_CHUNK, "K": d, "V": d, "BV": block}, wide),
            "backward_states": ({"C": GLA_CHUNK, "K": d, "V": d, "BK": block, "BV": block}, 4),
            "backward_scores": ({"C": GLA_CHUNK, "V": d}, wide),
            "backward_intra": ({"C": GLA_CHUNK, "BC": GLA_SUB_CHUNK, "K": d}, 4),
            "backward_dv": ({"C": GLA_CHUNK, "K": d, "V": d, "BV": block}, wide),
            "backward_inter": ({"C": GLA_CHUNK, "K": d, "V": d, "BK": block}, wide),
        }
        for name, (constexprs, warps) in shapes.items():
            f32 = GLA_F32_POINTERS | GLA_F32_BY_KERNEL.get(name, set())
            pointers = GLA_POINTERS[name]
            dtypes = DTYPES if any(p not in f32 for p in pointers) else {"f32": None}
            for dtype, pointer in dtypes.items():
                types = {arg: "*fp32" if arg in f32 else pointer for arg in pointers}
                key = f"gla/{name}/d{d}" + (f"/{dtype}" if pointer else "")
                yield ("gla", name, key, constexprs, warps, types)


def lolcats_variants():
    """(kernel, key, constexprs, warps, dtypes) for every compiled form of the LoLCATs and linear
    attention kernels; the key is completed by the dtype."""
    for d, f in itertools.product(HEAD_DIMS, FEATURE_DIMS):
        base = {"C": CHUNK, "D": d, "F": f}
        warps = 8 if max(d, f) > 64 else 4
        for reverse in (False, True):
            yield ("chunk_sums", f"chunk_sums/d{d}/f{f}/{'reverse' if reverse else 'forward'}",
                   {**base, "BF": 64, "REVERSE": reverse, "WEIGHTED": reverse}, 4, LINEAR_DTYPES)
        for name, shape in itertools.product(
                ("forward", "backward_phi_q", "backward_phi_k", "backward_kv"), SHAPES):
            shared = shape == "sw" and name in ("backward_phi_q", "backward_phi_k")
            yield (name, f"{name}/{shape}/d{d}/f{f}", {**base, "TERRACE": shape == "tk"}, warps,
                   LINEAR_DTYPES if shared else ["bf16"])
        for name in ("linear_forward", "linear_backward_v"):
            yield (name, f"{name}/d{d}/f{f}", base, warps, LINEAR_DTYPES)
    for d in HEAD_DIMS:
        yield ("grad_terms", f"grad_terms/d{d}", {"D": d, "ROWS": GRAD_ROWS}, 4, LINEAR_DTYPES)
    for d, shape, name in itertools.product(HEAD_DIMS, SHAPES, ("backward_q", "backward_sink_kv")):
        yield (name, f"{name}/{shape}/d{d}", {"C": CHUNK, "D": d, "TERRACE": shape == "tk"},
               8 if d > 64 else 4, ["bf16"])


def compile_one(job):
    module, name, key, constexprs, warps, types, arch, out = job
    key = f"sm{arch}/{key}"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    fn = getattr(importlib.import_module(module), name)
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in types:
            signature[arg] = types[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in INTS:
            signature[arg] = "i32"
        else:
            signature[arg] = "fp32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": warps, "num_stages": 2})
    ptx = kernel.asm["ptx"]
    entry = re.search(r"\.entry\s+(\w+)\(([^)]*)\)", ptx)
    params = entry.group(2).count(".param")
    user = sum(1 for v in signature.values() if v != "constexpr")
    assert params == user + 2, f"{key}: {params} parameters, expected {user} and two scratch"
    meta = kernel.metadata
    assert meta.global_scratch_size == 0 and meta.profile_scratch_size == 0, key
    file = key.replace("/", "_") + ".cubin"
    with open(os.path.join(out, file), "wb") as fh:
        fh.write(kernel.asm["cubin"])
    return key, file, entry.group(1), meta.shared, warps, params


def main():
    out = os.path.abspath(sys.argv[1])
    os.makedirs(out, exist_ok=True)
    for stale in os.listdir(out):
        if stale.endswith(".cubin"):
            os.remove(os.path.join(out, stale))
    jobs = [(*v, arch, out) for arch in ARCHS for v in variants()]
    with ProcessPoolExecutor() as pool:
        built = list(pool.map(compile_one, jobs))
    lines = [
        "// Generated by triton/compile.py: the ahead-of-time compiled Triton kernels.",
        "pub(crate) const KERNELS: &[crate::triton::KernelImage] = &[",
    ]
    for key, file, symbol, shared, warps, params in built:
        lines.append(
            f'    crate::triton::KernelImage {{ key: "{key}", symbol: "{symbol}", '
            f"shared_bytes: {shared}, warps: {warps}, params: {params}, "
            f'cubin: include_bytes!("{os.path.join(out, file)}") }},')
    lines.append("];")
    with open(os.path.join(out, "kernels.rs"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"compiled {len(built)} kernels into {out}")


if __name__ == "__main__":
    main()
