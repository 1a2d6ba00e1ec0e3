#!/usr/bin/env python3
"""Reference perplexity of SmolLM2-135M-Instruct with transformers loading the GGUF itself
(gguf_file=...), by the evaluation protocol of docs/eval.md ("Perplexity, KL, agreement"):

  encode the whole text file without special tokens, cut it into consecutive windows of `ctx`
  tokens (the partial last window is dropped; at most --max-windows), score each window on its
  own (mean next-token NLL over positions 1..ctx-1), report exp(mean NLL).

Prints one JSON object: {"ppl", "nll", "windows", "tokens", "scored_tokens", "ctx", ...}.
"tokens" is the token count of the whole file, "scored_tokens" = windows * (ctx - 1).

--tokenizer gguf-pre (default) encodes with transformers' GGUF tokenizer given the
pre-tokenizer the file names (SmolLM's digit splitting, as in the model's original tokenizer
and in linearize's import); --tokenizer transformers uses transformers' GGUF tokenizer as is
(GPT-2's regex). The output also gives the token count under the other one.

Defaults read the cache that `linearize fetch all` fills ($LINEARIZE_CACHE, else .cache/):
  .venv/bin/python scripts/ref_smollm2_ppl.py [--ctx 512] [--max-windows 64]
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cache_root():
    return Path(os.environ.get("LINEARIZE_CACHE") or ROOT / ".cache")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=cache_root() / "gguf/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--text", type=Path, default=cache_root() / "text/test.txt")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=64, help="0: all windows")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer", choices=["gguf-pre", "transformers"], default="gguf-pre")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenizers import Tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gguf_make_fixtures import file_pre_tokenizer

    torch.set_num_threads(args.threads)
    folder, name = str(args.gguf.parent), args.gguf.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    text = args.text.read_text(encoding="utf-8")
    gguf_pre = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    gguf_pre.pre_tokenizer = file_pre_tokenizer("smollm")
    encodings = {
        "transformers": tok(text, add_special_tokens=False)["input_ids"],
        "gguf-pre": gguf_pre.encode(text, add_special_tokens=False).ids,
    }
    ids = encodings[args.tokenizer]
    other = "transformers" if args.tokenizer == "gguf-pre" else "gguf-pre"
    n_windows = len(ids) // args.ctx
    if args.max_windows:
        n_windows = min(n_windows, args.max_windows)
    if n_windows == 0:
        sys.exit(f"{args.text}: {len(ids)} tokens, fewer than one window of {args.ctx}")
    windows = torch.tensor(ids[: n_windows * args.ctx]).view(n_windows, args.ctx)

    start = time.time()
    nll_sum = 0.0
    with torch.no_grad():
        for batch in windows.split(args.batch):
            logits = model(batch).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
            nll_sum += nll.double().sum().item()
    scored = n_windows * (args.ctx - 1)
    nll = nll_sum / scored
    print(json.dumps({
        "ppl": math.exp(nll),
        "nll": nll,
        "windows": n_windows,
        "tokens": len(ids),
        "scored_tokens": scored,
        "ctx": args.ctx,
        "tokenizer": args.tokenizer,
        f"tokens_{other}": len(encodings[other]),
        "same_ids_as_" + other: encodings[other] == ids,
        "text": str(args.text),
        "gguf": str(args.gguf),
        "seconds": round(time.time() - start, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
