#!/usr/bin/env python3
"""Builds the tiny random Hugging Face models and config cases that `linearize-models`' tests load,
with whichever of the two pinned transformers versions runs it:

  transformers 4.57.1 (scripts/requirements-tools.txt)          -> fixtures/<name>/
  transformers 5.25.0 (scripts/requirements-transformers5.txt)  -> fixtures/transformers5/<name>/

Both versions write a config.json the way they save it: 4.x with top-level `rope_theta` and
`rope_scaling`, 5.x with one `rope_parameters` object and no top-level `rope_theta`.

For each model fixture it writes, into crates/linearize-models/tests/fixtures/[transformers5/]<name>/:
  config.json                      the HF config, as that version saves it
  model.safetensors                (or model.safetensors.index.json + 2 shards) the weights
  reference.safetensors            `input_ids` (b, L) int64 and `logits` (b, L, vocab) float32,
                                   computed by transformers in f32 on CPU (eager attention)
(tests/parity.rs). `gemma3_mm`, a multimodal Gemma 3 read as its text model, also gets
  text_config_defaults.json        Gemma3TextConfig's values of the keys its `text_config` may
                                   leave out (tests/gemma3_multimodal.rs)
Weights are drawn with a scale that makes activations O(1) and attention peaked,
so that a wrong RoPE, mask or norm shows up as a large logit difference (HF's 0.02-std init gives
near-uniform logits that hide such bugs).

It also writes fixtures/hf_configs/transformers-<version>.json (tests/hf_configs.rs): config.json
cases (every family with the keys left out or null, and every `rope_type`, in that version's own
format and, for 5.x, in the old one), each with what transformers made of it: the built model's
head counts and widths, biases, q/k norms, eps, sliding window, tying, and its RoPE inverse
frequencies and attention scaling, or the error it raised.

How the committed sets were made (two throwaway venvs outside the repo, sharing the lead's CPU/CUDA
torch 2.11 wheel through a .pth file so that torch is not downloaded twice):
  python3 -m venv /tmp/tf4 && /tmp/tf4/bin/pip install transformers==4.57.1 safetensors==0.6.2
  python3 -m venv /tmp/tf5 && /tmp/tf5/bin/pip install transformers==5.25.0 safetensors==0.8.0
  for v in tf4 tf5; do echo $PWD/.venv/lib/python3.11/site-packages \\
      > /tmp/$v/lib/python3.11/site-packages/zz_torch.pth; done
  /tmp/tf4/bin/python scripts/make_model_fixtures.py
  /tmp/tf5/bin/python scripts/make_model_fixtures.py
"""
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipVisionConfig,
)

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "crates" / "linearize-models" / "tests" / "fixtures"
PINS = {
    "4.57.1": "requirements-tools.txt",
    "5.25.0": "requirements-transformers5.txt",
}
VERSION = transformers.__version__
V5 = VERSION.startswith("5.")
OUT = FIXTURES / "transformers5" if V5 else FIXTURES

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


def rope(theta, scaling=None):
    """The RoPE keyword arguments in the running version's own format."""
    if V5:
        return dict(rope_parameters=dict(rope_theta=theta, **(scaling or dict(rope_type="default"))))
    return dict(rope_theta=theta, **(dict(rope_scaling=scaling) if scaling else {}))


def gemma3_rope(global_theta, global_scaling, local_theta):
    """Gemma 3's two RoPEs in the running version's format: 4.x a global one at the top level and
    a local theta, 5.x one `rope_parameters` section per layer type."""
    if V5:
        return dict(rope_parameters=dict(
            full_attention=dict(rope_theta=global_theta, **global_scaling),
            sliding_attention=dict(rope_type="default", rope_theta=local_theta),
        ))
    return dict(rope_theta=global_theta, rope_scaling=global_scaling, rope_local_base_freq=local_theta)


def fixtures():
    # Gemma 3 with every option it reads set away from its neutral value: heads wider than
    # hidden/heads, a query scale that is not head_dim, local layers (window 5 of 12 tokens) with
    # a RoPE base of their own beside the global layers' scaled one, soft-capped logits.
    yield "gemma3", Gemma3ForCausalLM, Gemma3TextConfig(
        **{k: v for k, v in COMMON.items() if k not in ("hidden_act", "num_hidden_layers")},
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=5,
        final_logit_softcapping=20.0,
        **gemma3_rope(1000000.0, dict(rope_type="linear", factor=2.0), 10.0),
        tie_word_embeddings=True,
    ), dict()
    # A multimodal Gemma 3 (Gemma3ForConditionalGeneration), read as its text model: the text
    # config nested in `text_config` (saved as its difference from Gemma3TextConfig's defaults), a
    # tiny vision tower and projector beside it, two shards. No soft cap: the multimodal model
    # does not apply `final_logit_softcapping`. The reference logits are the full model's on
    # text-only input.
    yield "gemma3_mm", Gemma3ForConditionalGeneration, Gemma3Config(
        text_config=Gemma3TextConfig(
            **{k: v for k, v in COMMON.items() if k not in ("hidden_act", "num_hidden_layers")},
            num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            **gemma3_rope(1000000.0, dict(rope_type="linear", factor=2.0), 10.0),
        ),
        vision_config=SiglipVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=8,
        ),
        mm_tokens_per_image=4,
    ), dict(shards=2)
    yield "llama3_tied_sharded", LlamaForCausalLM, LlamaConfig(
        **COMMON,
        **rope(
            500000.0,
            dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                # Small so that the scaling touches this fixture's frequencies: with head_dim 8
                # the wavelengths span high (kept), medium (smoothed) and low (divided) bands.
                original_max_position_embeddings=16,
            ),
        ),
        tie_word_embeddings=True,
    ), dict(shards=2)
    yield "llama_untied_bias", LlamaForCausalLM, LlamaConfig(
        **COMMON,
        **rope(10000.0),
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
    ), dict()
    yield "mistral_sliding", MistralForCausalLM, MistralConfig(
        **COMMON,
        **rope(10000.0),
        sliding_window=5,
        tie_word_embeddings=False,
    ), dict()
    yield "qwen2", Qwen2ForCausalLM, Qwen2Config(
        **COMMON,
        **rope(1000000.0),
        tie_word_embeddings=True,
        use_sliding_window=False,
    ), dict()
    yield "qwen3_bf16", Qwen3ForCausalLM, Qwen3Config(
        **COMMON,
        # head_dim independent of hidden/heads, as in the real Qwen3 models.
        head_dim=16,
        **rope(1000000.0),
        tie_word_embeddings=False,
        attention_bias=False,
    ), dict(bf16=True)
    yield "qwen2_yarn", Qwen2ForCausalLM, Qwen2Config(
        **dict(COMMON, num_hidden_layers=1),
        # head_dim 16 and a long pretraining length put YaRN's ramp across several dims: pairs
        # 0-1 kept, 3-5 blended, 6-7 interpolated; cos/sin scaled by 1 + 0.1 ln 4.
        head_dim=16,
        **rope(
            10000.0,
            dict(
                rope_type="yarn",
                factor=4.0,
                original_max_position_embeddings=4096,
                # 5.x: the unrounded ramp; 4.x: transformers' default, rounded to whole dims.
                **(dict(truncate=False) if V5 else {}),
            ),
        ),
        tie_word_embeddings=False,
        use_sliding_window=False,
    ), dict()


def init_weights(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Gemma's norms scale by 1 + weight: their stored weights are near 0.
                unit = 0.0 if "gemma" in type(model).__name__.lower() else 1.0
                p.copy_(unit + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                # The vision tower's LayerNorms (layer_norm1, layer_norm2): standard, unit-centred.
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
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

    vocab_size = config.get_text_config().vocab_size
    ids = torch.randint(3, vocab_size, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    assert logits.std() > 2.0, f"{name}: logits too flat to test anything"

    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    save_model = model.to(torch.bfloat16) if opts.get("bf16") else model
    kwargs = {} if V5 else dict(safe_serialization=True)
    if opts.get("shards"):
        kwargs["max_shard_size"] = shard_size_for(model, opts["shards"])
    save_model.save_pretrained(out, **kwargs)
    (out / "generation_config.json").unlink(missing_ok=True)
    if opts.get("shards"):
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        assert len(files) == opts["shards"], f"{name}: got {len(files)} shards"
    save_file(
        {"input_ids": ids.contiguous(), "logits": logits.contiguous()},
        str(out / "reference.safetensors"),
    )
    if isinstance(config, Gemma3Config):
        # What a `text_config` that leaves a key out means (tests/parity.rs checks the loader's).
        defaults = Gemma3TextConfig().to_dict()
        keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "bos_token_id", "eos_token_id", "tie_word_embeddings"]
        (out / "text_config_defaults.json").write_text(json.dumps({k: defaults[k] for k in keys}) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: {size / 1000:.0f} KB, logits std {logits.std():.2f}")


# ---- config cases ----------------------------------------------------------------------------

# 32 heads so that every family's default KV head count (llama: all, mistral: 8, qwen: 32)
# divides them, 16 wide (qwen3: 128 by default) so that RoPE has 8 frequencies to get wrong; one
# layer and a small MLP keep the built models tiny.
MINIMAL = dict(vocab_size=16, hidden_size=512, intermediate_size=8, num_hidden_layers=1, num_attention_heads=32)
CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "gemma3_text": Gemma3TextConfig}

# Every rope_type, in the (4.x) `rope_scaling` spelling; 5.x configs move them into
# `rope_parameters` by saving through the config class.
ROPE_CASES = {
    "linear": dict(rope_type="linear", factor=2.0),
    "dynamic": dict(rope_type="dynamic", factor=2.0),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=256),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024),
    "yarn_betas_untruncated": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=1024,
                                   beta_fast=16.0, beta_slow=2.0, truncate=False),
    "yarn_mscale": dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=512,
                        mscale=0.707, mscale_all_dim=1.0),
    "yarn_attention_factor": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=512,
                                  attention_factor=1.5),
    "old_type_key": dict(type="linear", factor=3.0),
}


def longrope(head_dim):
    return dict(rope_type="longrope", original_max_position_embeddings=1024, factor=2.0,
                short_factor=[1.0] * (head_dim // 2), long_factor=[2.0] * (head_dim // 2))


def resolve(config_json):
    """What transformers builds from a config.json: loaded from disk as `from_pretrained` does."""
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.json").write_text(json.dumps(config_json))
        try:
            cfg = AutoConfig.from_pretrained(d)
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).eval()
            # A forward pass: some configs build and only fail when run.
            with torch.no_grad():
                model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)
        except Exception as e:  # noqa: BLE001 - any failure is the expected outcome to record
            return {"error": f"{type(e).__name__}: {e}"[:300]}
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    rotary = model.model.rotary_emb
    if config_json["model_type"] == "mistral":
        window = cfg.sliding_window
    else:
        window = getattr(attn, "sliding_window", None)
    gemma = {}
    if config_json["model_type"] == "gemma3_text":
        # Layer 0 is local (the default pattern); the RoPE above is the global one.
        if V5:
            inv_freq, scaling = rotary.full_attention_inv_freq, rotary.full_attention_attention_scaling
            local_inv_freq = rotary.sliding_attention_inv_freq
        else:
            inv_freq, scaling = rotary.inv_freq, rotary.attention_scaling
            local_inv_freq = model.model.rotary_emb_local.inv_freq
        gemma = {
            "layer_types": cfg.layer_types,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
            "local_inv_freq": local_inv_freq.tolist(),
        }
        rotary = type("Rotary", (), dict(inv_freq=inv_freq, attention_scaling=scaling))
    return gemma | {
        "num_attention_heads": attn.q_proj.out_features // head_dim,
        "num_key_value_heads": attn.k_proj.out_features // head_dim,
        "head_dim": head_dim,
        "qkv_bias": attn.q_proj.bias is not None,
        "o_proj_bias": attn.o_proj.bias is not None,
        "mlp_bias": mlp.gate_proj.bias is not None,
        "qk_norm": hasattr(attn, "q_norm"),
        "rms_norm_eps": getattr(model.model.norm, "variance_epsilon", None) or model.model.norm.eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "sliding_window": window,
        "tie_word_embeddings": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
        "hidden_act": getattr(cfg, "hidden_activation", None) or cfg.hidden_act,
        "initializer_range": cfg.initializer_range,
        "inv_freq": rotary.inv_freq.tolist(),
        "attention_scaling": float(rotary.attention_scaling),
    }


def saved(config):
    """The config.json this version writes for `config`."""
    with tempfile.TemporaryDirectory() as d:
        config.save_pretrained(d)
        out = json.loads(Path(d, "config.json").read_text())
    out.pop("transformers_version", None)
    return out


def config_cases():
    for family, cls in CLASSES.items():
        gemma = family == "gemma3_text"
        # Gemma: six layers, so that the default pattern makes both a local and a global one (5.x
        # builds only the RoPEs of the layer types present).
        sizes = dict(MINIMAL, num_hidden_layers=6) if gemma else MINIMAL
        minimal = dict(model_type=family, **sizes)
        yield f"{family}/minimal", minimal
        nulls = dict(minimal, num_key_value_heads=None, rope_scaling=None)
        if family == "mistral":
            nulls["sliding_window"] = None
        yield f"{family}/nulls", nulls
        yield f"{family}/head_dim_null", dict(minimal, head_dim=None)
        yield f"{family}/saved_defaults", saved(cls(**sizes))
        head_dim = {"qwen3": 128, "gemma3_text": 256}.get(
            family, MINIMAL["hidden_size"] // MINIMAL["num_attention_heads"])
        for name, scaling in dict(ROPE_CASES, longrope=longrope(head_dim)).items():
            # The old spelling, as 4.x wrote it (and 5.x still reads it).
            old = dict(minimal, rope_theta=50000.0, rope_scaling=scaling)
            yield f"{family}/{name}/rope_scaling", old
            if V5 and gemma and name != "longrope":
                # Gemma's 5.x format: one section per layer type.
                yield f"{family}/{name}/rope_parameters", saved(cls(**sizes, rope_parameters=dict(
                    full_attention=dict(rope_theta=50000.0, **scaling),
                    sliding_attention=dict(rope_type="default", rope_theta=500.0))))
            elif V5 and name != "longrope":
                # 5.x's own format, as its config class saves it.
                yield f"{family}/{name}/rope_parameters", saved(
                    cls(**MINIMAL, rope_parameters=dict(rope_theta=50000.0, **scaling))
                )
        if gemma:
            yield f"{family}/pattern_and_local_base", dict(
                minimal, num_hidden_layers=4, sliding_window_pattern=2, rope_local_base_freq=500.0,
                query_pre_attn_scalar=64, sliding_window=7)
            yield f"{family}/layer_types", dict(
                minimal, num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"])
        elif V5:
            yield f"{family}/theta_only/rope_parameters", dict(minimal, rope_parameters=dict(rope_theta=50000.0))
            # 5.x takes a top-level rope_theta as the default of the section's.
            yield f"{family}/top_level_theta/rope_parameters", dict(
                minimal, rope_theta=50000.0, rope_parameters=dict(rope_type="linear", factor=2.0)
            )


def write_config_cases():
    cases = []
    for name, config_json in config_cases():
        cases.append(dict(name=name, config=config_json, transformers=resolve(config_json)))
    out = FIXTURES / "hf_configs" / f"transformers-{VERSION}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # One case a line: small, and a diff shows which case changed.
    lines = ",\n".join(json.dumps(c) for c in cases)
    out.write_text(f'{{"transformers": "{VERSION}", "cases": [\n{lines}\n]}}\n')
    errors = sum("error" in c["transformers"] for c in cases)
    print(f"{out.relative_to(ROOT)}: {len(cases)} cases ({errors} refused by transformers)")


def main():
    if VERSION not in PINS:
        raise SystemExit(f"transformers {VERSION} is not one of the pinned versions {sorted(PINS)}")
    pin = (ROOT / "scripts" / PINS[VERSION]).read_text()
    assert f"transformers=={VERSION}" in pin, f"scripts/{PINS[VERSION]} does not pin {VERSION}"
    # Names given on the command line: only those model fixtures (and no config cases).
    only = set(sys.argv[1:])
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, cls, config, opts in fixtures():
        if not only or name in only:
            build(name, cls, config, opts)
    if not only:
        write_config_cases()


if __name__ == "__main__":
    main()
