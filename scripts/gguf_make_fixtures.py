#!/usr/bin/env python3
"""Writes the GGUF test fixtures of crates/linearize-models/tests/fixtures/gguf/.

Oracles are gguf-py (ggml's reference (de)quantisation in numpy) and transformers' GGUF loader:

  dequant/<TYPE>.blocks, dequant/<TYPE>.f32
      raw ggml blocks of 512 values and gguf.quants.dequantize's f32 output (little-endian).
  tiny-llama.gguf, tiny-llama.expected.json
      a complete 2-layer llama model (tensors of 9 types, Q/K rows permuted the way llama.cpp's
      converter does, tied embeddings) with a byte-level BPE vocab ("smollm" pre-tokenizer), and
      what transformers makes of it: config values, tensor checksums and samples after its
      dequantisation + reverse permutation, and token ids for a set of test strings.
  tiny-spm.gguf, tiny-spm.expected.json
      a SentencePiece-style ("llama") vocab with scores and byte fallback, no tensors, and
      transformers' token ids for the same strings.

Run with the repo's virtualenv (gguf 0.17.1, transformers, tokenizers, sentencepiece):
  .venv/bin/python scripts/gguf_make_fixtures.py
"""
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/linearize-models/tests/fixtures/gguf"

# Shared with scripts/gguf_hf_reference.py: strings whose token ids must match transformers.
TOKENIZER_TEST_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing spaces   ",
    "runs    of     spaces and\ttabs\t\there",
    "line one\nline two\n\n\nafter three newlines\r\nwindows line",
    "   \n  \n",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-06-30",
    "naïve café, Ærøskøbing, straße, Ελληνικά, русский текст",
    "日本語のテキストと中文字符",
    "emoji 👋🏽 🧑‍💻 ❤️ 🇫🇷",
    "def f(x):\n    return x ** 2  # square\n",
    "fn main() { println!(\"{}\", vec![1, 2, 3].len()); }",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|endoftext|>text after end<|im_start|",
    "don't I'll we've they're it's O'Neil's",
    "ALL CAPS AND MiXeD cAsE",
    "x² + y³ = z⁴, Ⅻ, ½",
    "mixed\u00a0nbsp and zero\u200bwidth",
    "مرحبا بالعالم",
    "안녕하세요, e\u0301 combining accent",
    "\n\nleading newlines and trailing ones\n\n",
    "    indented code\n        deeper\n\treturn None\n",
    "URL https://example.com/a?b=1&c=2 and email a.b@example.org",
    "ACT 1.\n    2 Lords.\n\n  3 4\t5\n 6  7",
    "",
]

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TRAINING_TEXT = """
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of
Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair.
Call me Ishmael. Some years ago - never mind how long precisely - having little or no money in my
purse, and nothing particular to interest me on shore, I thought I would sail about a little.
def main():
    for i in range(10):
        print(i, i * i)
The year 1776 and the number 3.14159 and 1,000,000 dollars.
<|im_start|>user
Hello there, how are you?<|im_end|>
"""


def rng():
    return np.random.default_rng(1234)


def write_dequant_vectors(r):
    out = OUT / "dequant"
    out.mkdir(parents=True, exist_ok=True)
    n = 512

    def f16_bytes(v):
        return np.array([v], dtype=np.float16).view(np.uint8)

    def sane_scales(blocks, offsets):
        # Random bytes may spell inf/NaN in the f16 scale fields; put finite scales there.
        for b in blocks:
            for off in offsets:
                b[off:off + 2] = f16_bytes(r.choice([-1, 1]) * 10 ** r.uniform(-4, 1))

    def random_blocks(qtype, scale_offsets, values):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = r.integers(0, 256, size=(values // block, size), dtype=np.uint8)
        sane_scales(blocks, scale_offsets)
        return blocks.reshape(-1)

    def realistic(qtype):
        # Real values through the reference quantiser: blocks at very different scales, one all
        # zero, one constant.
        x = r.standard_normal(n // 2).astype(np.float32)
        x *= np.repeat(10.0 ** r.uniform(-3, 2, size=n // 64), 32).astype(np.float32)
        x[:32] = 0
        x[32:64] = 0.75
        return gguf.quants.quantize(x.reshape(1, -1), qtype).reshape(-1)

    cases = {}
    floats = np.concatenate([
        r.standard_normal(n - 8).astype(np.float32),
        np.array([0.0, -0.0, 1e-6, -6e-8, 65504.0, 70000.0, np.inf, -np.inf], dtype=np.float32),
    ])
    cases["F32"] = (T.F32, floats.view(np.uint8))
    with np.errstate(over="ignore"):  # 70000 overflows to inf on purpose
        cases["F16"] = (T.F16, floats.astype(np.float16).view(np.uint8))
    cases["BF16"] = (T.BF16, gguf.quants.quantize(floats, T.BF16).reshape(-1))
    small = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0]}
    for qtype, offsets in small.items():
        both = [realistic(qtype), random_blocks(qtype, offsets, n // 2)]
        cases[qtype.name] = (qtype, np.concatenate(both))
    cases["Q4_K"] = (T.Q4_K, random_blocks(T.Q4_K, [0, 2], n))
    cases["Q5_K"] = (T.Q5_K, random_blocks(T.Q5_K, [0, 2], n))
    cases["Q6_K"] = (T.Q6_K, random_blocks(T.Q6_K, [208], n))

    for name, (qtype, raw) in cases.items():
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        expected = gguf.quants.dequantize(raw.reshape(1, -1), qtype).reshape(-1).astype("<f4")
        assert expected.size == n, (name, expected.size)
        (out / f"{name}.blocks").write_bytes(raw.tobytes())
        (out / f"{name}.f32").write_bytes(expected.tobytes())
        print(f"dequant/{name}: {raw.size} bytes -> {expected.size} values")


def llama_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rows -> interleaved RoPE rows)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def train_bpe_vocab():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TRAINING_TEXT.splitlines() * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert [i for _, i in vocab] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in specials else 1 for t in tokens]
    return tokens, merges, types


def write_tiny_llama(r):
    tokens, merges, types = train_bpe_vocab()
    vocab, hidden, ffn, n_layer, n_head, n_kv, ctx = len(tokens), 64, 64, 2, 4, 2, 256
    head_dim = hidden // n_head
    path = OUT / "tiny-llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_block_count(n_layer)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_CHAT_TEMPLATE)

    def tensor(name, shape, qtype, permute_heads=None):
        x = (r.standard_normal(shape) * 0.05).astype(np.float32)
        if permute_heads:
            x = llama_permute(x, permute_heads)
        if qtype == T.F32:
            w.add_tensor(name, x)
        elif qtype == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    layer_types = [
        dict(q=T.Q8_0, k=T.Q4_1, v=T.Q5_0, o=T.Q5_1, gate=T.F16, up=T.BF16, down=T.Q8_0),
        dict(q=T.Q4_1, k=T.Q8_0, v=T.F16, o=T.Q4_0, gate=T.Q5_1, up=T.Q5_0, down=T.Q4_1),
    ]
    tensor("token_embd.weight", (vocab, hidden), T.Q4_0)
    for i, ty in enumerate(layer_types):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,), T.F32)
        tensor(f"blk.{i}.attn_q.weight", (n_head * head_dim, hidden), ty["q"], n_head)
        tensor(f"blk.{i}.attn_k.weight", (n_kv * head_dim, hidden), ty["k"], n_kv)
        tensor(f"blk.{i}.attn_v.weight", (n_kv * head_dim, hidden), ty["v"])
        tensor(f"blk.{i}.attn_output.weight", (hidden, n_head * head_dim), ty["o"])
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,), T.F32)
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden), ty["gate"])
        tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden), ty["up"])
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn), ty["down"])
    tensor("output_norm.weight", (hidden,), T.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{path.name}: {path.stat().st_size} bytes")

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(OUT), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(OUT), gguf_file=path.name, dtype="float32")
    tensors = {name: tensor_summary(t.detach().numpy()) for name, t in model.state_dict().items()
               if name != "lm_head.weight"}
    expected = {
        "config": {k: getattr(cfg, k) for k in [
            "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta",
            "rms_norm_eps", "vocab_size", "tie_word_embeddings"]},
        "tensors": tensors,
        "encodings": hf_encodings(OUT, path.name),
    }
    write_json(OUT / "tiny-llama.expected.json", expected)


def tensor_summary(x):
    """Checksums that catch wrong values, wrong row order and wrong shapes, plus exact samples."""
    x = np.asarray(x, dtype=np.float32)
    rows = x.reshape(x.shape[0], -1).astype(np.float64)
    weights = np.arange(1, rows.shape[0] + 1, dtype=np.float64)
    samples = {}
    for r in sorted({0, 1, rows.shape[0] // 2, rows.shape[0] - 1}):
        samples[str(r)] = [float(v) for v in x.reshape(x.shape[0], -1)[r, :8]]
    return {
        "shape": list(x.shape),
        "sum": float(rows.sum()),
        "abs_sum": float(np.abs(rows).sum()),
        "row_weighted_sum": float((rows.sum(axis=1) * weights).sum()),
        "rows": samples,
    }


def hf_encodings(folder, gguf_name):
    """Token ids (without special tokens) from transformers' GGUF tokenizer ("ids"), and from
    the same tokenizer with the pre-tokenizer the file names in tokenizer.ggml.pre
    ("ids_gguf_pre"): transformers always pre-tokenizes byte-level vocabularies with GPT-2's
    regex, llama.cpp and the model's original tokenizer.json use the named one."""
    import gguf as gguf_py
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_name)
    reader = gguf_py.GGUFReader(str(Path(folder) / gguf_name))
    field = reader.fields.get("tokenizer.ggml.pre")
    pre = bytes(field.parts[field.data[0]]).decode() if field else "default"
    model = bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode()
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    if model == "gpt2":
        backend.pre_tokenizer = file_pre_tokenizer(pre)
    return [{"text": s,
             "ids": tok(s, add_special_tokens=False)["input_ids"],
             "ids_gguf_pre": backend.encode(s, add_special_tokens=False).ids}
            for s in TOKENIZER_TEST_STRINGS]


def file_pre_tokenizer(pre):
    """llama.cpp's pre-tokenizer for `pre`, as the original tokenizer.json spells it."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("default", "gpt-2"):
        return byte_level
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ValueError(f"no reference pre-tokenizer for {pre!r}")


def write_tiny_spm():
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines() * 4), model_writer=model,
        model_type="bpe", vocab_size=320, byte_fallback=True, character_coverage=1.0,
        split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    path = OUT / "tiny-spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-spm")
    w.add_context_length(128)
    w.add_embedding_length(64)
    w.add_feed_forward_length(64)
    w.add_block_count(1)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{path.name}: {path.stat().st_size} bytes, {len(tokens)} pieces")
    encodings = hf_encodings(OUT, path.name)
    agree = sum(e["ids"] == sp.encode(e["text"]) for e in encodings)
    print(f"tiny-spm: transformers agrees with sentencepiece on {agree}/{len(encodings)} strings")
    write_json(OUT / "tiny-spm.expected.json", {"encodings": encodings})


def write_json(path, value):
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n")
    print(f"{path.name}: {path.stat().st_size} bytes")


def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    OUT.mkdir(parents=True, exist_ok=True)
    r = rng()
    write_dequant_vectors(r)
    write_tiny_llama(r)
    write_tiny_spm()
    return 0


if __name__ == "__main__":
    sys.exit(main())
