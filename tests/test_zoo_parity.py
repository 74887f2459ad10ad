"""Parity with Hugging Face transformers for every family of the model zoo.

Each fixture under tests/fixtures/<name>/ is a tiny random-weight checkpoint saved by transformers'
`save_pretrained`, with the family's characteristic features switched on at values that change the
logits (sliding windows shorter than the prompt, softcaps that bite, partial rotary, explicit
head_dim, longrope switching to its long factors while decoding, tied and untied heads), and
transformers' own logits and greedy tokens in reference.npz (made by tests/fixtures/make_hf_reference.py,
which needs torch and transformers; these tests do not).

Every fixture is exported by qtrace and run on plain onnxruntime the way QEfficient's runtime drives
it: prefill chunks of 8 (every prompt is longer than 8 tokens and than any window), one padded chunk
of 16, and a continuous-batching export whose slots serve several prompts in reverse order. The
logits of the prefill and 8 decode steps must equal transformers' within 1e-4 x the largest logit,
and the greedy tokens must be identical; a float16 export must pick the same first 8 tokens.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

from qtrace.examples.checkpoint import export_model, load_checkpoint
from qtrace.examples.generation import (cache_layout, eager_step, generate, model_cache_layout, new_cache,
                                        onnx_session, onnx_step, prefill)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
NAMES = sorted(d for d in os.listdir(FIXTURES) if os.path.isfile(os.path.join(FIXTURES, d, "reference.npz")))
CTX_LEN = 32
RELATIVE_TOLERANCE = 1e-4
OTHER_PROMPTS = [[5, 9, 2], [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]]  # padded; two chunks

# name -> (prefill length, full batch size, the slot the prompt uses)
DRIVERS = {"chunks_of_8": (8, None, None), "one_padded_chunk_of_16": (16, None, None), "slot_2_of_3": (8, 3, 2)}


def load_reference(name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(FIXTURES, name, "reference.npz")) as data:
        return {key: data[key] for key in data.files}


def fixture_config(name: str) -> dict[str, Any]:
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: Any) -> Any:
    """Export directories, made on first use: (fixture name, driver or "float16") -> directory."""
    made: dict[tuple[str, str], str] = {}

    def get(name: str, driver: str) -> str:
        if (name, driver) not in made:
            prefill_len, full_batch_size, _ = DRIVERS.get(driver, (8, None, None))
            float16 = driver == "float16"
            model = load_checkpoint(os.path.join(FIXTURES, name), dtype=np.float16 if float16 else np.float32)
            out = str(tmp_path_factory.mktemp(f"{name}-{driver}"))
            export_model(model, out, ctx_len=CTX_LEN, prefill_seq_len=prefill_len, full_batch_size=full_batch_size,
                         dtype="float16" if float16 else "float32")
            made[name, driver] = out
        return made[name, driver]

    return get


def run_steps(step: Any, layout: Any, prompt: list[int], decode_steps: int, prefill_len: int,
              full_batch_size: int | None = None, slot: int | None = None) -> tuple[np.ndarray, list[int]]:
    """The logits of the prefill (its last chunk) and of each greedy decode step, and the tokens."""
    cache = new_cache(layout, full_batch_size or 1, CTX_LEN)
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


def run_on_onnxruntime(model_dir: str, prompt: list[int], decode_steps: int, prefill_len: int,
                       full_batch_size: int | None, slot: int | None) -> tuple[np.ndarray, list[int]]:
    session = onnx_session(model_dir)
    return run_steps(onnx_step(session), cache_layout(session), prompt, decode_steps, prefill_len, full_batch_size,
                     slot)


def transformers_logits(reference: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([reference["prefill_logits"][None], reference["decode_logits"]])


def relative_errors(logits: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return np.abs(logits.astype(np.float64) - expected).max(axis=-1) / np.abs(expected).max()


@pytest.mark.parametrize("driver", list(DRIVERS))
@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name: str, driver: str, exports: Any) -> None:
    reference = load_reference(name)
    prefill_len, full_batch_size, slot = DRIVERS[driver]
    logits, _ = run_on_onnxruntime(exports(name, driver), reference["prompt"].tolist(), len(reference["decode_logits"]),
                                   prefill_len, full_batch_size, slot)
    errors = relative_errors(logits, transformers_logits(reference))
    assert errors.max() <= RELATIVE_TOLERANCE, f"max |logit error| / max |logit| per step (prefill, decode): {errors}"


@pytest.mark.parametrize("driver", list(DRIVERS))
@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_match_transformers(name: str, driver: str, exports: Any) -> None:
    reference = load_reference(name)
    prefill_len, full_batch_size, slot = DRIVERS[driver]
    _, tokens = run_on_onnxruntime(exports(name, driver), reference["prompt"].tolist(),
                                   len(reference["decode_logits"]), prefill_len, full_batch_size, slot)
    assert tokens == reference["tokens"].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_continuous_batching_in_reverse_slot_order_gives_each_prompt_its_own_tokens(name: str, exports: Any) -> None:
    """Three prompts prefilled into slots 2, 1, 0 of a 3-slot cache, then decoded together: the
    fixture prompt gets transformers' tokens, the others the tokens they get alone."""
    reference = load_reference(name)
    prompts = [reference["prompt"].tolist(), *OTHER_PROMPTS]
    new_tokens = len(reference["tokens"])
    batched_session, alone_session = onnx_session(exports(name, "slot_2_of_3")), onnx_session(exports(name, "chunks_of_8"))
    batched = generate(onnx_step(batched_session), prompts, new_tokens, prefill_len=8, ctx_len=CTX_LEN,
                       layout=cache_layout(batched_session), full_batch_size=3)
    alone = generate(onnx_step(alone_session), OTHER_PROMPTS, new_tokens, prefill_len=8, ctx_len=CTX_LEN,
                     layout=cache_layout(alone_session))
    assert batched[0] == reference["tokens"].tolist()
    assert batched[1:] == alone


@pytest.mark.parametrize("name", NAMES)
def test_float16_export_picks_transformers_first_8_tokens(name: str, exports: Any) -> None:
    reference = load_reference(name)
    _, tokens = run_on_onnxruntime(exports(name, "float16"), reference["prompt"].tolist(), 7, 8, None, None)
    assert tokens == reference["tokens"].tolist()[:8]


# -- the fixtures test what they claim ------------------------------------------------------------------

# A feature switched off in the config (name -> config change) must move the eager model's logits
# away from transformers': the fixture really exercises it.
SWITCHED_OFF = {
    "mistral": {"sliding_window": None},
    "qwen2_window": {"use_sliding_window": False},
    "phi3": {"sliding_window": None},
    "phi3#long_factors": {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5, "original_max_position_embeddings": 16,
                                              "short_factor": [1.0, 1.1, 1.3, 1.6],
                                              "long_factor": [1.0, 1.1, 1.3, 1.6]}},
    "gemma2": {"attn_logit_softcapping": None},
    "gemma2#final": {"final_logit_softcapping": None},
    "gemma2#window": {"sliding_window": 1000},
    "gemma3": {"sliding_window": 1000},
    "granite": {"residual_multiplier": 1.0},
    "llama_yarn": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "llama3_rope": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    "gpt2": {"scale_attn_by_inverse_layer_idx": False},
    "starcoder2": {"sliding_window": None},
    "gptj": {"rotary_dim": 16},
    "codegen": {"rotary_dim": 8},
    "phi": {"qk_layernorm": False},
    "phi#partial_rotary": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 1.0}},
    "mpt": {"attn_config": {"clip_qkv": None}},
}


@pytest.mark.parametrize("case", list(SWITCHED_OFF))
def test_each_fixture_feature_changes_the_logits(case: str, tmp_path: Any) -> None:
    name = case.split("#")[0]
    reference = load_reference(name)
    config = {**fixture_config(name), **SWITCHED_OFF[case]}
    os.symlink(os.path.join(FIXTURES, name, "model.safetensors"), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_checkpoint(str(tmp_path))
    fn, _ = model.signature(max_ctx_len=CTX_LEN)
    logits, _ = run_steps(eager_step(fn), model_cache_layout(model), reference["prompt"].tolist(),
                          len(reference["decode_logits"]), 8)
    assert relative_errors(logits, transformers_logits(reference)).max() > 100 * RELATIVE_TOLERANCE


@pytest.mark.parametrize("name", NAMES)
def test_eager_numpy_model_matches_transformers_too(name: str) -> None:
    """The model function run on numpy (the reference lowering is checked against) agrees as well."""
    reference = load_reference(name)
    model = load_checkpoint(os.path.join(FIXTURES, name))
    fn, _ = model.signature(max_ctx_len=CTX_LEN)
    logits, tokens = run_steps(eager_step(fn), model_cache_layout(model), reference["prompt"].tolist(),
                               len(reference["decode_logits"]), 8)
    assert relative_errors(logits, transformers_logits(reference)).max() <= RELATIVE_TOLERANCE
    assert tokens == reference["tokens"].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_a_transformers_checkpoint_with_its_reference(name: str) -> None:
    """The fixture holds what the parity tests rely on: a save_pretrained directory, 1 + 8 steps, a
    prompt that needs two prefill chunks and outlasts the sliding window, and no near-tie among the
    greedy tokens' logits."""
    config = fixture_config(name)
    assert "transformers_version" in config
    reference = load_reference(name)
    assert "transformers" in str(reference["versions"])
    assert reference["decode_logits"].shape == (8, config["vocab_size"])
    assert reference["tokens"].shape == (9,)
    prompt = reference["prompt"].size
    assert 8 < prompt and prompt + reference["tokens"].size <= CTX_LEN
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    assert window is None or window > 100 or window < prompt
    ordered = np.sort(transformers_logits(reference), axis=-1)
    assert (ordered[:, -1] - ordered[:, -2]).min() >= 0.1
    assert os.path.getsize(os.path.join(FIXTURES, name, "model.safetensors")) < 1 << 20


def test_longrope_fixture_switches_to_long_factors_while_decoding() -> None:
    config, reference = fixture_config("phi3"), load_reference("phi3")
    original = config["rope_parameters"]["original_max_position_embeddings"]
    assert reference["prompt"].size < original < reference["prompt"].size + len(reference["decode_logits"])


def test_llama3_rope_fixture_uses_scaled_frequencies() -> None:
    """transformers >= 5 writes rope_theta and the llama3 scaling inside `rope_parameters`."""
    cfg = load_checkpoint(os.path.join(FIXTURES, "llama3_rope")).cfg
    assert cfg.rope.theta == 500000.0 and cfg.rope.kind == "llama3"


def test_transformers_4_config_layout_reads_the_same(tmp_path: Any) -> None:
    """transformers 4.x wrote rope_theta and rope_scaling at the top level of config.json."""
    config = fixture_config("llama3_rope")
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(FIXTURES, "llama3_rope", "model.safetensors"), tmp_path / "model.safetensors")
    old_layout = load_checkpoint(str(tmp_path)).cfg
    new_layout = load_checkpoint(os.path.join(FIXTURES, "llama3_rope")).cfg
    assert old_layout == new_layout
