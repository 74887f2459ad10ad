"""Text in, text out (examples/tokenizer.py, `qtrace generate --prompt [--chat]`): encoding, chat
templates and decoding equal transformers' (tests/fixtures/tokenizer_reference.json, recorded from the
same tokenizer by tests/fixtures/make_tokenizer_reference.py), and the text `qtrace generate --prompt`
streams is what the tokenizer decodes from the ids `qtrace generate --prompt-ids` produces.

The tokenizer is built at test time with the `tokenizers` library (tests/tokenizer_fixture.py).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest

from qtrace import cli
from qtrace.examples.tokenizer import TextStream, TextTokenizer, TokenizerError, tokenizer_files

from tokenizer_fixture import CHATS, PROMPTS, write_tokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
with open(os.path.join(FIXTURES, "tokenizer_reference.json"), encoding="utf-8") as _f:
    REFERENCE = json.load(_f)
EOS = 2


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: Any) -> str:
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: str) -> TextTokenizer:
    return TextTokenizer(tokenizer_dir)


# -- against transformers -----------------------------------------------------------------------------


def test_reference_covers_the_fixture_prompts_and_chats() -> None:
    assert [p["text"] for p in REFERENCE["prompts"]] == PROMPTS
    assert [c["messages"] for c in REFERENCE["chats"]] == CHATS


@pytest.mark.parametrize("case", range(len(PROMPTS)))
def test_encoding_equals_transformers(case: int, tokenizer: TextTokenizer) -> None:
    expected = REFERENCE["prompts"][case]
    assert tokenizer.encode(expected["text"]) == expected["ids"]


@pytest.mark.parametrize("case", range(len(CHATS)))
def test_chat_template_renders_and_encodes_as_transformers(case: int, tokenizer: TextTokenizer) -> None:
    expected = REFERENCE["chats"][case]
    text = tokenizer.render_chat(expected["messages"])
    assert text == expected["text"]
    assert tokenizer.encode(text, add_special_tokens=False) == expected["ids"]


def test_one_user_message_encodes_as_transformers_chat(tokenizer: TextTokenizer) -> None:
    expected = REFERENCE["chats"][0]
    assert tokenizer.encode_chat(expected["messages"][0]["content"]) == expected["ids"]


def test_chat_template_honours_trim_and_lstrip_blocks(tokenizer: TextTokenizer) -> None:
    """Hand-computed: block tags on their own lines leave no blank lines or indentation behind."""
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}]) == \
        "<s><|system|>\nYou are tiny.\n<|user|>\nhi\n<|assistant|>\n"
    assert tokenizer.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=False) == \
        "<s><|system|>\nYou are tiny.\n<|user|>\nhi\n"


@pytest.mark.parametrize("case", range(len(REFERENCE["decoded"])))
def test_decoding_equals_transformers(case: int, tokenizer: TextTokenizer) -> None:
    expected = REFERENCE["decoded"][case]
    assert tokenizer.decode(expected["ids"]) == expected["text"]


def test_stream_waits_for_a_whole_character_and_joins_to_the_decoded_text(tokenizer: TextTokenizer) -> None:
    ids = tokenizer.encode("Caf\u00e9 au lait!", add_special_tokens=False)
    stream = TextStream(tokenizer)
    pieces = [stream.push(token) for token in ids]
    assert "" in pieces  # the first byte of "é" alone prints nothing
    assert "".join(pieces) + stream.finish() == tokenizer.decode(ids) == "Caf\u00e9 au lait!"
    assert not any("\ufffd" in piece for piece in pieces)


def test_stop_ids_hold_the_end_of_sequence_token(tokenizer: TextTokenizer) -> None:
    assert tokenizer.stop_ids() == {EOS}


# -- bad tokenizers and templates ---------------------------------------------------------------------


def test_template_raising_an_exception_names_its_file(tokenizer: TextTokenizer, tokenizer_dir: str) -> None:
    with pytest.raises(TokenizerError, match="unknown role robot") as error:
        tokenizer.render_chat([{"role": "robot", "content": "beep"}])
    assert os.path.join(tokenizer_dir, "tokenizer_config.json") in str(error.value)


def test_missing_chat_template_names_the_config(tmp_path: Any) -> None:
    write_tokenizer(str(tmp_path), chat_template=False)
    with pytest.raises(TokenizerError, match="no chat template") as error:
        TextTokenizer(str(tmp_path)).encode_chat("hello")
    assert os.path.join(str(tmp_path), "tokenizer_config.json") in str(error.value)


def test_chat_template_file_is_used_when_the_config_has_none(tmp_path: Any) -> None:
    write_tokenizer(str(tmp_path), chat_template=False)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert TextTokenizer(str(tmp_path)).render_chat([{"role": "user", "content": "x"}]) == "[x]"


def test_missing_tokenizer_json_names_the_file(tmp_path: Any) -> None:
    with pytest.raises(TokenizerError, match="no tokenizer.json") as error:
        TextTokenizer(str(tmp_path))
    assert str(tmp_path / "tokenizer.json") in str(error.value)


def test_malformed_tokenizer_json_names_the_file(tmp_path: Any) -> None:
    (tmp_path / "tokenizer.json").write_text("{\"model\": 42}")
    with pytest.raises(TokenizerError, match="not a tokenizers file") as error:
        TextTokenizer(str(tmp_path))
    assert str(tmp_path / "tokenizer.json") in str(error.value)


# -- qtrace export + generate --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: Any, tokenizer_dir: str) -> str:
    checkpoint = str(tmp_path_factory.mktemp("checkpoint"))
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(os.path.join(FIXTURES, "llama", name), os.path.join(checkpoint, name))
    for path in tokenizer_files(tokenizer_dir):
        shutil.copyfile(path, os.path.join(checkpoint, os.path.basename(path)))
    out = str(tmp_path_factory.mktemp("export"))
    assert cli.main(["export", checkpoint, "-o", out, "--ctx-len", "64", "--prefill-seq-len", "8"]) == 0
    return out


def run_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def generated_ids(capsys: Any, model_dir: str, prompt: list[int], new_tokens: int) -> list[int]:
    code, out, err = run_cli(capsys, "generate", model_dir, "--prompt-ids", ",".join(map(str, prompt)),
                             "--max-new-tokens", str(new_tokens))
    assert code == 0, err
    return [int(t) for t in out.split(",")]


def until_stop(ids: list[int]) -> list[int]:
    return ids[:ids.index(EOS)] if EOS in ids else ids


def test_export_copies_the_tokenizer_files(exported: str, tokenizer_dir: str) -> None:
    for path in tokenizer_files(tokenizer_dir):
        with open(path, "rb") as original, open(os.path.join(exported, os.path.basename(path)), "rb") as copy:
            assert copy.read() == original.read()


@pytest.mark.parametrize("prompt", ["hello world", "how are you? the world is hello."])
def test_generate_prompt_prints_the_text_of_the_generated_ids(prompt: str, exported: str,
                                                              tokenizer: TextTokenizer, capsys: Any) -> None:
    ids = generated_ids(capsys, exported, tokenizer.encode(prompt), 12)
    code, out, err = run_cli(capsys, "generate", exported, "--prompt", prompt, "--max-new-tokens", "12")
    assert code == 0, err
    assert out == tokenizer.decode(until_stop(ids)) + "\n"
    assert "tokens/s" in err or len(until_stop(ids)) <= 1


def test_generate_chat_uses_the_chat_template_as_transformers(exported: str, tokenizer: TextTokenizer,
                                                              capsys: Any) -> None:
    chat = REFERENCE["chats"][0]
    ids = generated_ids(capsys, exported, chat["ids"], 12)  # transformers' ids of the templated prompt
    code, out, err = run_cli(capsys, "generate", exported, "--prompt", chat["messages"][0]["content"], "--chat",
                             "--max-new-tokens", "12")
    assert code == 0, err
    assert out == tokenizer.decode(until_stop(ids)) + "\n"
    assert f"prefill of {len(chat['ids'])} prompt tokens" in err


@pytest.mark.parametrize("flags, message", [
    ([], "either --prompt TEXT or --prompt-ids"),
    (["--prompt", "hi", "--prompt-ids", "1,2"], "either --prompt TEXT or --prompt-ids"),
    (["--prompt-ids", "1,2", "--chat"], "--chat formats a --prompt"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_generate_rejects_contradicting_flags(flags: list[str], message: str, exported: str, capsys: Any) -> None:
    code, out, err = run_cli(capsys, "generate", exported, *flags)
    assert code == 2 and message in err and out == ""


def test_generate_prompt_without_a_tokenizer_says_so(tmp_path: Any, capsys: Any) -> None:
    out = str(tmp_path / "out")
    assert cli.main(["export", os.path.join(FIXTURES, "llama"), "-o", out, "--ctx-len", "32",
                     "--prefill-seq-len", "8"]) == 0
    code, _, err = run_cli(capsys, "generate", out, "--prompt", "hello")
    assert code == 2 and "no tokenizer.json" in err and "--prompt-ids" in err


def test_streaming_stops_at_the_end_of_sequence_token(tokenizer: TextTokenizer, capsys: Any) -> None:
    hello, world = tokenizer.encode("hello world", add_special_tokens=False)
    capsys.readouterr()
    stream = cli._TextStream(tokenizer, prompt_tokens=3)
    assert stream(0, [hello, EOS, world]) is True  # ends the sequence
    stream.close()
    out, err = capsys.readouterr()
    assert out == "hello\n"
    assert "1 new tokens" in err


def test_decoder_shows_tokens_as_they_come_and_stops_when_asked(exported: str) -> None:
    from qtrace.examples.generation import Decoder, Executable

    decoder = Decoder(Executable.load(exported))
    prompt = [1, 83, 88]
    full = decoder.generate([prompt], 8)[0]
    seen: list[list[int]] = []
    stopped = decoder.generate([prompt], 8, on_tokens=lambda i, new: seen.append(new) or sum(map(len, seen)) >= 3)
    assert seen[0] == full[:1] and all(len(new) == 1 for new in seen)  # the first after prefill, then one a step
    assert stopped == [full[:3]]


def test_generate_prompt_on_a_continuous_batching_export_gives_the_same_text(exported: str, tmp_path: Any,
                                                                              capsys: Any) -> None:
    """The prompt runs in slot 0 of 3; the idle slots decode at position -1 and change nothing."""
    source = str(tmp_path / "checkpoint")
    os.makedirs(source)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(os.path.join(FIXTURES, "llama", name), os.path.join(source, name))
    for path in tokenizer_files(exported):
        shutil.copyfile(path, os.path.join(source, os.path.basename(path)))
    batched = str(tmp_path / "cb")
    assert cli.main(["export", source, "-o", batched, "--ctx-len", "64", "--prefill-seq-len", "8",
                     "--full-batch-size", "3"]) == 0
    texts = [run_cli(capsys, "generate", d, "--prompt", "how are you?", "--max-new-tokens", "10")[1]
             for d in (exported, batched)]
    assert texts[0] == texts[1] and texts[0].strip()
