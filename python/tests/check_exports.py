"""Checks exports of linearize against linearize's own outputs, in Hugging Face transformers.

Run by crates/linearize-train/tests/hf_export.rs with .venv's python:

    check_exports.py ROOT

ROOT holds one directory per case, each with `model/` (an export), `reference.safetensors` (what
linearize computed: `ids` (b, L) and their `logits` (b, L, vocab) in f32, a `prompt` (1, P) and
its greedy continuation `generated` (1, N)) and, for cases with LoRA, `peft/` (the adapters in
PEFT's format and their base). For every case:

- `AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True)` gives linearize's logits
  within 1e-4 (f32, CPU; without a decoding cache, with one filled at once, and with one filled
  token by token after a prefill, as `generate()` runs) and `generate()` its greedy tokens;
- without `trust_remote_code` the stock loader refuses the export (transformers' own error);
- `PeftModel.from_pretrained(peft/base, peft/adapter)` gives the merged model's logits, while
  the base alone does not;
- after `import linearize_hf`, the export loads without remote code and gives the same logits;
- a Gemma 3 export's config.json with a key set to what the code does not compute is refused
  with an error naming the key.

Prints one line per check and exits non-zero when any fails.
"""
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

TOLERANCE = 1e-4
failures = []


def check(case, what, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {case}: {what} ({detail})", flush=True)
    if not ok:
        failures.append(f"{case}: {what} ({detail})")


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# Tokens the token-by-token pass reads at once before its single steps: past a window of 8 and
# the sinks, so that the steps run on a state that has already dropped keys out of the window.
PREFILL = 13


def stepped_logits(model, ids):
    """The logits of `ids` (b, L) from a decoding cache: the first PREFILL tokens at once, then one
    token at a time."""
    out = model(ids[:, :PREFILL])
    logits = [out.logits]
    for t in range(PREFILL, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values)
        logits.append(out.logits)
    return torch.cat(logits, 1)


def compare_logits(case, label, model, ref):
    with torch.no_grad():
        fresh = model(ref["ids"], use_cache=False).logits
        cached = model(ref["ids"]).logits
        stepped = stepped_logits(model, ref["ids"])
    for mode, logits in (("no cache", fresh), ("cache", cached), ("cache, token by token", stepped)):
        diff = max_diff(logits, ref["logits"])
        check(case, f"{label} logits, {mode}", diff <= TOLERANCE, f"max abs diff {diff:.2e}")


def compare_generation(case, model, ref):
    new = ref["generated"].shape[1]
    with torch.no_grad():
        out = model.generate(ref["prompt"], max_new_tokens=new, min_new_tokens=new, do_sample=False)
    got = out[0, ref["prompt"].shape[1] :].tolist()
    want = ref["generated"][0].tolist()
    check(case, "greedy generate() tokens", got == want, f"transformers {got}, linearize {want}")


def stock_load_fails(case, model_dir):
    try:
        AutoModelForCausalLM.from_pretrained(model_dir)
    except Exception as e:  # transformers' own refusal of custom code
        message = str(e).replace("\n", " ")
        check(case, "stock load refused", "trust_remote_code" in message, message[:160])
    else:
        check(case, "stock load refused", False, "loaded without trust_remote_code")


def check_peft(case, peft_dir, ref):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(peft_dir / "base", trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        base_diff = max_diff(base(ref["ids"], use_cache=False).logits, ref["logits"])
    # The adapters matter: without them the logits are another model's.
    check(case, "PEFT base alone differs from the merged model", base_diff > 1e-3, f"max abs diff {base_diff:.2e}")
    model = PeftModel.from_pretrained(base, peft_dir / "adapter").eval()
    compare_logits(case, "PeftModel", model, ref)


# Gemma 3 keys set to what the modeling code does not compute: each must be refused with an error
# naming the key, never run as something else. The RoPE one depends on the config's format.
GEMMA_REFUSALS = {
    "attn_logit_softcapping": 50.0,
    "hidden_activation": "silu",
    "use_bidirectional_attention": True,
    "final_logit_softcapping": -1.0,
    "sliding_window": None,
    "layer_types": ["full_attention"],
}
ROPE_REFUSALS = {
    "rope_scaling": {"rope_type": "yarn", "factor": 2.0},
    "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0},
    },
}


def gemma_configs_refused(case, model_dir):
    from linearize_hf import LinearizeConfig

    good = json.loads((model_dir / "config.json").read_text())
    if good["base_model_type"] != "gemma3_text":
        return
    rope_key = "rope_parameters" if "rope_parameters" in good else "rope_scaling"
    for key, value in {**GEMMA_REFUSALS, rope_key: ROPE_REFUSALS[rope_key]}.items():
        what = f"config with {key}={value!r} refused"
        try:
            LinearizeConfig.from_dict({**good, key: value})
        except ValueError as e:
            check(case, what, key in str(e), str(e)[:160])
        else:
            check(case, what, False, "accepted")


def main(root):
    import peft
    import transformers

    print(f"transformers {transformers.__version__}, peft {peft.__version__}", flush=True)
    cases = sorted(p for p in Path(root).iterdir() if (p / "model").is_dir())
    if not cases:
        sys.exit(f"no case directories with model/ in {root}")
    for case_dir in cases:
        case = case_dir.name
        ref = load_file(case_dir / "reference.safetensors")
        model = AutoModelForCausalLM.from_pretrained(
            case_dir / "model", trust_remote_code=True, dtype=torch.float32
        ).eval()
        check(case, "architecture", type(model).__name__ == "LinearizeForCausalLM", type(model).__name__)
        compare_logits(case, "transformers", model, ref)
        compare_generation(case, model, ref)
        stock_load_fails(case, case_dir / "model")
        if (case_dir / "peft").is_dir():
            check_peft(case, case_dir / "peft", ref)

    # The package registers the model type: no remote code needed.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import linearize_hf  # noqa: F401

    for case_dir in cases:
        ref = load_file(case_dir / "reference.safetensors")
        model = AutoModelForCausalLM.from_pretrained(case_dir / "model", dtype=torch.float32).eval()
        check(case_dir.name, "linearize_hf class", type(model).__module__ == "linearize_hf.modeling_linearize", type(model).__module__)
        compare_logits(case_dir.name, "import linearize_hf", model, ref)
        gemma_configs_refused(case_dir.name, case_dir / "model")

    print(f"{len(cases)} cases, {len(failures)} failed checks", flush=True)
    if failures:
        sys.exit("failed:\n" + "\n".join(failures))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    main(sys.argv[1])
