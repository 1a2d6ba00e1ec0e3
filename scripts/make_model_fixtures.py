#!/usr/bin/env python3
"""Builds the tiny random Hugging Face models that `linearize-models`' parity tests load.

For each fixture it writes, into crates/linearize-models/tests/fixtures/<name>/:
  config.json                      the HF config
  model.safetensors                (or model.safetensors.index.json + 2 shards) the weights
  reference.safetensors            `input_ids` (b, L) int64 and `logits` (b, L, vocab) float32,
                                   computed by transformers in f32 on CPU (eager attention)

Weights are drawn with a scale that makes activations O(1) and attention peaked, so that a wrong
RoPE, mask or norm shows up as a large logit difference (HF's 0.02-std init gives near-uniform
logits that hide such bugs).

Run: .venv/bin/python scripts/make_model_fixtures.py
"""
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "linearize-models" / "tests" / "fixtures"

# Shared tiny shapes: GQA (4 query heads over 2 KV heads) everywhere.
COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_act="silu",
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
BATCH, SEQ = 2, 12


def fixtures():
    yield "llama3_tied_sharded", LlamaForCausalLM, LlamaConfig(
        **COMMON,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            # Small so that the scaling touches this fixture's frequencies: with head_dim 8 the
            # wavelengths span high (kept), medium (smoothed) and low (divided) bands.
            original_max_position_embeddings=16,
        ),
        tie_word_embeddings=True,
    ), dict(shards=2)
    yield "llama_untied_bias", LlamaForCausalLM, LlamaConfig(
        **COMMON,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
    ), dict()
    yield "mistral_sliding", MistralForCausalLM, MistralConfig(
        **COMMON,
        rope_theta=10000.0,
        sliding_window=5,
        tie_word_embeddings=False,
    ), dict()
    yield "qwen2", Qwen2ForCausalLM, Qwen2Config(
        **COMMON,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
    ), dict()
    yield "qwen3_bf16", Qwen3ForCausalLM, Qwen3Config(
        **COMMON,
        # head_dim independent of hidden/heads, as in the real Qwen3 models.
        head_dim=16,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        attention_bias=False,
    ), dict(bf16=True)


def init_weights(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                # Peaked attention and spread-out logits; 1/sqrt(fan_in) alone gives std-1 logits.
                gain = {"q_proj": 2.0, "k_proj": 2.0, "lm_head": 5.0}.get(name.split(".")[-2], 1.0)
                p.copy_(gain * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def shard_size_for(model, shards):
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    # A bit more than 1/shards of the total so that exactly `shards` files come out.
    return f"{math.ceil(total / shards / 1000) + 2}KB"


def build(name, cls, config, opts):
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    config._attn_implementation = "eager"
    model = cls(config).eval()
    init_weights(model, gen)
    if opts.get("bf16"):
        # The reference is the f32 computation of exactly the bf16 values stored on disk.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))

    ids = torch.randint(3, config.vocab_size, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    assert logits.std() > 2.0, f"{name}: logits too flat to test anything"

    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    save_model = model.to(torch.bfloat16) if opts.get("bf16") else model
    kwargs = {}
    if opts.get("shards"):
        kwargs["max_shard_size"] = shard_size_for(model, opts["shards"])
    save_model.save_pretrained(out, safe_serialization=True, **kwargs)
    (out / "generation_config.json").unlink(missing_ok=True)
    if opts.get("shards"):
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        assert len(files) == opts["shards"], f"{name}: got {len(files)} shards"
    save_file(
        {"input_ids": ids.contiguous(), "logits": logits.contiguous()},
        str(out / "reference.safetensors"),
    )
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: {size / 1000:.0f} KB, logits std {logits.std():.2f}")


def main():
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, cls, config, opts in fixtures():
        build(name, cls, config, opts)


if __name__ == "__main__":
    main()
