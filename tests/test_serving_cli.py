"""`qtrace export` / `qtrace generate` serving flags: documented in --help, bad values and
combinations refused with a clear error before any work, and the modes end to end."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
import pytest

from qtrace.cli import build_parser, main

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LLAMA = os.path.join(FIXTURES, "llama")
EXPORT_FLAGS = ["--ccl-enabled", "--comp-ctx-lengths-prefill", "--comp-ctx-lengths-decode", "--num-speculative-tokens",
                "--prefill-only", "--decode-only", "--sampling", "--max-top-k-ids", "--return-pdfs", "--num-devices"]
GENERATE_FLAGS = ["--decode-model", "--draft", "--prompt-lookup", "--temperature", "--top-k", "--top-p", "--min-p",
                  "--repetition-penalty", "--presence-penalty", "--seed"]


def help_text(command: str) -> str:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[command].format_help()


@pytest.mark.parametrize("command, flags", [("export", EXPORT_FLAGS), ("generate", GENERATE_FLAGS)])
def test_help_documents_every_serving_flag(command: str, flags: list[str]) -> None:
    text = help_text(command)
    actions = {opt: a for a in build_parser()._subparsers._group_actions[0].choices[command]._actions
               for opt in a.option_strings}
    for flag in flags:
        assert flag in text
        assert actions[flag].help, f"{flag} has no help text"


def run(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flags, message", [
    (["--comp-ctx-lengths-prefill", "16,256"], r"--comp-ctx-lengths-prefill 16,256: 256 is larger than --ctx-len 128"),
    (["--comp-ctx-lengths-decode", "16,x"], r"--comp-ctx-lengths-decode must be comma-separated integers"),
    (["--num-speculative-tokens", "0"], r"K must be >= 1"),
    (["--num-speculative-tokens", "-2"], r"K must be >= 1"),
    (["--decode-only", "--prefill-seq-len", "16"], r"--decode-only .*--prefill-seq-len 16 has no meaning"),
    (["--prefill-only", "--decode-only"], r"exclude each other"),
    (["--sampling", "--num-speculative-tokens", "3"], r"--sampling with --num-speculative-tokens"),
    (["--max-top-k-ids", "8"], r"--max-top-k-ids needs --sampling"),
    (["--num-devices", "0"], r"--num-devices must be >= 1"),
    (["--kv-blocks", "2", "--ccl-enabled"], r"--kv-blocks with compute-context lengths"),
])
def test_bad_export_flags_fail_before_any_work(flags: list[str], message: str, tmp_path: Any, capsys: Any) -> None:
    """The checkpoint does not even exist: the flags are checked first, nothing is written."""
    out = tmp_path / "out"
    try:
        code, _, err = run(["export", str(tmp_path / "no-such-checkpoint"), "-o", str(out), *flags], capsys)
    except SystemExit as exc:  # argparse's own type errors
        code, err = exc.code, capsys.readouterr().err
    assert code == 2
    assert len(re.findall(message, err)) == 1, err
    assert "Traceback" not in err and not out.exists()


@pytest.fixture(scope="module")
def cli_exports(tmp_path_factory: Any) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    flags = {"plain": [], "target": ["--num-speculative-tokens", "3", "--comp-ctx-lengths-prefill", "8,16",
                                     "--comp-ctx-lengths-decode", "24"],
             "sampling": ["--sampling", "--max-top-k-ids", "16"], "prefill": ["--prefill-only"],
             "ccl_auto": ["--ccl-enabled"],
             "decode": ["--decode-only"]}
    made = {}
    for kind, extra in flags.items():
        base = [] if kind == "decode" else ["--prefill-seq-len", "8"]
        assert main(["export", LLAMA, "-o", str(root / kind), "--ctx-len", "64", *base, *extra]) == 0
        made[kind] = str(root / kind)
    return made


def prompt() -> str:
    with np.load(os.path.join(LLAMA, "reference.npz")) as data:
        return ",".join(map(str, data["prompt"]))


def expected() -> str:
    with np.load(os.path.join(LLAMA, "reference.npz")) as data:
        return ",".join(map(str, data["tokens"]))


def test_generate_runs_every_mode_to_the_plain_tokens(cli_exports: dict[str, str], capsys: Any) -> None:
    capsys.readouterr()
    common = ["--prompt-ids", prompt(), "--max-new-tokens", "9"]
    for argv in (["generate", cli_exports["plain"], *common],
                 ["generate", cli_exports["target"], *common, "--draft", cli_exports["plain"]],
                 ["generate", cli_exports["target"], *common, "--prompt-lookup", "2"],
                 ["generate", cli_exports["prefill"], *common, "--decode-model", cli_exports["decode"]],
                 ["generate", cli_exports["ccl_auto"], *common],
                 ["generate", cli_exports["sampling"], *common, "--temperature", "0.8", "--top-k", "1", "--seed", "5"]):
        code, out, err = run(argv, capsys)
        assert code == 0, err
        assert out.strip() == expected()
        if "--draft" in argv:
            assert "acceptance rate 1.000" in err


def test_ccl_enabled_writes_qefficients_automatic_buckets(cli_exports: dict[str, str]) -> None:
    """Up to 4096 positions QEfficient makes one bucket, ctx_len, for both phases; de-duplication then
    lowers the prefill one by 32."""
    with open(os.path.join(cli_exports["ccl_auto"], "specializations.json")) as f:
        written = json.load(f)["specializations"]
    assert [(e["name"], e["symbols"]["comp_ctx_lengths"]) for e in written] == [("Prefill", "32"), ("Decode", "64")]


def test_sampling_is_reproducible_from_the_seed(cli_exports: dict[str, str], capsys: Any) -> None:
    argv = ["generate", cli_exports["sampling"], "--prompt-ids", prompt(), "--max-new-tokens", "12",
            "--temperature", "1.5", "--seed"]
    first, again, other = (run(argv + [seed], capsys)[1] for seed in ("1", "1", "2"))
    assert first == again and first != other


@pytest.mark.parametrize("kind, flags, message", [
    ("target", ["--draft", "{plain}", "--prompt-lookup", "2"], r"--draft and --prompt-lookup are two proposers"),
    ("target", ["--prompt-lookup", "0"], r"--prompt-lookup needs an n-gram size >= 1"),
    ("target", [], r"speculative-decoding target compiled for K = \[3\] only: give a proposer"),
    ("plain", ["--temperature", "0.5"], r"has no on-device sampler: export it with --sampling"),
    ("sampling", ["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    ("sampling", ["--temperature", "-1"], r"--temperature must be >= 0"),
    ("target", ["--draft", "{plain}", "--temperature", "1"], r"speculative decoding is greedy"),
    ("prefill", [], r"prefill-only export: give the decode export too"),
    ("decode", [], r"decode-only export: give the prefill export first"),
    ("plain", ["--draft", "{plain}"], r"not a speculative-decoding target"),
    ("plain", ["--decode-model", "/no/such/export"], r"/no/such/export: no model.onnx"),
])
def test_bad_generate_requests_fail_with_a_clear_error(kind: str, flags: list[str], message: str,
                                                       cli_exports: dict[str, str], capsys: Any) -> None:
    flags = [f.format(**cli_exports) for f in flags]
    code, out, err = run(["generate", cli_exports[kind], "--prompt-ids", prompt(), *flags], capsys)
    assert code == 2 and out == ""
    assert re.search(message, err), err
    assert "Traceback" not in err
