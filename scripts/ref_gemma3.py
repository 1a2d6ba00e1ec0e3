#!/usr/bin/env python3
"""transformers' reading of the Gemma-3-270M GGUF (gguf_file=...) against linearize's import of it:

  1. every tensor of the imported model.safetensors (import as f32) equals, bit for bit, the one
     transformers' GGUF loader builds (norms included: llama.cpp stores Gemma norms as 1 + w);
  2. the imported tokenizer.json encodes a few strings (special tokens, whitespace, bytes) to the
     ids of transformers' GGUF tokenizer;
  3. perplexity on a text file by the evaluation protocol of docs/DESIGN (consecutive windows of
     --ctx tokens encoded without special tokens, each scored on its own, exp(mean NLL)), and the
     greedy continuations of a few prompts, computed by transformers from the imported directory
     (compare with `linearize eval --perplexity` and `linearize generate`).

Prints one JSON object. Needs transformers 4.57.1 with gguf 0.17.1 (scripts/requirements-tools.txt):
  python scripts/ref_gemma3.py --gguf .cache/gguf/gemma-3-270m-q4_k_m.gguf \\
      --imported /tmp/gemma3-f32 --text .cache/text/test.txt
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

STRINGS = [
    "Hello world",
    "  leading spaces, tabs\t\tand\nnewlines\n\n  end ",
    "<start_of_turn>user\nWhat is 12345 + 678?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>unicode: café, naïve, 日本語, emoji 🙂, control \x07 byte",
    "def f(x):\n    return x**2  # comment",
]
PROMPTS = ["The capital of France is", "Once upon a time", "In 1865, the President"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--imported", type=Path, required=True, help="`linearize import gguf --dtype f32` output")
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16, help="0: all windows")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    folder, name = str(args.gguf.parent), args.gguf.name
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()

    ours = load_file(str(args.imported / "model.safetensors"))
    theirs = hf_model.state_dict()
    if hf_model.config.tie_word_embeddings:
        theirs = {k: v for k, v in theirs.items() if k != "lm_head.weight"}
    tensors = {
        "ours_only": sorted(set(ours) - set(theirs)),
        "theirs_only": sorted(set(theirs) - set(ours)),
        "different": sorted(k for k in set(ours) & set(theirs) if not torch.equal(ours[k], theirs[k])),
        "compared": len(set(ours) & set(theirs)),
    }

    our_tok = Tokenizer.from_file(str(args.imported / "tokenizer.json"))
    encodings = []
    for s in STRINGS:
        for special in (True, False):
            a = our_tok.encode(s, add_special_tokens=special).ids
            b = hf_tok(s, add_special_tokens=special)["input_ids"]
            encodings.append({"text": s, "special": special, "same": a == b, "ours": a, "theirs": b})

    model = AutoModelForCausalLM.from_pretrained(str(args.imported), dtype=torch.float32).eval()
    text = args.text.read_text(encoding="utf-8")
    ids = our_tok.encode(text, add_special_tokens=False).ids
    n_windows = len(ids) // args.ctx
    if args.max_windows:
        n_windows = min(n_windows, args.max_windows)
    windows = torch.tensor(ids[: n_windows * args.ctx]).view(n_windows, args.ctx)
    start = time.time()
    nll_sum = 0.0
    with torch.no_grad():
        for batch in windows.split(1):
            logits = model(batch).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll_sum += -logp.gather(-1, batch[:, 1:, None]).double().sum().item()
    scored = n_windows * (args.ctx - 1)
    nll = nll_sum / scored

    continuations = []
    with torch.no_grad():
        for p in PROMPTS:
            prompt = torch.tensor([our_tok.encode(p).ids])
            out = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
            new = out[0, prompt.shape[1]:].tolist()
            continuations.append({"prompt": p, "ids": new, "text": our_tok.decode(new)})

    print(json.dumps({
        "tensors": tensors,
        "encodings_same": all(e["same"] for e in encodings),
        "encodings": [e for e in encodings if not e["same"]],
        "ppl": math.exp(nll),
        "nll": nll,
        "windows": n_windows,
        "ctx": args.ctx,
        "scored_tokens": scored,
        "continuations": continuations,
        "seconds": round(time.time() - start, 1),
    }, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
