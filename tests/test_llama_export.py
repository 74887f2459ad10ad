"""Exporting a Llama-family checkpoint (examples/checkpoint.py) and running the export the way
QEfficient's runtime does (examples/generation.py), checked against independent truths: the eager
numpy model run without padding or batching, onnxruntime, transformers' tokens (the committed
fixtures of test_llama_hf_parity.py) and the file formats of docs/architecture.md, "Cloud AI 100 conventions".

Covers: padding, prompts of several prefill chunks, continuous batching with cache slots in any
order, float16 exports, `weights="reference"`, corrupt or incomplete checkpoints, the compiler's
side files, the model's input/output interface and the `qtrace export` / `qtrace generate` CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from typing import Any, Callable

import numpy as np
import onnx
import pytest

import qtrace
from qtrace import cli
from qtrace.examples.blocks import Model
from qtrace.examples.checkpoint import CheckpointError, checkpoint_tensors, export_model, load_checkpoint, random_model
from qtrace.examples.config import ConfigError
from qtrace.examples.families.llama import tiny_config
from qtrace.examples.generation import cache_layout, eager_step, generate, new_cache, onnx_session, onnx_step, prefill

from conftest import optimized_op_counts

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LLAMA = os.path.join(FIXTURES, "llama")
CTX_LEN = 32
PREFILL_LEN = 8
INT32_MAX = 2147483647
TOLERANCE = 1e-4

PROMPTS = {
    "short": [5, 9, 2],                                             # padded: 3 of 8
    "one_chunk": [3, 14, 15, 92, 65, 35, 89, 79],                   # exactly one chunk
    "several_chunks": [2, 71, 82, 81, 82, 84, 59, 4, 52, 35, 36, 28, 1, 17, 42, 99, 7, 3, 120],  # 8 + 8 + 3
}


# -- safetensors, written and read independently of examples/checkpoint.py ------------------------------

_DTYPE_CODES = {"float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64"}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], dtype_codes: dict[str, str] | None = None) -> None:
    """The safetensors layout: u64 little-endian header length, JSON header, raw C-order data."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, array in tensors.items():
        code = (dtype_codes or {}).get(name, _DTYPE_CODES[array.dtype.name])
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def read_header(path: str) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def read_tensors(path: str) -> dict[str, np.ndarray]:
    header, start = read_header(path)
    codes = {v: k for k, v in _DTYPE_CODES.items()}
    with open(path, "rb") as f:
        data = f.read()
    return {name: np.frombuffer(data[start + info["data_offsets"][0]:start + info["data_offsets"][1]],
                                codes[info["dtype"]]).reshape(info["shape"])
            for name, info in header.items() if name != "__metadata__"}


def copy_checkpoint(source: str, target: str) -> str:
    os.makedirs(target, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
    return target


def directory_state(path: str) -> dict[str, bytes] | None:
    """Every file under path with its content (None when path does not exist)."""
    if not os.path.exists(path):
        return None
    state = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                state[os.path.relpath(full, path)] = f.read()
    return state


# -- running a model -----------------------------------------------------------------------------------


def unpadded_run(step: Callable, prompt: list[int], new_tokens: int, cache: dict[str, np.ndarray],
                 batch_index: np.ndarray | None = None) -> tuple[list[int], list[np.ndarray]]:
    """The plainest use of the model: the whole prompt in one step with its own length (no padding,
    no chunks), then one token per step. Returns the greedy tokens and the logits of every step."""
    logits, cache = step(np.array([prompt], np.int64), np.arange(len(prompt))[None], cache, batch_index)
    tokens, seen = [int(np.argmax(logits[0, -1]))], [logits[0, -1]]
    for position in range(len(prompt), len(prompt) + new_tokens - 1):
        logits, cache = step(np.array([[tokens[-1]]], np.int64), np.array([[position]], np.int64), cache,
                             batch_index)
        tokens.append(int(np.argmax(logits[0, -1])))
        seen.append(logits[0, -1])
    return tokens, seen


def chunked_run(step: Callable, prompt: list[int], new_tokens: int, cache: dict[str, np.ndarray],
                prefill_len: int) -> tuple[list[int], list[np.ndarray]]:
    """QEfficient's way (generation.prefill: chunks padded with position -1), recording the logits."""
    seen: list[np.ndarray] = []

    def recording(*args: Any) -> Any:
        logits, new = step(*args)
        seen.append(logits[0, -1])
        return logits, new

    token, cache = prefill(recording, prompt, cache, prefill_len)
    logits = [seen[-1]]
    tokens = [token]
    for position in range(len(prompt), len(prompt) + new_tokens - 1):
        out, cache = step(np.array([[tokens[-1]]], np.int64), np.array([[position]], np.int64), cache, None)
        tokens.append(int(np.argmax(out[0, -1])))
        logits.append(out[0, -1])
    return tokens, logits


def max_error(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return float(np.abs(np.stack(a).astype(np.float64) - np.stack(b).astype(np.float64)).max())


@pytest.fixture(scope="module")
def checkpoint() -> Model:
    return load_checkpoint(LLAMA)


@pytest.fixture(scope="module")
def eager(checkpoint: Any) -> Callable:
    """The model function itself, run on numpy: the reference for every export."""
    fn, _ = checkpoint.signature()
    return eager_step(fn)


def eager_cache(model: Model, batch: int = 1) -> dict[str, np.ndarray]:
    return model.empty_cache(batch, CTX_LEN)


@pytest.fixture(scope="module")
def exported(checkpoint: Any, tmp_path_factory: Any) -> str:
    model = checkpoint
    out = str(tmp_path_factory.mktemp("llama"))
    export_model(model, out, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN)
    return out


@pytest.fixture(scope="module")
def exported_cb(checkpoint: Any, tmp_path_factory: Any) -> str:
    model = checkpoint
    out = str(tmp_path_factory.mktemp("llama-cb"))
    export_model(model, out, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN, full_batch_size=4)
    return out


def onnx_cache(model_dir: str, batch: int) -> dict[str, np.ndarray]:
    return new_cache(cache_layout(onnx_session(model_dir)), batch, CTX_LEN)


# -- padding and chunks --------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_chunked_prefill_matches_unpadded_eager_run(prompt: str, checkpoint: Any, eager: Callable,
                                                   exported: str) -> None:
    model = checkpoint
    tokens, logits = chunked_run(onnx_step(onnx_session(exported)), PROMPTS[prompt], 8, onnx_cache(exported, 1),
                                 PREFILL_LEN)
    expected_tokens, expected_logits = unpadded_run(eager, PROMPTS[prompt], 8, eager_cache(model))
    assert tokens == expected_tokens
    assert max_error(logits, expected_logits) <= TOLERANCE


def test_unpadded_onnx_run_matches_eager_run(checkpoint: Any, eager: Callable, exported: str) -> None:
    """seq_len is a symbolic dim: the export also takes a whole prompt of any length in one step."""
    model = checkpoint
    prompt = PROMPTS["several_chunks"]
    tokens, logits = unpadded_run(onnx_step(onnx_session(exported)), prompt, 6, onnx_cache(exported, 1))
    expected_tokens, expected_logits = unpadded_run(eager, prompt, 6, eager_cache(model))
    assert tokens == expected_tokens
    assert max_error(logits, expected_logits) <= TOLERANCE


def test_context_filled_to_its_last_slot_matches_unpadded_run(checkpoint: Any, eager: Callable,
                                                             exported: str) -> None:
    """Padding positions (-1) write the last cache slot; decoding up to that slot still agrees."""
    model = checkpoint
    prompt = PROMPTS["several_chunks"]                # 19 tokens: the last chunk has 5 padding rows
    new_tokens = CTX_LEN - len(prompt) + 1            # the last decode step feeds position CTX_LEN - 1
    tokens, logits = chunked_run(onnx_step(onnx_session(exported)), prompt, new_tokens, onnx_cache(exported, 1),
                                 PREFILL_LEN)
    expected_tokens, expected_logits = unpadded_run(eager, prompt, new_tokens, eager_cache(model))
    assert tokens == expected_tokens
    assert max_error(logits, expected_logits) <= TOLERANCE


def test_generate_matches_transformers_tokens(exported: str) -> None:
    with np.load(os.path.join(LLAMA, "reference.npz")) as reference:
        prompt, expected = reference["prompt"].tolist(), reference["tokens"].tolist()
    session = onnx_session(exported)
    tokens = generate(onnx_step(session), [prompt], len(expected), prefill_len=PREFILL_LEN, ctx_len=CTX_LEN,
                      layout=cache_layout(session))
    assert tokens == [expected]


# -- continuous batching -------------------------------------------------------------------------------


class SlotRunner:
    """Drives a continuous-batching export by hand: prefill a prompt into any slot at any time,
    decode all slots together with the rows of the batch in any order."""

    def __init__(self, model_dir: str, full_batch_size: int):
        self.step = onnx_step(onnx_session(model_dir))
        self.cache = onnx_cache(model_dir, full_batch_size)
        self.slots = full_batch_size
        self.position = [0] * full_batch_size
        self.last = [0] * full_batch_size
        self.tokens: dict[int, list[int]] = {}
        self.logits: dict[int, list[np.ndarray]] = {}

    def prefill(self, slot: int, prompt: list[int]) -> None:
        seen: list[np.ndarray] = []

        def recording(*args: Any) -> Any:
            logits, new = self.step(*args)
            seen.append(logits[0, -1])
            return logits, new

        token, self.cache = prefill(recording, prompt, self.cache, PREFILL_LEN, slot=slot)
        self.tokens[slot], self.logits[slot] = [token], [seen[-1]]
        self.position[slot], self.last[slot] = len(prompt), token

    def decode(self, row_order: list[int]) -> None:
        """One decode step for every slot, batch row r serving slot row_order[r]."""
        ids = np.array([[self.last[s]] for s in row_order], np.int64)
        positions = np.array([[self.position[s]] for s in row_order], np.int64)
        logits, self.cache = self.step(ids, positions, self.cache, np.array(row_order, np.int64)[:, None])
        for row, slot in enumerate(row_order):
            if slot in self.tokens:
                token = int(np.argmax(logits[row, -1]))
                self.tokens[slot].append(token)
                self.logits[slot].append(logits[row, -1])
                self.last[slot] = token
                self.position[slot] += 1


def test_continuous_batching_in_arbitrary_slot_order_matches_unbatched_runs(checkpoint: Any, eager: Callable,
                                                                          exported_cb: str) -> None:
    model = checkpoint
    runner = SlotRunner(exported_cb, 4)
    assignment = {2: PROMPTS["several_chunks"], 0: PROMPTS["short"], 3: PROMPTS["one_chunk"]}  # slot 1 idle
    for slot in (3, 2, 0):                            # prefilled in neither slot nor prompt order
        runner.prefill(slot, assignment[slot])
    orders = np.random.default_rng(0).permuted(np.tile(np.arange(4), (7, 1)), axis=1)
    for order in orders:                              # every step feeds the slots in another order
        runner.decode(order.tolist())
    for slot, prompt in assignment.items():
        expected_tokens, expected_logits = unpadded_run(eager, prompt, 8, eager_cache(model))
        assert runner.tokens[slot] == expected_tokens, f"slot {slot}"
        assert max_error(runner.logits[slot], expected_logits) <= TOLERANCE, f"slot {slot}"


def test_prefill_between_decode_steps_leaves_other_slots_intact(checkpoint: Any, eager: Callable,
                                                                 exported_cb: str) -> None:
    model = checkpoint
    runner = SlotRunner(exported_cb, 4)
    runner.prefill(1, PROMPTS["one_chunk"])
    for _ in range(3):
        runner.decode([3, 1, 0, 2])
    runner.prefill(3, PROMPTS["several_chunks"])     # arrives while slot 1 is decoding
    for _ in range(4):
        runner.decode([1, 2, 3, 0])
    assert runner.tokens[1] == unpadded_run(eager, PROMPTS["one_chunk"], 8, eager_cache(model))[0]
    assert runner.tokens[3] == unpadded_run(eager, PROMPTS["several_chunks"], 5, eager_cache(model))[0]


def test_reused_slot_forgets_the_previous_prompt(checkpoint: Any, eager: Callable, exported_cb: str) -> None:
    """A short prompt in a slot whose cache still holds a longer, older sequence."""
    model = checkpoint
    runner = SlotRunner(exported_cb, 4)
    runner.prefill(2, PROMPTS["several_chunks"])
    for _ in range(4):
        runner.decode([0, 1, 2, 3])
    runner.prefill(2, PROMPTS["short"])
    for _ in range(5):
        runner.decode([2, 0, 3, 1])
    expected_tokens, expected_logits = unpadded_run(eager, PROMPTS["short"], 6, eager_cache(model))
    assert runner.tokens[2] == expected_tokens
    assert max_error(runner.logits[2], expected_logits) <= TOLERANCE


def test_generate_with_full_batch_size_matches_unbatched(checkpoint: Any, exported: str, exported_cb: str) -> None:
    model = checkpoint
    prompts = list(PROMPTS.values())
    common = dict(prefill_len=PREFILL_LEN, ctx_len=CTX_LEN)
    unbatched_session, batched_session = onnx_session(exported), onnx_session(exported_cb)
    unbatched = generate(onnx_step(unbatched_session), prompts, 8, layout=cache_layout(unbatched_session), **common)
    batched = generate(onnx_step(batched_session), prompts, 8, layout=cache_layout(batched_session),
                       full_batch_size=4, **common)
    assert batched == unbatched


# -- float16 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights_dtype", [np.float16, np.float32])
def test_float16_export_gives_the_float32_tokens(weights_dtype: Any, checkpoint: Any, exported: str,
                                                 tmp_path: Any) -> None:
    """float16 weights (as `qtrace export --dtype float16` loads them) or float32 weights lowered to
    float16: both run on onnxruntime in float16 and pick the float32 model's greedy tokens."""
    model = load_checkpoint(LLAMA, dtype=weights_dtype)
    export_model(model, str(tmp_path), ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN, dtype="float16")
    model = onnx.load(os.path.join(tmp_path, "model.onnx"), load_external_data=False)
    float_io = [v for v in list(model.graph.input) + list(model.graph.output) if "ids" not in v.name]
    assert {v.type.tensor_type.elem_type for v in float_io} == {onnx.TensorProto.FLOAT16}
    common = dict(prefill_len=PREFILL_LEN, ctx_len=CTX_LEN)
    half, full = onnx_session(str(tmp_path)), onnx_session(exported)
    prompts = list(PROMPTS.values())
    half_tokens = generate(onnx_step(half), prompts, 12, layout=cache_layout(half), **common)
    full_tokens = generate(onnx_step(full), prompts, 12, layout=cache_layout(full), **common)
    assert half_tokens == full_tokens


def test_float16_export_halves_the_weights(exported: str, tmp_path: Any) -> None:
    model = load_checkpoint(LLAMA, dtype=np.float16)
    export_model(model, str(tmp_path), ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN, dtype="float16")
    weights = os.path.getsize(os.path.join(exported, "model.onnx.data"))
    assert os.path.getsize(os.path.join(tmp_path, "model.onnx.data")) <= 0.55 * weights


# -- weights="reference" -------------------------------------------------------------------------------


def larger_checkpoint(directory: str) -> str:
    """A one-layer checkpoint whose weight matrices are each over 64 KiB (so no export would copy
    them to fold a transpose), written with the safetensors writer above."""
    config = tiny_config(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    write_safetensors(os.path.join(directory, "model.safetensors"), checkpoint_tensors(random_model(config, seed=3)))
    return directory


def test_reference_weights_point_into_the_checkpoint(tmp_path: Any) -> None:
    source = larger_checkpoint(str(tmp_path / "checkpoint"))
    checkpoint_file = os.path.join(source, "model.safetensors")
    model = load_checkpoint(source)
    copied, referenced = str(tmp_path / "copy"), str(tmp_path / "reference")
    export_model(model, copied, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN, weights="copy")
    export_model(model, referenced, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN, weights="reference")

    weights_bytes = os.path.getsize(checkpoint_file)
    assert os.path.getsize(os.path.join(copied, "model.onnx.data")) >= 0.9 * weights_bytes
    assert os.path.getsize(os.path.join(referenced, "model.onnx.data")) <= 0.1 * weights_bytes
    proto = onnx.load(os.path.join(referenced, "model.onnx"), load_external_data=False)
    locations = {entry.value for tensor in proto.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    # The entry names a file beside the model (a link of some kind) that is the checkpoint itself.
    assert any(os.path.samefile(os.path.join(referenced, location), checkpoint_file) for location in locations)

    prompt = PROMPTS["several_chunks"]
    results = [chunked_run(onnx_step(onnx_session(d)), prompt, 6, onnx_cache(d, 1), PREFILL_LEN)
               for d in (copied, referenced)]
    assert results[0][0] == results[1][0]
    np.testing.assert_array_equal(np.stack(results[0][1]), np.stack(results[1][1]))
    expected_tokens, expected_logits = unpadded_run(eager_step(model.signature()[0]), prompt, 6,
                                                    model.empty_cache(1, CTX_LEN))
    assert results[1][0] == expected_tokens
    assert max_error(results[1][1], expected_logits) <= TOLERANCE


# -- hoisting out of chained calls (a bug found on the way in qtrace/passes/functions.py) ----------------------------------------------


def test_hoisting_out_of_chained_function_calls_keeps_the_chain() -> None:
    """Two calls of one @qtrace.function, the second reading the first's result, with work inside
    that depends only on an argument both calls share (so the functions pass hoists it)."""
    from qtrace.primitives import where

    @qtrace.function
    def block(x: Any, position_ids: Any) -> Any:
        return where(position_ids > 0, x * 2.0, x)

    def model(x: Any, position_ids: Any) -> Any:
        return block(block(x, position_ids), position_ids)

    lowered = qtrace.lower(model, (qtrace.ShapeDtype(("b", 3), "float32"), qtrace.ShapeDtype(("b", 3), "int64")))
    x, positions = np.ones((2, 3), np.float32), np.array([[0, 1, 2], [-1, 0, 5]], np.int64)
    np.testing.assert_array_equal(lowered.run(x, positions), [[1, 4, 4], [1, 1, 4]])


# -- corrupt or incomplete checkpoints -----------------------------------------------------------------


def _rewrite_tensors(directory: str, change: Callable[[dict[str, np.ndarray]], None],
                     dtype_codes: dict[str, str] | None = None) -> None:
    path = os.path.join(directory, "model.safetensors")
    tensors = read_tensors(path)
    change(tensors)
    write_safetensors(path, tensors, dtype_codes)


def _rewrite_config(directory: str, change: Callable[[dict[str, Any]], None]) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    change(config)
    with open(path, "w") as f:
        json.dump(config, f)


def missing_tensor(d: str) -> list[str]:
    _rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    return ["model.safetensors", "model.layers.1.mlp.up_proj.weight", "missing"]


def wrong_shape(d: str) -> list[str]:
    def change(tensors: dict[str, np.ndarray]) -> None:
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)  # [32, 64] expected
    _rewrite_tensors(d, change)
    return ["model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[64, 64]", "[32, 64]"]


def unknown_architecture(d: str) -> list[str]:
    _rewrite_config(d, lambda c: c.update(architectures=["BloomForCausalLM"], model_type="bloom"))
    return ["config.json", "BloomForCausalLM", "LlamaForCausalLM"]


def bad_json(d: str) -> list[str]:
    with open(os.path.join(d, "config.json"), "r+") as f:
        text = f.read()
        f.seek(0)
        f.truncate()
        f.write(text[:len(text) // 2])
    return ["config.json", "JSON"]


def missing_config_field(d: str) -> list[str]:
    _rewrite_config(d, lambda c: c.pop("hidden_size"))
    return ["config.json", "hidden_size"]


def missing_config(d: str) -> list[str]:
    os.unlink(os.path.join(d, "config.json"))
    return ["config.json"]


def unsupported_rope(d: str) -> list[str]:
    _rewrite_config(d, lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                                           "factor": 4.0}))
    return ["config.json", "yarn"]


def truncated_weights(d: str) -> list[str]:
    path = os.path.join(d, "model.safetensors")
    header, start = read_header(path)
    size = os.path.getsize(path) - 1000
    with open(path, "r+b") as f:
        f.truncate(size)
    cut = [name for name, info in header.items() if name != "__metadata__" and start + info["data_offsets"][1] > size]
    return ["model.safetensors"] + cut[:1]


def garbage_weights(d: str) -> list[str]:
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(b"\xff" * 64 + b"not a safetensors file")
    return ["model.safetensors"]


def unsupported_dtype(d: str) -> list[str]:
    _rewrite_tensors(d, lambda t: None, dtype_codes={"model.norm.weight": "F8_E4M3"})
    return ["model.safetensors", "model.norm.weight", "F8_E4M3"]


def no_weights(d: str) -> list[str]:
    os.unlink(os.path.join(d, "model.safetensors"))
    return ["safetensors", os.path.basename(d)]


CORRUPTIONS = {f.__name__: (f, error) for f, error in [
    (missing_tensor, CheckpointError), (wrong_shape, CheckpointError), (unknown_architecture, ConfigError),
    (bad_json, ConfigError), (missing_config_field, ConfigError), (missing_config, ConfigError),
    (unsupported_rope, ConfigError), (truncated_weights, CheckpointError), (garbage_weights, CheckpointError),
    (unsupported_dtype, CheckpointError), (no_weights, CheckpointError)]}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_checkpoint_fails_naming_file_and_tensor(corruption: str, tmp_path: Any) -> None:
    corrupt, error = CORRUPTIONS[corruption]
    directory = copy_checkpoint(LLAMA, str(tmp_path / "checkpoint"))
    expected = corrupt(directory)
    with pytest.raises(error) as caught:
        load_checkpoint(directory)
    assert isinstance(caught.value, qtrace.QtraceError)
    for text in expected:
        assert text in str(caught.value), f"{text!r} not in {caught.value}"


@pytest.mark.parametrize("corruption", ["missing_tensor", "wrong_shape", "unknown_architecture", "bad_json"])
def test_cli_export_of_corrupt_checkpoint_writes_nothing(corruption: str, tmp_path: Any, capsys: Any) -> None:
    corrupt, _ = CORRUPTIONS[corruption]
    directory = copy_checkpoint(LLAMA, str(tmp_path / "checkpoint"))
    expected = corrupt(directory)
    out_parent = tmp_path / "exports"
    out_parent.mkdir()
    assert cli.main(["export", directory, "-o", str(out_parent / "out")]) == 2
    message = capsys.readouterr().err
    assert all(text in message for text in expected), message
    assert os.listdir(out_parent) == []


def test_failed_export_leaves_an_existing_out_dir_unchanged(tmp_path: Any, capsys: Any) -> None:
    directory = copy_checkpoint(LLAMA, str(tmp_path / "checkpoint"))
    missing_tensor(directory)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = directory_state(str(out))
    assert cli.main(["export", directory, "-o", str(out)]) == 2
    assert directory_state(str(out)) == before
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "out"]


def test_export_failing_while_writing_leaves_nothing(checkpoint: Any, tmp_path: Any, monkeypatch: Any) -> None:
    """A failure after the model is lowered (here: the disk fills up while saving) leaves no file in
    OUT_DIR and no scratch directory beside it."""
    model = checkpoint
    lowered_type = type(qtrace.lower(lambda x: x + 1, (np.zeros(2, np.float32),)))

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lowered_type, "save", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OSError):
        export_model(model, str(out), ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN)
    assert directory_state(str(out)) in (None, {})
    assert os.listdir(tmp_path) in ([], ["out"])


# -- the compiler's side files (docs/architecture.md, "Cloud AI 100 conventions") ---------------------------


@pytest.fixture(scope="module")
def default_export(checkpoint: Any, tmp_path_factory: Any) -> str:
    """Exported with export_model's defaults: ctx_len 128, prefill length 32, batch size 1."""
    model = checkpoint
    out = str(tmp_path_factory.mktemp("default"))
    export_model(model, out)
    return out


def test_specializations_json_is_the_design_documents(default_export: str) -> None:
    with open(os.path.join(default_export, "specializations.json")) as f:
        written = json.load(f)
    assert written == {"specializations": [
        {"name": "Prefill", "symbols": {"batch_size": "1", "ctx_len": "128", "seq_len": "32"}},
        {"name": "Decode", "symbols": {"batch_size": "1", "ctx_len": "128", "seq_len": "1"}}]}


def test_specializations_json_with_continuous_batching(checkpoint: Any, tmp_path: Any) -> None:
    model = checkpoint
    export_model(model, str(tmp_path), ctx_len=64, prefill_seq_len=16, full_batch_size=4)
    with open(os.path.join(tmp_path, "specializations.json")) as f:
        written = json.load(f)
    assert written == {"specializations": [
        {"name": "Prefill", "symbols": {"batch_size": "1", "ctx_len": "64", "seq_len": "16",
                                        "full_batch_size": "4", "full_batch_exec_size": "1"}},
        {"name": "Decode", "symbols": {"batch_size": "4", "ctx_len": "64", "seq_len": "1",
                                       "full_batch_size": "4"}}]}


def parse_custom_io(text: str) -> list[tuple[str, str]]:
    """The entries of a custom_io.yaml in the design's layout: ` - IOName: X` then `   Precision: P`."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) % 2 == 0, text
    entries = []
    for name_line, precision_line in zip(lines[::2], lines[1::2]):
        name = re.fullmatch(r" - IOName: (\S+)", name_line)
        precision = re.fullmatch(r"   Precision: (\S+)", precision_line)
        assert name and precision, (name_line, precision_line)
        entries.append((name.group(1), precision.group(1)))
    return entries


def test_custom_io_yaml_lists_every_cache_input_and_retained_state_output(default_export: str) -> None:
    with open(os.path.join(default_export, "custom_io.yaml")) as f:
        entries = parse_custom_io(f.read())
    expected = {f"{kind}.{i}{suffix}" for kind in ("past_key", "past_value") for i in range(2)
                for suffix in ("", "_RetainedState")}
    assert sorted(name for name, _ in entries) == sorted(expected)
    assert {precision for _, precision in entries} == {"float16"}
    model = onnx.load(os.path.join(default_export, "model.onnx"), load_external_data=False)
    io_names = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    assert expected <= io_names


def test_custom_io_yaml_parses_as_yaml(default_export: str) -> None:
    import yaml

    with open(os.path.join(default_export, "custom_io.yaml")) as f:
        entries = yaml.safe_load(f)
    assert entries[0] == {"IOName": "past_key.0", "Precision": "float16"}
    assert len(entries) == 8


COMPILE_COMMAND = ("qaic-compile -aic-hw -aic-hw-version=ai100 -m=model.onnx -retained-state -convert-to-fp16 "
                   "-aic-num-cores=16 -network-specialization-config=specializations.json "
                   "-custom-IO-list-file=custom_io.yaml -aic-binary-dir=qpc -sub-functions")


def test_compile_sh_holds_the_qaic_compile_command(default_export: str) -> None:
    path = os.path.join(default_export, "compile.sh")
    assert os.stat(path).st_mode & stat.S_IXUSR
    with open(path) as f:
        lines = f.read().splitlines()
    assert lines[0].startswith("#!")
    assert COMPILE_COMMAND in lines


def test_compile_sh_asks_for_sub_functions_only_with_layer_functions(checkpoint: Model, tmp_path: Any) -> None:
    """QEfficient adds -sub-functions whenever its export holds layer functions; an inlined export has none."""
    export_model(checkpoint, str(tmp_path), ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN, layer_functions=False)
    with open(os.path.join(tmp_path, "compile.sh")) as f:
        command = f.read().splitlines()[-1]
    assert command == COMPILE_COMMAND.replace(" -sub-functions", "")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_compile_sh_runs_the_compiler_on_the_exported_files(default_export: str, tmp_path: Any) -> None:
    """With a stand-in qaic-compile on PATH, run from elsewhere: the files it is given exist."""
    fake = tmp_path / "bin" / "qaic-compile"
    fake.parent.mkdir()
    fake.write_text("#!/usr/bin/env bash\npwd\nprintf '%s\\n' \"$@\"\n")
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", os.path.join(default_export, "compile.sh")], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, check=True)
    cwd, *arguments = result.stdout.splitlines()
    assert os.path.realpath(cwd) == os.path.realpath(default_export)
    assert " ".join(["qaic-compile", *arguments]) == COMPILE_COMMAND
    for flag in ("-m=", "-network-specialization-config=", "-custom-IO-list-file="):
        value = next(a for a in arguments if a.startswith(flag))[len(flag):]
        assert os.path.isfile(os.path.join(cwd, value)), value


# -- the model's interface (docs/architecture.md, "Cloud AI 100 conventions") -------------------------------


def io_signature(values: Any) -> list[tuple[str, str, list[Any]]]:
    return [(v.name, onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
             [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


def test_inputs_and_outputs_are_qefficients(exported: str) -> None:
    model = onnx.load(os.path.join(exported, "model.onnx"), load_external_data=False)
    cache = ["batch_size", 2, "ctx_len", 16]
    assert io_signature(model.graph.input) == [
        ("input_ids", "INT64", ["batch_size", "seq_len"]), ("position_ids", "INT64", ["batch_size", "seq_len"]),
        ("past_key.0", "FLOAT", cache), ("past_value.0", "FLOAT", cache),
        ("past_key.1", "FLOAT", cache), ("past_value.1", "FLOAT", cache)]
    assert io_signature(model.graph.output) == [
        ("logits", "FLOAT", ["batch_size", 1, 128]),
        ("past_key.0_RetainedState", "FLOAT", cache), ("past_value.0_RetainedState", "FLOAT", cache),
        ("past_key.1_RetainedState", "FLOAT", cache), ("past_value.1_RetainedState", "FLOAT", cache)]


def test_continuous_batching_inputs_and_outputs_are_qefficients(exported_cb: str) -> None:
    model = onnx.load(os.path.join(exported_cb, "model.onnx"), load_external_data=False)
    cache = ["full_batch_size", 2, "ctx_len", 16]
    assert io_signature(model.graph.input) == [
        ("input_ids", "INT64", ["batch_size", "seq_len"]), ("position_ids", "INT64", ["batch_size", "seq_len"]),
        ("past_key.0", "FLOAT", cache), ("past_value.0", "FLOAT", cache),
        ("past_key.1", "FLOAT", cache), ("past_value.1", "FLOAT", cache),
        ("batch_index", "INT64", ["batch_size", 1])]
    assert io_signature(model.graph.output)[0] == ("logits", "FLOAT", ["batch_size", 1, 128])
    assert [v.name for v in model.graph.output][1:] == [f"{k}.{i}_RetainedState" for i in range(2)
                                                        for k in ("past_key", "past_value")]


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return list(model.graph.node) + [n for f in model.functions for n in f.node]


@pytest.mark.parametrize("batching", ["plain", "continuous"])
def test_kv_cache_and_norm_use_the_cloud_ai_100_custom_ops(batching: str, exported: str, exported_cb: str) -> None:
    directory = exported if batching == "plain" else exported_cb
    model = onnx.load(os.path.join(directory, "model.onnx"), load_external_data=False)
    suffix = "" if batching == "plain" else "CB"
    nodes = all_nodes(model)
    scatters = [n for n in nodes if n.op_type == f"CtxScatter{suffix}"]
    gathers = [n for n in nodes if n.op_type == f"CtxGather{suffix}"]
    norms = [n for n in nodes if n.op_type == "CustomRMSNorm"]
    assert scatters and gathers and norms
    assert {n.domain for n in scatters + gathers} == {"com.qualcomm.cloud"}
    assert {n.domain for n in norms} == {"com.qti.aisw.onnx"}
    assert {len(n.input) for n in scatters} == {3 if batching == "plain" else 4}
    assert {len(n.input) for n in gathers} == {3 if batching == "plain" else 4}  # ..., ctx_indices, comp_ctx_len
    assert all(a.name == "epsilon" for n in norms for a in n.attribute)
    functions = {(f.domain, f.name) for f in model.functions}
    assert {("com.qualcomm.cloud", f"CtxScatter{suffix}"), ("com.qualcomm.cloud", f"CtxGather{suffix}"),
            ("com.qti.aisw.onnx", "CustomRMSNorm")} <= functions
    imports = {o.domain: o.version for o in model.opset_import}
    assert imports["com.qualcomm.cloud"] == imports["com.qti.aisw.onnx"] == 1
    assert imports[""] == 17


def test_saved_model_passes_onnx_full_check(exported: str) -> None:
    onnx.checker.check_model(os.path.join(exported, "model.onnx"), full_check=True)


def test_plain_onnxruntime_runs_the_export_as_saved(checkpoint: Any, exported: str) -> None:
    """No patching: the INT32_MAX invalid index is in the model and onnxruntime runs it as it is."""
    import onnxruntime as ort

    model = onnx.load(os.path.join(exported, "model.onnx"))
    constants = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
    constants += [onnx.numpy_helper.to_array(a.t) for n in all_nodes(model) for a in n.attribute
                  if a.type == onnx.AttributeProto.TENSOR]
    constants += [np.array(a.i) for n in all_nodes(model) for a in n.attribute if a.type == onnx.AttributeProto.INT]
    assert any(c.dtype.kind == "i" and (c == INT32_MAX).any() for c in constants)

    session = ort.InferenceSession(os.path.join(exported, "model.onnx"), providers=["CPUExecutionProvider"])
    model = checkpoint
    ids = np.array([PROMPTS["short"] + [0] * 5], np.int64)
    positions = np.array([[0, 1, 2, -1, -1, -1, -1, -1]], np.int64)
    cache = eager_cache(model)
    outputs = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"input_ids": ids, "position_ids": positions, **cache})))
    fn, _ = model.signature()
    expected = fn(ids, positions, cache)
    assert np.abs(outputs["logits"] - expected["logits"]).max() <= TOLERANCE
    for name in cache:
        assert np.abs(outputs[f"{name}_RetainedState"] - expected[name]).max() <= TOLERANCE


# -- the command line ----------------------------------------------------------------------------------


def reference_of(name: str) -> tuple[list[int], list[int]]:
    with np.load(os.path.join(FIXTURES, name, "reference.npz")) as reference:
        return reference["prompt"].tolist(), reference["tokens"].tolist()


def cli_generate(capsys: Any, model_dir: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    capsys.readouterr()
    argv = ["generate", model_dir, "--max-new-tokens", str(new_tokens)]
    for prompt in prompts:
        argv += ["--prompt-ids", ",".join(map(str, prompt))]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    return [[int(t) for t in line.split(",")] for line in lines[-len(prompts):]]


@pytest.mark.parametrize("options", [[], ["--dtype", "float16"],
                                     ["--weights", "reference"],
                                     ["--no-layer-functions"]], ids=["default", "float16", "reference", "inline"])
def test_cli_export_then_generate_gives_transformers_tokens(options: list[str], tmp_path: Any, capsys: Any) -> None:
    out = str(tmp_path / "out")
    assert cli.main(["export", LLAMA, "-o", out, "--ctx-len", str(CTX_LEN), "--prefill-seq-len", str(PREFILL_LEN),
                     *options]) == 0
    printed = capsys.readouterr().out
    assert f"LlamaForCausalLM -> {out}" in printed
    assert {"model.onnx", "specializations.json", "custom_io.yaml", "compile.sh"} <= set(os.listdir(out))
    prompt, expected = reference_of("llama")
    assert cli_generate(capsys, out, [prompt], len(expected)) == [expected]


def test_cli_generate_with_continuous_batching(tmp_path: Any, capsys: Any) -> None:
    out = str(tmp_path / "out")
    assert cli.main(["export", os.path.join(FIXTURES, "qwen2"), "-o", out, "--ctx-len", str(CTX_LEN),
                     "--prefill-seq-len", str(PREFILL_LEN), "--full-batch-size", "3"]) == 0
    qwen_prompt, qwen_tokens = reference_of("qwen2")
    prompts = [PROMPTS["short"], qwen_prompt, PROMPTS["several_chunks"]]
    batched = cli_generate(capsys, out, prompts, 9)
    assert batched[1] == qwen_tokens
    model = load_checkpoint(os.path.join(FIXTURES, "qwen2"))
    eager_qwen = eager_step(model.signature()[0])
    for prompt, tokens in zip(prompts, batched):
        assert tokens == unpadded_run(eager_qwen, prompt, 9, eager_cache(model))[0]


def test_cli_export_of_missing_directory_fails_cleanly(tmp_path: Any, capsys: Any) -> None:
    missing = str(tmp_path / "no-such-checkpoint")
    assert cli.main(["export", missing, "-o", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "qtrace export: error" in error and missing in error
    assert os.listdir(tmp_path) == []


def test_cli_generate_rejects_malformed_prompt_ids(exported: str, capsys: Any) -> None:
    assert cli.main(["generate", exported, "--prompt-ids", "1,two,3"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


def test_cli_generate_rejects_a_prompt_too_long_for_the_context(exported: str, capsys: Any) -> None:
    assert cli.main(["generate", exported, "--prompt-ids", ",".join(["1"] * CTX_LEN)]) == 2
    assert "ctx_len" in capsys.readouterr().err


def test_cli_main_is_the_installed_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "qtrace.cli", "generate", "--help"], capture_output=True,
                            text=True)
    assert result.returncode == 0 and "--prompt-ids" in result.stdout
    with open(os.path.join(os.path.dirname(os.path.dirname(FIXTURES)), "pyproject.toml")) as f:
        assert 'qtrace = "qtrace.cli:console_main"' in f.read()


def test_a_bad_flag_fails_before_numpy_networkx_or_onnx_load() -> None:
    """`import qtrace` holds only the exception types (the rest loads on first use), so the command
    rejects a bad flag at once; the names a user reaches for still resolve."""
    code = ("import sys; import qtrace\n"
            "heavy = {'numpy', 'networkx', 'onnx'} & set(sys.modules)\n"
            "from qtrace.cli import main\n"
            "try:\n"
            "    main(['export', 'ckpt', '-o', 'out', '--no-such-flag'])\n"
            "except SystemExit as exc:\n"
            "    status = exc.code\n"
            "heavy |= {'numpy', 'networkx', 'onnx'} & set(sys.modules)\n"
            "print(status, sorted(heavy))\n"
            "print(qtrace.trace.__module__, qtrace.ShapeDtype.__module__, qtrace.primitives.__name__, qtrace.ir.__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["2 []", "qtrace.tracing qtrace.ir qtrace.primitives qtrace.ir"]
    assert "--no-such-flag" in result.stderr


@pytest.mark.parametrize("checkpoint_dir, status", [(LLAMA, 0), (os.path.join(FIXTURES, "no-such-dir"), 2)],
                         ids=["export", "error"])
def test_command_exits_quickly_yet_flushes_its_output_and_runs_atexit(checkpoint_dir: Any, status: int,
                                                                      tmp_path: Any) -> None:
    """console_main skips the interpreter's teardown: the exit status, everything printed (to pipes,
    which buffer) and atexit handlers must survive that, and the export must be complete on disk."""
    script = ("import atexit, sys; atexit.register(lambda: print('atexit ran', flush=True)); "
              "from qtrace.cli import console_main; sys.argv[0] = 'qtrace'; console_main()")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", script, "export", checkpoint_dir, "-o", str(out),
                             "--ctx-len", "16", "--prefill-seq-len", "4"], capture_output=True, text=True)
    assert result.returncode == status, result.stderr
    assert result.stdout.rstrip().endswith("atexit ran")
    if status:
        assert "error:" in result.stderr and not out.exists()
    else:
        assert "LlamaForCausalLM ->" in result.stdout and "time: load" in result.stdout
        onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


def test_export_covers_a_context_longer_than_max_position_embeddings(tmp_path: Any) -> None:
    """The RoPE tables are sized for the exported ctx_len, so positions past max_position_embeddings
    still index them (onnxruntime agrees with the eager model at the last slot)."""
    model = random_model(tiny_config(max_position_embeddings=8), seed=5)
    out = str(tmp_path / "long")
    export_model(model, out, ctx_len=32, prefill_seq_len=8)
    step = onnx_step(onnx_session(out))
    cache = onnx_cache(out, 1)
    ids, positions = np.array([[3]], np.int64), np.array([[31]], np.int64)
    logits, _ = step(ids, positions, cache, None)
    eager = model.signature(max_ctx_len=32)[0]
    expected = eager(ids, positions, model.empty_cache(1, 32))["logits"]
    assert np.max(np.abs(logits - expected)) <= TOLERANCE


def test_cli_compile_options_reach_compile_sh_and_custom_io(tmp_path: Any, capsys: Any) -> None:
    """-mxfp6-matmul, -mos=N, -aic-enable-depth-first and an mxint8 KV cache are opt-in (docs/architecture.md,
    "Cloud AI 100 conventions")."""
    out = str(tmp_path / "out")
    assert cli.main(["export", LLAMA, "-o", out, "--ctx-len", str(CTX_LEN), "--prefill-seq-len", str(PREFILL_LEN),
                     "--num-cores", "14", "--mxfp6-matmul", "--mos", "2", "--depth-first",
                     "--kv-cache-precision", "mxint8"]) == 0
    with open(os.path.join(out, "compile.sh")) as f:
        command = f.read().splitlines()[-1].split()
    assert command[0] == "qaic-compile"
    assert {"-aic-num-cores=14", "-mxfp6-matmul", "-mos=2", "-aic-enable-depth-first"} <= set(command)
    assert "-aic-num-cores=16" not in command
    import yaml

    with open(os.path.join(out, "custom_io.yaml")) as f:
        entries = yaml.safe_load(f)
    assert {e["Precision"] for e in entries} == {"mxint8"} and len(entries) == 8


def test_the_tiny_llama_graph_stays_small_and_onnxruntime_shares_its_cache_index_work(tmp_path):
    """The graph-quality budget for the tiny Llama of the onnxruntime benchmark (hidden 256, 2 layers,
    8 query / 4 KV heads, ctx_len 128): at most 157 nodes with the layer functions inlined and the
    custom ops whole (QEfficient's export of it has 522), no K/V repeat for the query groups, and, once
    onnxruntime has inlined and optimized it, one NonZero for the step's four cache writes and no
    run-time head numbers (they are folded from the cache's static corner)."""
    config = tiny_config(vocab_size=512, hidden_size=256, intermediate_size=688, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=32, max_position_embeddings=128)
    export_model(random_model(config), str(tmp_path / "tiny"), ctx_len=128, prefill_seq_len=32)
    model = onnx.load(str(tmp_path / "tiny" / "model.onnx"), load_external_data=False)
    layer_functions = {f.name: f for f in model.functions if f.domain == "qtrace.local"}
    inlined = sum(len(layer_functions[n.op_type].node) if n.domain == "qtrace.local" else 1 for n in model.graph.node)
    assert inlined <= 157, inlined
    for function in layer_functions.values():  # the groups share their K/V: nothing expands or tiles them
        assert not {"Expand", "Tile"} & {node.op_type for node in function.node}

    kernels = optimized_op_counts(str(tmp_path / "tiny" / "model.onnx"))
    assert kernels["ScatterND"] == 4 and kernels["NonZero"] == 1, kernels
    assert kernels["CumSum"] == 0 and kernels["ConstantOfShape"] == 0, kernels
