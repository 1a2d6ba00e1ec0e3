#!/usr/bin/env python3
"""Records what transformers makes of the SmolLM2-135M-Instruct GGUF, as the oracle for
crates/linearize-models/tests/gguf_smollm2.rs:

  - config values transformers derives from the GGUF metadata;
  - token ids of scripts/gguf_make_fixtures.py's test strings, from transformers' tokenizer
    as is and with the file's pre-tokenizer (see hf_encodings there); add_special_tokens=False,
    since transformers prepends BOS for llama GGUFs even though the file says
    add_bos_token=false;
  - checksums and exact rows of a few dequantised tensors, including layer 0's q_proj and
    k_proj after transformers' reverse permutation.

Usage (the GGUF comes from `linearize fetch smollm2` or ensure_smollm2_gguf()):
  .venv/bin/python scripts/gguf_hf_reference.py [GGUF] [--out FIXTURE.json]
GGUF defaults to $LINEARIZE_CACHE (else .cache)/gguf/SmolLM2-135M-Instruct.Q4_1.gguf.
"""
import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_make_fixtures import hf_encodings, tensor_summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "crates/linearize-models/tests/fixtures/gguf/smollm2_hf_reference.json"
CONFIG_KEYS = [
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rms_norm_eps",
    "vocab_size", "tie_word_embeddings",
]
# Rows on both sides of each head's half-split, where a wrong (un)permutation shows.
SAMPLED_ROWS = {
    "model.layers.0.self_attn.q_proj.weight": [0, 1, 2, 31, 32, 33, 63, 64, 95, 96, 287, 288, 575],
    "model.layers.0.self_attn.k_proj.weight": [0, 1, 31, 32, 63, 64, 95, 96, 191],
    "model.layers.29.self_attn.k_proj.weight": [0, 32, 191],
    "model.embed_tokens.weight": [0, 1, 2, 1000, 49151],
    "model.layers.29.mlp.down_proj.weight": [0, 575],
    "model.norm.weight": [0],
}


def default_gguf():
    cache = Path(os.environ.get("LINEARIZE_CACHE") or ROOT / ".cache")
    return cache / "gguf/SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?", type=Path, default=default_gguf())
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(2)
    folder, name = str(args.gguf.parent), args.gguf.name
    sha = hashlib.sha256(args.gguf.read_bytes()).hexdigest()
    cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
    encodings = hf_encodings(folder, name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = model.state_dict()
    tensors = {}
    for key, rows in SAMPLED_ROWS.items():
        x = state[key].detach().numpy()
        summary = tensor_summary(x)
        flat = x.reshape(x.shape[0], -1)
        summary["rows"] = {str(r): [float(v) for v in flat[r, :16]] for r in rows}
        tensors[key] = summary
    reference = {
        "gguf_sha256": sha,
        "config": {k: getattr(cfg, k) for k in CONFIG_KEYS},
        "encodings": encodings,
        "tensors": tensors,
    }
    args.out.write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    n_tokens = sum(len(e["ids"]) for e in encodings)
    differ = sum(e["ids"] != e["ids_gguf_pre"] for e in encodings)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes; {len(encodings)} strings, "
          f"{n_tokens} tokens, {len(tensors)} tensors); transformers' own pre-tokenizer "
          f"differs from the file's on {differ} strings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
