"""Perplexity of a model directory through Hugging Face transformers, by linearize's evaluation
protocol (docs/eval.md): the whole file encoded without special tokens, cut into consecutive windows
of CTX tokens (a partial last window dropped, at most MAX_WINDOWS), each window scored on its
own, exp of the mean next-token NLL over positions 1..CTX-1. Prints JSON like `linearize eval`'s
(`perplexity`, `tokens`, `windows`), so an export scored here and by

    linearize eval --model DIR --perplexity FILE --ctx CTX

can be compared on the same windows.

    perplexity.py DIR FILE CTX [MAX_WINDOWS] [--device cpu|cuda] [--dtype float32|bfloat16]
"""
import argparse
import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("file")
    parser.add_argument("ctx", type=int)
    parser.add_argument("max_windows", type=int, nargs="?")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, trust_remote_code=True, dtype=getattr(torch, args.dtype)
    ).to(args.device).eval()
    with open(args.file, encoding="utf-8") as f:
        ids = tokenizer(f.read(), add_special_tokens=False)["input_ids"]
    windows = len(ids) // args.ctx
    if args.max_windows is not None:
        windows = min(windows, args.max_windows)
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = torch.tensor(ids[w * args.ctx : (w + 1) * args.ctx], device=args.device)[None]
            logits = model(window, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
            total += nll.item()
            count += args.ctx - 1
    print(json.dumps({"model": args.model, "perplexity": math.exp(total / count), "tokens": count, "windows": windows}))


if __name__ == "__main__":
    main()
