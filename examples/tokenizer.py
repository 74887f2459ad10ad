"""Text in and text out for an export: the checkpoint's tokenizer and chat template.

`qtrace export` copies the checkpoint's tokenizer files (`TOKENIZER_FILES`) next to the model;
`qtrace generate OUT --prompt "..."` encodes with `tokenizer.json` through the `tokenizers` library
and, with `--chat`, first renders the chat template the way transformers' `apply_chat_template`
does: jinja2's immutable sandbox with `trim_blocks` and `lstrip_blocks`, the loop-controls extension,
`raise_exception`, `strftime_now` and a `tojson` that leaves non-ASCII and HTML characters alone; the
template sees `messages`, `add_generation_prompt`, `tools`/`documents` (None) and the special tokens
(`bos_token`, `eos_token`, ...) as strings; the rendered text is encoded without adding special tokens
(the template writes them). The template comes from tokenizer_config.json's `chat_template` (a
string, or a list of named templates: "default"), else chat_template.jinja, else chat_template.json.

`tokenizers` and `jinja2` are imported only here, when text is asked for.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Iterable

from qtrace.errors import QtraceError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "tokenizer.model",
                   "vocab.json", "merges.txt")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(QtraceError, ValueError):
    """A tokenizer or chat template is missing or unusable."""


def tokenizer_files(directory: str) -> list[str]:
    """The tokenizer files a checkpoint directory holds (what an export copies)."""
    return [os.path.join(directory, name) for name in TOKENIZER_FILES if os.path.isfile(os.path.join(directory, name))]


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: not valid JSON ({exc})") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class TextTokenizer:
    """The tokenizer of an export (or checkpoint) directory."""

    def __init__(self, directory: str):
        self.directory = directory
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no tokenizer.json, so --prompt cannot encode text (export from a "
                                 "checkpoint directory that has one, or pass --prompt-ids)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError("--prompt needs the `tokenizers` package: pip install tokenizers") from None
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as exc:  # the Rust library raises a plain Exception for a malformed file
            raise TokenizerError(f"{path}: not a tokenizers file ({exc})") from None
        self.config = _read_json(os.path.join(directory, "tokenizer_config.json")) or {}
        legacy = _read_json(os.path.join(directory, "special_tokens_map.json")) or {}
        self.special_tokens = {key: text for key in SPECIAL_TOKENS
                               if (text := _token_text(self.config.get(key, legacy.get(key)))) is not None}

    # -- encoding and decoding ----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stop_ids(self) -> set[int]:
        """Tokens that end generation: generation_config.json's eos_token_id(s) and the eos token."""
        stops: set[int] = set()
        generation = _read_json(os.path.join(self.directory, "generation_config.json")) or {}
        eos = generation.get("eos_token_id")
        for token in eos if isinstance(eos, list) else [eos]:
            if isinstance(token, int):
                stops.add(token)
        eos_text = self.special_tokens.get("eos_token")
        eos_id = self.tokenizer.token_to_id(eos_text) if eos_text else None
        if eos_id is not None:
            stops.add(eos_id)
        return stops

    # -- chat -----------------------------------------------------------------------------------------
    def chat_template(self) -> tuple[str, str]:
        """(template, the file it came from)."""
        config_path = os.path.join(self.directory, "tokenizer_config.json")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default" when no tools are given
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template, config_path
        jinja_path = os.path.join(self.directory, "chat_template.jinja")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                return f.read(), jinja_path
        json_path = os.path.join(self.directory, "chat_template.json")
        template = (_read_json(json_path) or {}).get("chat_template")
        if isinstance(template, str):
            return template, json_path
        raise TokenizerError(f"{config_path}: no chat template (chat_template in tokenizer_config.json, "
                             "chat_template.jinja or chat_template.json), so --chat cannot format the prompt; "
                             "drop --chat to encode the text as it is")

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        template, source = self.chat_template()
        try:
            import jinja2
        except ImportError:
            raise TokenizerError("--chat needs the `jinja2` package: pip install jinja2") from None
        try:
            return _compile(template, source).render(messages=messages, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"{source}: the chat template fails: {exc}") from None

    def encode_chat(self, prompt: str) -> list[int]:
        """One user message through the chat template, with the assistant's turn opened."""
        return self.encode(self.render_chat([{"role": "user", "content": prompt}]), add_special_tokens=False)


def _compile(template: str, source: str) -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                               dict=lambda *args, **kwargs: dict(*args, **kwargs))
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"{source}: the chat template is not valid jinja2 (line {exc.lineno}: "
                             f"{exc.message})") from None


class TextStream:
    """Decoded text as tokens arrive: `push(token)` returns the text it completes (nothing while a
    multi-byte character is still partial); all the pieces together are `decode(tokens)`."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def finish(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return new


__all__ = ["TOKENIZER_FILES", "TextStream", "TextTokenizer", "TokenizerError", "tokenizer_files"]
