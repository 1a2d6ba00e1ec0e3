"""Helpers of scripts/gpu/dist_check.sh: synthetic data and tokenizer, the recipe, and the report.

  python3 dist_check.py prepare OUT WORDS SMOKE   -> OUT/work/{model,data}
  python3 dist_check.py step RUN_DIR              -> prints the run-wide step of the newest record
  python3 dist_check.py report OUT                -> curves side by side, tokens/s, dist_check.json
"""
import json
import os
import random
import sys


def prepare(out, words, smoke):
    """A word-level tokenizer over 4096 synthetic words and text drawn from a Markov chain over
    them (each word has 8 likely successors), so the LM loss has something to learn."""
    work = os.path.join(out, "work")
    model = os.path.join(work, "model")
    data = os.path.join(work, "data")
    os.makedirs(model, exist_ok=True)
    os.makedirs(data, exist_ok=True)
    vocab = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4096)]
    specials = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(vocab[:3])
    ]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials,
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(vocab)},
                  "unk_token": "<unk>"},
    }
    with open(os.path.join(model, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    with open(os.path.join(model, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f)
    if smoke:
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4099,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "initializer_range": 0.1,
        }
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "../../configs/models/llama3.2_1b/config.json")) as f:
            config = json.load(f)
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    rng = random.Random(0)
    successors = [[rng.randrange(4096) for _ in range(8)] for _ in range(4096)]

    def text(n):
        w = rng.randrange(4096)
        out = []
        for i in range(n):
            out.append(f"w{w}")
            w = rng.choice(successors[w]) if rng.random() < 0.9 else rng.randrange(4096)
            if i % 24 == 23:
                out.append("\n")
        return " ".join(out)

    with open(os.path.join(data, "train.txt"), "w") as f:
        f.write(text(words))
    with open(os.path.join(data, "val.txt"), "w") as f:
        f.write(text(max(words // 40, 20000)))


def records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def stage1_steps(recs):
    return max([r["step"] for r in recs if r["stage"] == "attention_transfer"] or [0])


def run_step(r, offset):
    return r["step"] + (offset if r["stage"] == "lora" else 0)


def step(run_dir):
    recs = [r for r in records(run_dir) if r["split"] == "train"]
    if not recs:
        print(0)
        return
    offset = int(os.environ.get("S1_STEPS", "0"))
    print(max(run_step(r, offset) for r in recs))


def loss_of(r):
    return r.get("attn_mse") if r["stage"] == "attention_transfer" else r.get("lm_loss")


def throughput(recs, stage, skip=3):
    """Tokens per second over the stage's train records after the first `skip` (warm-up)."""
    rs = [r for r in recs if r["stage"] == stage and r["split"] == "train" and r["step"] > skip]
    if len(rs) < 2:
        return None
    first, last = rs[0], rs[-1]
    dt = last["elapsed_s"] - first["elapsed_s"]
    return (last["tokens"] - first["tokens"]) / dt if dt > 0 else None


def report(out):
    runs = {name: records(os.path.join(out, "runs", name)) for name in ("one", "two", "kill")}
    offset = int(os.environ.get("S1_STEPS", "0"))
    table = {}
    for name, recs in runs.items():
        for r in recs:
            if r["split"] == "train":
                table.setdefault((r["stage"], r["step"]), {})[name] = loss_of(r)
    rows = []
    print(f"{'stage':<20}{'step':>5}  {'1 GPU':>12}{'2 GPUs':>12}{'rel diff':>10}"
          f"{'killed+resumed':>16}{'rel diff':>10}")
    worst = {"two": 0.0, "kill": 0.0}
    for (stage, st) in sorted(table, key=lambda k: (k[0] != "attention_transfer", k[1])):
        v = table[(stage, st)]
        one, two, kill = v.get("one"), v.get("two"), v.get("kill")

        def rel(x):
            if one is None or x is None:
                return None
            return abs(x - one) / max(abs(one), 1e-12)

        r2, rk = rel(two), rel(kill)
        for k, r in (("two", r2), ("kill", rk)):
            if r is not None:
                worst[k] = max(worst[k], r)
        fmt = lambda x: f"{x:12.5g}" if x is not None else f"{'-':>12}"
        fr = lambda x: f"{x:10.2e}" if x is not None else f"{'-':>10}"
        print(f"{stage:<20}{st:>5}  {fmt(one)}{fmt(two)}{fr(r2)}    {fmt(kill)}{fr(rk)}")
        rows.append({"stage": stage, "step": st, "one_gpu": one, "two_gpus": two,
                     "killed_resumed": kill})
    speed = {}
    for stage in ("attention_transfer", "lora"):
        t1, t2 = throughput(runs["one"], stage), throughput(runs["two"], stage)
        speed[stage] = {"one_gpu_tokens_per_s": t1, "two_gpus_tokens_per_s": t2,
                        "speedup": (t2 / t1) if t1 and t2 else None}
    print()
    for stage, s in speed.items():
        t1, t2, x = s["one_gpu_tokens_per_s"], s["two_gpus_tokens_per_s"], s["speedup"]
        if t1 and t2:
            print(f"{stage:<20} tokens/s: 1 GPU {t1:10.0f}   2 GPUs {t2:10.0f}   speedup {x:.2f}x")
        else:
            print(f"{stage:<20} tokens/s: not enough records")
    print(f"\nlargest relative loss difference to 1 GPU: 2 GPUs {worst['two']:.2e}, "
          f"killed+resumed {worst['kill']:.2e}")
    result = {"curves": rows, "throughput": speed, "max_rel_diff": worst}
    extra = os.path.join(out, "kill.json")
    if os.path.exists(extra):
        with open(extra) as f:
            result["kill"] = json.load(f)
    with open(os.path.join(out, "dist_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "curves.csv"), "w") as f:
        f.write("stage,step,one_gpu,two_gpus,killed_resumed\n")
        for r in rows:
            f.write(",".join(str(r[k]) if r[k] is not None else "" for k in
                             ("stage", "step", "one_gpu", "two_gpus", "killed_resumed")) + "\n")


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "prepare":
        prepare(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
    elif cmd == "step":
        step(sys.argv[2])
    elif cmd == "report":
        report(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")
