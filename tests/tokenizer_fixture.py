"""A small real tokenizer for the tiny fixtures (vocabulary < 128), built with the `tokenizers` library:
no download, the same tokens on every run. It is shaped like Llama 2's tokenizer.json (a "▁"-prefixing
normalizer, BPE with byte fallback, the decoder chain that undoes both, `<s>` added in front), has chat
markers as special tokens, and a multi-line chat template whose output depends on jinja2's
trim_blocks/lstrip_blocks the way transformers renders it.

Used by tests/test_text.py and by tests/fixtures/make_tokenizer_reference.py (which records what
transformers makes of it).
"""

from __future__ import annotations

import json
import os
import string

SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
BYTES = ["<0xC3>", "<0xA9>"]  # "é" in UTF-8: encoded through byte fallback, decoded in two steps
CHARACTERS = ["▁"] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,!?':-\n")
WORDS = ["▁hello", "▁world", "▁the", "▁is", "▁you", "▁are", "▁how", "in", "er"]

CHAT_TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set messages = messages[1:] %}
{% else %}
    {% set system = 'You are tiny.' %}
{% endif %}
{{ bos_token }}<|system|>
{{ system }}
{% for message in messages %}
    {% if message['role'] == 'user' %}
<|user|>
{{ message['content'] | trim }}
    {% elif message['role'] == 'assistant' %}
<|assistant|>
{{ message['content'] }}{{ eos_token }}
    {% else %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}"""


def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    tokens = SPECIALS + BYTES + CHARACTERS
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        for end in range(2, len(word) + 1):
            left, right = word[:end - 1], word[end - 1]
            if word[:end] not in tokens:
                merges.append((left, right))
                tokens.append(word[:end])
    assert len(tokens) <= 128, len(tokens)
    return {token: i for i, token in enumerate(tokens)}, merges


def build_tokenizer() -> "object":
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab, merges = vocabulary()
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", vocab["<s>"])])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tokenizer


def write_tokenizer(directory: str, *, chat_template: bool = True) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json."""
    os.makedirs(directory, exist_ok=True)
    build_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "model_max_length": 512, "clean_up_tokenization_spaces": False}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)


PROMPTS = ["hello world", "how are you? the world is hello.", "Caf\u00e9 au lait!", "  spaced  out  "]
CHATS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "user", "content": "  how are you?  "}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
     {"role": "assistant", "content": "the world"}, {"role": "user", "content": "Caf\u00e9?"}],
]
