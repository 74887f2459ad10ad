"""Parity with Hugging Face transformers: tiny random-weight Llama, Mistral and Qwen2 checkpoints,
saved by transformers' `save_pretrained`, exported by qtrace and run on plain onnxruntime, give
transformers' own logits (float32, max abs error <= 1e-4) for a prefill step and 8 decode steps,
and transformers' greedy tokens.

The checkpoints and transformers' numbers are committed fixtures under tests/fixtures/<name>/,
made by tests/fixtures/make_hf_reference.py (which needs torch and transformers; these tests do
not). Each fixture's reference.npz holds the prompt, the logits at its last position, the logits
of 8 greedy decode steps and the 9 greedy tokens.

Every fixture runs three ways: prefill chunks of 8 (every prompt is longer than 8 tokens or
padded), one padded chunk of 16, and a continuous-batching export whose cache slot 2 of 3 serves
the prompt.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

from qtrace.examples.checkpoint import export_model, load_checkpoint
from qtrace.examples.generation import cache_layout, new_cache, onnx_session, onnx_step, prefill

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMES = ["llama", "llama3_rope", "llama_tied", "mistral", "qwen2"]
CTX_LEN = 32
TOLERANCE = 1e-4

# name -> (prefill length, full batch size, the slot the prompt uses)
DRIVERS = {"chunks_of_8": (8, None, None), "one_chunk_of_16": (16, None, None), "slot_2_of_3": (8, 3, 2)}


def load_reference(name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(FIXTURES, name, "reference.npz")) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: Any) -> dict[tuple[str, str], str]:
    """Export directories, made on first use: (fixture name, driver) -> directory."""
    made: dict[tuple[str, str], str] = {}

    def get(name: str, driver: str) -> str:
        if (name, driver) not in made:
            prefill_len, full_batch_size, _ = DRIVERS[driver]
            model = load_checkpoint(os.path.join(FIXTURES, name))
            out = str(tmp_path_factory.mktemp(f"{name}-{driver}"))
            export_model(model, out, ctx_len=CTX_LEN, prefill_seq_len=prefill_len,
                         full_batch_size=full_batch_size)
            made[name, driver] = out
        return made[name, driver]

    return get


def run_on_onnxruntime(model_dir: str, prompt: list[int], decode_steps: int, prefill_len: int,
                       full_batch_size: int | None, slot: int | None) -> tuple[np.ndarray, list[int]]:
    """The logits of the prefill (its last chunk) and of each greedy decode step, and the tokens."""
    session = onnx_session(model_dir)
    cache = new_cache(cache_layout(session), full_batch_size or 1, CTX_LEN)
    step = onnx_step(session)
    seen: list[np.ndarray] = []

    def recording_step(*args: Any) -> Any:
        logits, new = step(*args)
        seen.append(logits)
        return logits, new

    token, cache = prefill(recording_step, prompt, cache, prefill_len, slot=slot)
    logits, tokens = [seen[-1][0, -1]], [token]
    batch_index = None if slot is None else np.array([[slot]], np.int64)
    for position in range(len(prompt), len(prompt) + decode_steps):
        out, cache = step(np.array([[tokens[-1]]], np.int64), np.array([[position]], np.int64), cache, batch_index)
        logits.append(out[0, -1])
        tokens.append(int(np.argmax(out[0, -1])))
    return np.stack(logits), tokens


@pytest.mark.parametrize("driver", list(DRIVERS))
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name: str, driver: str, exports: Any) -> None:
    reference = load_reference(name)
    prefill_len, full_batch_size, slot = DRIVERS[driver]
    decode_steps = len(reference["decode_logits"])
    logits, _ = run_on_onnxruntime(exports(name, driver), reference["prompt"].tolist(), decode_steps,
                                   prefill_len, full_batch_size, slot)
    expected = np.concatenate([reference["prefill_logits"][None], reference["decode_logits"]])
    errors = np.abs(logits.astype(np.float64) - expected).max(axis=-1)
    assert errors.max() <= TOLERANCE, f"max |logit error| per step (prefill, decode 1..8): {errors}"


@pytest.mark.parametrize("driver", list(DRIVERS))
@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_transformers(name: str, driver: str, exports: Any) -> None:
    reference = load_reference(name)
    prefill_len, full_batch_size, slot = DRIVERS[driver]
    _, tokens = run_on_onnxruntime(exports(name, driver), reference["prompt"].tolist(),
                                   len(reference["decode_logits"]), prefill_len, full_batch_size, slot)
    assert tokens == reference["tokens"].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_a_transformers_checkpoint_with_its_reference(name: str) -> None:
    """The fixture holds what the parity tests rely on: a save_pretrained directory and 1 + 8 steps."""
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        config = json.load(f)
    assert "transformers_version" in config
    reference = load_reference(name)
    assert "transformers" in str(reference["versions"])
    assert reference["decode_logits"].shape == (8, config["vocab_size"])
    assert reference["tokens"].shape == (9,)
    assert reference["prompt"].size + reference["tokens"].size <= CTX_LEN
    assert os.path.getsize(os.path.join(FIXTURES, name, "model.safetensors")) < 1 << 20


def test_fixture_prompts_cover_padding_and_several_chunks() -> None:
    lengths = [load_reference(name)["prompt"].size for name in NAMES]
    assert any(n < 8 for n in lengths) and any(n > 8 and n % 8 for n in lengths)


def test_llama3_rope_fixture_uses_scaled_frequencies() -> None:
    """transformers >= 5 writes rope_theta and the llama3 scaling inside `rope_parameters`."""
    cfg = load_checkpoint(os.path.join(FIXTURES, "llama3_rope")).cfg
    assert cfg.rope.theta == 500000.0 and cfg.rope.kind == "llama3"


def test_transformers_4_config_layout_reads_the_same(tmp_path: Any) -> None:
    """transformers 4.x wrote rope_theta and rope_scaling at the top level of config.json."""
    with open(os.path.join(FIXTURES, "llama3_rope", "config.json")) as f:
        config = json.load(f)
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(FIXTURES, "llama3_rope", "model.safetensors"), tmp_path / "model.safetensors")
    old_layout = load_checkpoint(str(tmp_path)).cfg
    new_layout = load_checkpoint(os.path.join(FIXTURES, "llama3_rope")).cfg
    assert old_layout == new_layout
