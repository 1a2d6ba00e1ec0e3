#!/usr/bin/env python3
"""Builds the tiny tokenizer directories that `linearize-models`' tokenizer tests load.

Each variant is a byte-level BPE (trained here on a few lines of text, so the files stay small)
laid out like a real Hugging Face repository, covering the ways real repos declare things:

  chatml    SmolLM2-like: no BOS added, special tokens as plain strings, chat template as a string
            in tokenizer_config.json, eos/bos ids in generation_config.json.
  llama3    Llama-3-like: the post-processor adds <|begin_of_text|>, bos_token as an AddedToken
            object, several stop ids (a list) in generation_config.json, chat_template.jinja that
            takes precedence over a list of named templates in tokenizer_config.json,
            clean_up_tokenization_spaces on.
  bosflag   Llama-2-like: tokenizer.json adds nothing, `add_bos_token: true` in tokenizer_config.json
            (LlamaTokenizerFast) asks for BOS, special tokens only in special_tokens_map.json.

Next to the tokenizer files, `expected.json` holds what transformers (AutoTokenizer) produces:
encodings with and without special tokens, decodings, special ids, and chat renderings encoded
the way apply_chat_template(tokenize=True) encodes them.

Run: .venv/bin/python scripts/make_tokenizer_fixtures.py
"""
import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "linearize-models" / "tests" / "fixtures" / "tokenizer"

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I'm fine, thanks.",
    "Linear attention replaces softmax with a feature map: phi(q) . phi(k).",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money.",
    "Naïve café façade, jalapeño piñata, Straße, smörgåsbord.",
    "日本語のテキストと中文文本。",
    "Emoji: 🦀 🚀 ✨ and symbols © ® ™ — “quotes”.",
    "def main():\n    print('hello')\n    return 0\n",
] * 4

TEXTS = [
    "Hello, world!",
    "The lazy dog jumps over the quick brown fox.",
    "  leading spaces and trailing  ",
    "Unseen words: xylophone quizzical zephyr.",
    "Naïve 日本語 🦀🚀 mixed bytes",
    "Hello , world . I 'm here , aren 't I ?",
    "line one\nline two\n\n\ttabbed",
    "",
]

CHATS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 🦀"},
    ],
]

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'].strip() + "
    "'\n<</SYS>>\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def train(special_tokens, post_processor=None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if post_processor is not None:
        tok.post_processor = post_processor
    return tok


def added_token(content):
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_chatml(d):
    tok = train(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], processors.ByteLevel(trim_offsets=False))
    tok.save(str(d / "tokenizer.json"))
    write_json(
        d / "tokenizer_config.json",
        {
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "pad_token": "<|im_end|>",
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
            "tokenizer_class": "GPT2Tokenizer",
        },
    )
    write_json(d / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})


def make_llama3(d):
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    post = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", 0)],
            ),
        ]
    )
    tok = train(specials, post)
    tok.save(str(d / "tokenizer.json"))
    write_json(
        d / "tokenizer_config.json",
        {
            "bos_token": added_token("<|begin_of_text|>"),
            "eos_token": added_token("<|eot_id|>"),
            "chat_template": [
                {"name": "default", "template": "superseded by chat_template.jinja"},
                {"name": "tool_use", "template": "unused"},
            ],
            "clean_up_tokenization_spaces": True,
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    (d / "chat_template.jinja").write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    write_json(d / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [1, 4]})


def make_bosflag(d):
    tok = train(["<unk>", "<s>", "</s>"])
    tok.save(str(d / "tokenizer.json"))
    write_json(
        d / "tokenizer_config.json",
        {
            "add_bos_token": True,
            "add_eos_token": False,
            "chat_template": [
                {"name": "tool_use", "template": "unused"},
                {"name": "default", "template": LLAMA2_TEMPLATE},
            ],
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "tokenizer_class": "LlamaTokenizerFast",
        },
    )
    write_json(
        d / "special_tokens_map.json",
        {"bos_token": {k: v for k, v in added_token("<s>").items() if k != "__type"}, "eos_token": "</s>", "unk_token": "<unk>"},
    )


def stop_ids(d, tok):
    """generation_config.json's eos_token_id (int or list), then the tokenizer's eos if missing."""
    ids = []
    gen = d / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text())["eos_token_id"]
        ids = eos if isinstance(eos, list) else [eos]
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def expected(d):
    tok = AutoTokenizer.from_pretrained(str(d))
    cases = []
    for text in TEXTS:
        with_special = tok(text).input_ids
        plain = tok(text, add_special_tokens=False).input_ids
        cases.append(
            {
                "text": text,
                "ids_with_special": with_special,
                "ids": plain,
                "decoded_with_special": tok.decode(with_special, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(with_special, skip_special_tokens=True),
            }
        )
    chats = []
    for messages in CHATS:
        for add_generation_prompt in (False, True):
            rendered = tok.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
            chats.append(
                {
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "rendered": rendered,
                    "ids": ids,
                }
            )
    return {
        "bos_id": tok.bos_token_id,
        "eos_ids": stop_ids(d, tok),
        "vocab_size": len(tok),
        "cases": cases,
        "chats": chats,
    }


def main():
    for name, make in [("chatml", make_chatml), ("llama3", make_llama3), ("bosflag", make_bosflag)]:
        d = OUT / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        make(d)
        exp = expected(d)
        write_json(d / "expected.json", exp)
        print(f"{name}: vocab {exp['vocab_size']}, bos {exp['bos_id']}, eos {exp['eos_ids']}")


if __name__ == "__main__":
    main()
