"""transformers' `generate` on a linearize export, timed, for the side-by-side in docs/BENCHMARKS.md
(issue 23): the prompt is the first CTX tokens of a text file, greedy decoding of NEW tokens.

    python3 scripts/gpu/hf_generate.py --model EXPORT --text FILE --ctx 4096 --new 256 \
        --dtype bf16 --prompt-out prompt.txt --json out.json [--remote]

The prompt is cut from FILE at a token boundary and written to --prompt-out, so that
`linearize generate --prompt "$(cat prompt.txt)"` encodes the same text (the JSON holds the ids
both sides should see). Without --remote the export loads through `import linearize_hf`; with it,
through `trust_remote_code=True` and the modeling files copied into the export.

Timing: one untimed warm-up generate of a few tokens, then the prefill alone (one forward of the
prompt) and the whole `generate` (prefill + NEW greedy steps), each after a CUDA synchronise. The
decode rate is NEW / (generate - prefill); the end-to-end rate NEW / generate is what
`linearize generate` logs.
"""
import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--remote", action="store_true")
    p.add_argument("--prompt-out", required=True)
    p.add_argument("--json", required=True)
    args = p.parse_args()

    if not args.remote:
        import linearize_hf  # noqa: F401  (registers model_type `linearize`)
    device = torch.device(args.device)
    tok = AutoTokenizer.from_pretrained(args.model)
    text = open(args.text, encoding="utf-8").read()
    # The prompt: the text of the first CTX tokens, re-encoded so that the ids are exactly what a
    # tokenizer given this text produces (the side that reads prompt.txt does the same).
    ids = tok(text[: args.ctx * 12], add_special_tokens=True)["input_ids"][: args.ctx]
    prompt = tok.decode(ids, skip_special_tokens=True)
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    with open(args.prompt_out, "w", encoding="utf-8") as f:
        f.write(prompt)

    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=DTYPES[args.dtype], trust_remote_code=args.remote
    ).to(device)
    model.eval()
    input_ids = torch.tensor([ids], device=device)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        model.generate(input_ids[:, :64], max_new_tokens=4, do_sample=False)
        sync(device)
        t0 = time.perf_counter()
        model(input_ids)
        sync(device)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=args.new, do_sample=False)
        sync(device)
        total_s = time.perf_counter() - t0
    new_ids = out[0, len(ids):].tolist()
    n = len(new_ids)
    result = {
        "model": args.model,
        "loader": "trust_remote_code" if args.remote else "import linearize_hf",
        "class": type(model).__name__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "prompt_tokens": len(ids),
        "new_tokens": n,
        "eos_token_id": eos,
        "prefill_s": prefill_s,
        "generate_s": total_s,
        "end_to_end_tokens_per_s": n / total_s,
        "decode_tokens_per_s": n / max(total_s - prefill_s, 1e-9),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "text": tok.decode(new_ids, skip_special_tokens=True),
        "prompt_ids_head": ids[:8],
    }
    json.dump(result, open(args.json, "w"), indent=1)
    print(
        f"transformers ({result['loader']}, {args.dtype}): {len(ids)} prompt tokens, {n} generated "
        f"in {total_s:.2f} s ({result['end_to_end_tokens_per_s']:.1f} tokens/s end to end, "
        f"{result['decode_tokens_per_s']:.1f} decoding; prefill {prefill_s * 1e3:.0f} ms)",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
