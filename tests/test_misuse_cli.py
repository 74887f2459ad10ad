"""The misuse catalogue, part two (see tests/test_misuse.py): checkpoints, `qtrace export` flags,
`qtrace generate` and `qtrace dump`.

Library cases use the shared harness. A command-line case runs `qtrace.cli.main` and must exit with
status 2 and a one-line `qtrace <command>: error: ...` on stderr that names the flag or file and the
value (never a traceback); a failed export must leave its output directory as it was (absent stays
absent, an existing one keeps exactly its files).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

import qtrace
from qtrace import cli
from qtrace.examples.checkpoint import CheckpointError, load_checkpoint, read_safetensors, write_safetensors
from qtrace.examples.config import ConfigError

from misuse_harness import Case, catalogue, check_case, ids

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
LLAMA = os.path.join(FIXTURES, "llama")
CTX_LEN, PREFILL_LEN, VOCAB = 32, 8, 128
CASES: list[Case] = []


# -- checkpoints (a damaged copy of the tiny Llama fixture per case) -----------------------------------
misuse = catalogue(CASES, "checkpoints")


def damaged(edit: Callable[[str], None]) -> str:
    """A copy of the Llama fixture checkpoint with `edit(directory)` applied."""
    directory = tempfile.mkdtemp(prefix="qtrace-misuse-")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(LLAMA, name), directory)
    edit(directory)
    return directory


def edit_config(**changes: Any) -> Callable[[str], None]:
    def edit(directory: str) -> None:
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            config = json.load(f)
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        with open(path, "w") as f:
            json.dump(config, f)

    return edit


def edit_tensors(change: Callable[[dict[str, np.ndarray]], None]) -> Callable[[str], None]:
    def edit(directory: str) -> None:
        path = os.path.join(directory, "model.safetensors")
        tensors = {name: np.array(array) for name, array in read_safetensors(path).items()}
        change(tensors)
        write_safetensors(path, tensors)

    return edit


def write_file(name: str, data: bytes) -> Callable[[str], None]:
    def edit(directory: str) -> None:
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)

    return edit


@misuse(CheckpointError, "no-such-checkpoint", "not a directory", located=False)
def checkpoint_missing():
    load_checkpoint(os.path.join(tempfile.gettempdir(), "no-such-checkpoint"))


@misuse(ConfigError, "config.json", located=False)
def checkpoint_without_config():
    load_checkpoint(damaged(lambda d: os.remove(os.path.join(d, "config.json"))))


@misuse(ConfigError, "config.json", located=False)
def config_not_json():
    load_checkpoint(damaged(write_file("config.json", b"{'hidden_size': 64,")))


@misuse(ConfigError, "config.json", "hidden_size", located=False)
def config_without_hidden_size():
    load_checkpoint(damaged(edit_config(hidden_size=None)))


@misuse(ConfigError, "config.json", "hidden_size", "'sixty-four'", located=False)
def config_hidden_size_not_a_number():
    load_checkpoint(damaged(edit_config(hidden_size="sixty-four")))


@misuse(ConfigError, "config.json", "num_key_value_heads", "= 3 does not divide num_attention_heads = 4",
        located=False)
def config_kv_heads_do_not_divide():
    load_checkpoint(damaged(edit_config(num_key_value_heads=3)))


@misuse(ConfigError, "config.json", "unsupported architecture ['BertModel']", located=False)
def config_unknown_architecture():
    load_checkpoint(damaged(edit_config(architectures=["BertModel"])))


@misuse(CheckpointError, "no *.safetensors files", located=False)
def checkpoint_without_weights():
    load_checkpoint(damaged(lambda d: os.remove(os.path.join(d, "model.safetensors"))))


@misuse(CheckpointError, "model.safetensors", "not a readable safetensors file", "exceeds the file size",
        located=False)
def safetensors_truncated():
    def truncate(directory: str) -> None:
        with open(os.path.join(directory, "model.safetensors"), "r+b") as f:
            f.truncate(100)

    load_checkpoint(damaged(truncate))


@misuse(CheckpointError, "model.safetensors", "not a readable safetensors file", located=False)
def safetensors_header_not_json():
    load_checkpoint(damaged(write_file("model.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{x")))


@misuse(CheckpointError, "model.safetensors", "model.norm.weight is missing", "[64]", located=False)
def checkpoint_tensor_missing():
    load_checkpoint(damaged(edit_tensors(lambda t: t.pop("model.norm.weight"))))


@misuse(CheckpointError, "model.safetensors", "model.norm.weight has shape [63]", "[64]", located=False)
def checkpoint_tensor_wrong_shape():
    load_checkpoint(damaged(edit_tensors(lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))))


@misuse(CheckpointError, "model.safetensors", "unsupported dtype", "C64", located=False)
def checkpoint_tensor_unsupported_dtype():
    def complex_header(directory: str) -> None:
        header = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + b"\0" * 8)

    load_checkpoint(damaged(complex_header))


@misuse(CheckpointError, "model.safetensors", "byte range that does not fit", located=False)
def safetensors_offsets_past_the_file():
    def bad_offsets(directory: str) -> None:
        header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header + b"\0" * 8)

    load_checkpoint(damaged(bad_offsets))


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_misuse(case: Case) -> None:
    check_case(case)


# -- the command line ---------------------------------------------------------------------------------------


@dataclass
class CliCase:
    name: str
    argv: Callable[[str], list[str]]  # given the output directory
    parts: tuple[str, ...]
    existing_output: bool  # run with an output directory that already holds a file


CLI_CASES: list[CliCase] = []


def cli_misuse(*parts: str, existing_output: bool = False) -> Callable[[Callable[[str], list[str]]], Any]:
    def register(fn: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
        CLI_CASES.append(CliCase(fn.__name__, fn, parts, existing_output))
        return fn

    return register


@functools.lru_cache(maxsize=None)
def exported(*options: str) -> str:
    """A directory holding an export of the tiny Llama fixture (made once per option set)."""
    out = os.path.join(tempfile.mkdtemp(prefix="qtrace-misuse-export-"), "out")
    argv = ["export", LLAMA, "-o", out, "--ctx-len", str(CTX_LEN), "--prefill-seq-len", str(PREFILL_LEN), *options]
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0
    return out


def exported_copy(edit: Callable[[str], None], *options: str) -> str:
    """A copy of an export with `edit(directory)` applied."""
    copy = os.path.join(tempfile.mkdtemp(prefix="qtrace-misuse-"), "out")
    shutil.copytree(exported(*options), copy)
    edit(copy)
    return copy


def export(out: str, *flags: str) -> list[str]:
    return ["export", LLAMA, "-o", out, *flags]


@cli_misuse("--ctx-len", ">= 1", "got 0")
def export_ctx_len_zero(out):
    return export(out, "--ctx-len", "0")


@cli_misuse("--ctx-len", ">= 1", "got -8", existing_output=True)
def export_ctx_len_negative(out):
    return export(out, "--ctx-len", "-8")


@cli_misuse("--prefill-seq-len", ">= 1", "got 0")
def export_prefill_zero(out):
    return export(out, "--prefill-seq-len", "0")


@cli_misuse("--prefill-seq-len 64 is longer than --ctx-len 32", existing_output=True)
def export_prefill_longer_than_context(out):
    return export(out, "--ctx-len", "32", "--prefill-seq-len", "64")


@cli_misuse("--batch-size", ">= 1", "got 0")
def export_batch_size_zero(out):
    return export(out, "--batch-size", "0")


@cli_misuse("--full-batch-size", ">= 1", "got 0", existing_output=True)
def export_full_batch_size_zero(out):
    return export(out, "--full-batch-size", "0")


@cli_misuse("--batch-size 4 exceeds --full-batch-size 2")
def export_batch_larger_than_full_batch(out):
    return export(out, "--full-batch-size", "2", "--batch-size", "4")


@cli_misuse("--num-cores", ">= 1", "got 0")
def export_num_cores_zero(out):
    return export(out, "--num-cores", "0")


@cli_misuse("--mos", ">= 1", "got -1", existing_output=True)
def export_mos_negative(out):
    return export(out, "--mos", "-1")


@cli_misuse("--ctx-len", "invalid int value", "'long'")
def export_ctx_len_not_a_number(out):
    return export(out, "--ctx-len", "long")


@cli_misuse("--dtype", "invalid choice", "'int8'")
def export_dtype_unknown(out):
    return export(out, "--dtype", "int8")


@cli_misuse("--dtype bfloat16 needs --hw ai200", existing_output=True)
def export_bfloat16_for_ai100(out):
    return export(out, "--dtype", "bfloat16")


@cli_misuse("--weights", "invalid choice", "'link'")
def export_weights_mode_unknown(out):
    return export(out, "--weights", "link")


@cli_misuse("--kv-cache-precision", "invalid choice", "'int4'")
def export_kv_precision_unknown(out):
    return export(out, "--kv-cache-precision", "int4")


@cli_misuse("-o", "is a file")
def export_output_is_a_file(out):
    open(out, "w").close()
    return export(out)


@cli_misuse("needs a CHECKPOINT_DIR and -o OUT")
def export_without_output(out):
    return ["export", LLAMA]


@cli_misuse("no-such-checkpoint", "not a directory")
def export_missing_checkpoint(out):
    return ["export", os.path.join(tempfile.gettempdir(), "no-such-checkpoint"), "-o", out]


@cli_misuse("config.json", "num_key_value_heads", existing_output=True)
def export_checkpoint_with_bad_config(out):
    return ["export", damaged(edit_config(num_key_value_heads=3)), "-o", out]


@cli_misuse("model.safetensors", "model.norm.weight is missing", existing_output=True)
def export_checkpoint_missing_a_tensor(out):
    return ["export", damaged(edit_tensors(lambda t: t.pop("model.norm.weight"))), "-o", out]


def generate(model_dir: str, *flags: str) -> list[str]:
    return ["generate", model_dir, *flags]


@cli_misuse("--prompt-ids", "token id 128 is outside the vocabulary", "0..127")
def generate_token_past_the_vocabulary(out):
    return generate(exported(), "--prompt-ids", "1,2,128")


@cli_misuse("--prompt-ids", "token id -3 is outside the vocabulary")
def generate_negative_token(out):
    return generate(exported(), "--prompt-ids", "1,-3")


@cli_misuse("--max-new-tokens must be >= 1, got 0")
def generate_zero_new_tokens(out):
    return generate(exported(), "--prompt-ids", "1,2", "--max-new-tokens", "0")


@cli_misuse("--max-new-tokens must be >= 1, got -2")
def generate_negative_new_tokens(out):
    return generate(exported(), "--prompt-ids", "1,2", "--max-new-tokens", "-2")


@cli_misuse("a prompt of 30 tokens plus 8 new ones exceeds ctx_len 32")
def generate_prompt_longer_than_the_context(out):
    return generate(exported(), "--prompt-ids", ",".join(["5"] * 30))


@cli_misuse("--prompt-ids", "holds no token id")
def generate_empty_prompt(out):
    return generate(exported(), "--prompt-ids", "")


@cli_misuse("--prompt-ids must be comma-separated integers", "'1;2'")
def generate_malformed_prompt(out):
    return generate(exported(), "--prompt-ids", "1;2")


@cli_misuse("needs either --prompt TEXT or --prompt-ids IDS")
def generate_without_a_prompt(out):
    return generate(exported())


@cli_misuse("no-such-export", "no model.onnx")
def generate_missing_directory(out):
    return generate(os.path.join(tempfile.gettempdir(), "no-such-export"), "--prompt-ids", "1")


@cli_misuse("specializations.json", "not a readable specializations file")
def generate_corrupt_specializations(out):
    return generate(exported_copy(write_file("specializations.json", b"{\"specializations\": [")), "--prompt-ids", "1")


@cli_misuse("specializations.json", "Prefill seq_len 0", "cannot run")
def generate_prefill_length_zero(out):
    def zero_prefill(directory: str) -> None:
        path = os.path.join(directory, "specializations.json")
        with open(path) as f:
            specs = json.load(f)
        specs["specializations"][0]["symbols"]["seq_len"] = "0"
        with open(path, "w") as f:
            json.dump(specs, f)

    return generate(exported_copy(zero_prefill), "--prompt-ids", "1")


@cli_misuse("no model.onnx")
def generate_without_the_model(out):
    return generate(exported_copy(lambda d: os.remove(os.path.join(d, "model.onnx"))), "--prompt-ids", "1")


@cli_misuse("expected FILE.py:FUNCTION", "'model.py'")
def dump_target_without_a_function(out):
    return ["dump", "model.py"]


@cli_misuse("no-such-file.py")
def dump_missing_file(out):
    return ["dump", os.path.join(tempfile.gettempdir(), "no-such-file.py") + ":f", "--example", "f32[3]"]


@cli_misuse("has no missing_function")
def dump_missing_function(out):
    return ["dump", __file__ + ":missing_function", "--example", "f32[3]"]


@cli_misuse("--after must be trace or one of", "got 'fusion'")
def dump_after_an_unknown_pass(out):
    return ["dump", __file__ + ":dumped", "--example", "f32[3]", "--after", "fusion"]


@cli_misuse("--example 'f32[3' is not a spec")
def dump_malformed_spec(out):
    return ["dump", __file__ + ":dumped", "--example", "f32[3"]


@cli_misuse("--example", "'q8[3]'", "not a dtype")
def dump_unknown_dtype(out):
    return ["dump", __file__ + ":dumped", "--example", "q8[3]"]


def dumped(x):
    """The function the dump cases trace."""
    return x * 2


def snapshot(directory: str) -> dict[str, bytes] | None:
    if not os.path.exists(directory):
        return None
    if os.path.isfile(directory):
        return {"": open(directory, "rb").read()}
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def run_cli(argv: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse: usage errors
            status = exc.code
    return status, stderr.getvalue()


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: f"cli-{c.name}")
def test_cli_misuse(case: CliCase) -> None:
    parent = tempfile.mkdtemp(prefix="qtrace-misuse-out-")
    out = os.path.join(parent, "out")
    if case.existing_output:
        os.makedirs(out)
        with open(os.path.join(out, "keep.txt"), "w") as f:
            f.write("an earlier file")
    argv = case.argv(out)
    before = snapshot(out)
    status, stderr = run_cli(argv)
    assert status == 2, f"{case.name}: exit status {status}, stderr:\n{stderr}"
    assert "Traceback" not in stderr
    for part in case.parts:
        assert part in stderr, f"{case.name}: {part!r} is not in:\n{stderr}"
    assert snapshot(out) == before, f"{case.name}: the output changed"
    assert sorted(os.listdir(parent)) == (["out"] if before is not None else []), "scratch files left behind"


# -- NaN weights: export warns, generate stops ------------------------------------------------------------


def test_nan_weights_export_warns_and_generate_stops(tmp_path):
    def poison(tensors: dict[str, np.ndarray]) -> None:
        tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = np.nan
        tensors["lm_head.weight"][0, 0] = np.inf

    checkpoint = damaged(edit_tensors(poison))
    out = str(tmp_path / "out")
    with pytest.warns(qtrace.NonFiniteWeightsWarning) as record:
        status, stderr = run_cli(["export", checkpoint, "-o", out, "--ctx-len", "32", "--prefill-seq-len", "8"])
    assert status == 0, stderr
    message = str(record[0].message)
    assert "2 weight tensor(s) hold NaN or inf: lm_head.weight, model.layers.0.mlp.up_proj.weight" in message
    status, stderr = run_cli(["generate", out, "--prompt-ids", "1,2,3"])
    assert status == 2 and "NumericsError" in stderr and "NaN or inf" in stderr and "Traceback" not in stderr


def test_catalogue_size() -> None:
    import test_misuse

    assert len(test_misuse.CASES) + len(CASES) + len(CLI_CASES) >= 150
