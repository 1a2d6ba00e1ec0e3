#!/usr/bin/env python3
"""Renders real-world chat templates with transformers, as byte-exact references for the Rust
chat-template renderer.

Writes one JSON file per template into crates/linearize-models/tests/fixtures/chat/:
  {"name", "template", "special_tokens": {...}, "cases": [
      {"messages": [...], "add_generation_prompt": bool, "expected": str}        rendered text
    | {"messages": [...], "add_generation_prompt": bool, "error": str}]}         raise_exception text

The templates are built from strings (no network): a tiny byte-level tokenizer stands in for the
model's, and apply_chat_template(tokenize=False) renders through transformers' own jinja
environment (trim_blocks, lstrip_blocks, loopcontrols, its tojson, raise_exception).

Run: .venv/bin/python scripts/make_chat_fixtures.py
"""
import json
from pathlib import Path

from jinja2.exceptions import TemplateError
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "linearize-models" / "tests" / "fixtures" / "chat"

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Not one model's template: the python string methods, loop controls, namespaces, {% generation %}
# blocks, tojson options and block tags on their own lines (where trim_blocks / lstrip_blocks
# decide the whitespace) that real templates (DeepSeek-R1, Gemma, SmolLM3, ...) rely on.
FEATURES = """{% set ns = namespace(system='', count=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.system = message['content'].strip() %}
        {% continue %}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
    {% set content = message['content'] %}
    {% if message['role'] == 'assistant' and '</think>' in content %}
        {% set content = content.split('</think>')[-1].lstrip() %}
    {% endif %}
<turn role="{{ message['role'] | upper }}" n="{{ ns.count }}">
    {% if message['role'] == 'assistant' %}
{% generation %}{{ content }}{% endgeneration %}
    {% else %}
{{ content.replace('<', '&lt;') | trim }}
    {% endif %}
</turn>
    {% if content.startswith('STOP') %}
        {% break %}
    {% endif %}
{% endfor %}
{% if ns.system %}
{{ {'system': ns.system, 'turns': ns.count, 'note': 'café <b> & "q"\\n', 'ratio': 2.5, 'none': none} | tojson }}
{{ {'b': 1, 'a': [1, 0.1, 1e20, true, [], {}], 'z': {'y': 'x'}} | tojson(indent=2) }}
{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=true, ensure_ascii=true, separators=[',', ':']) }}
{% endif %}
{% for key, value in {'x': 1, 'y': 'two'}.items() %}{{ key }}={{ value }};{% endfor %}

{% if add_generation_prompt %}<turn role="ASSISTANT">{% endif %}
"""

SPECIALS = {
    "smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
    "qwen25": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "features": {"bos_token": "<s>", "eos_token": "</s>"},
}

TEMPLATES = {"smollm2": SMOLLM2, "llama3": LLAMA3, "mistral": MISTRAL, "qwen25": QWEN25, "features": FEATURES}


def m(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = {
    "common": [
        [m("user", "Hi there!")],
        [m("system", "  Be brief.  "), m("user", "What is 2+2?"), m("assistant", "4"), m("user", "And 3+3? 🦀")],
        [m("user", "  padded  \n"), m("assistant", "<think>hmm</think>\n\nAnswer with <tags> & \"quotes\"")],
    ],
    "mistral_errors": [
        [m("user", "a"), m("user", "b")],
        [m("system", "s"), m("assistant", "first")],
        [m("user", "a"), m("assistant", "b"), m("user", "c"), m("system", "late")],
    ],
    "qwen25": [[m("user", "weather?"), m("assistant", "calling"), m("tool", "sunny"), m("tool", "22C"), m("user", "thanks")]],
    "features": [
        [m("system", "  sys  "), m("user", "a<b"), m("assistant", "<think>x</think>  y"), m("user", "STOP now"), m("user", "never")],
    ],
}


def tokenizer(specials):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def render(tok, template, messages, add_generation_prompt):
    try:
        text = tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return {"expected": text}
    except TemplateError as err:
        return {"error": str(err)}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, template in TEMPLATES.items():
        tok = tokenizer(SPECIALS[name])
        convs = list(CONVERSATIONS["common"])
        if name == "mistral":
            convs += CONVERSATIONS["mistral_errors"]
        convs += CONVERSATIONS.get(name, [])
        cases = []
        for messages in convs:
            for add_generation_prompt in (False, True):
                case = {"messages": messages, "add_generation_prompt": add_generation_prompt}
                case.update(render(tok, template, messages, add_generation_prompt))
                cases.append(case)
        fixture = {"name": name, "template": template, "special_tokens": SPECIALS[name], "cases": cases}
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(fixture, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        errors = sum("error" in c for c in cases)
        print(f"{path.relative_to(ROOT)}: {len(cases)} cases ({errors} errors)")


if __name__ == "__main__":
    main()
