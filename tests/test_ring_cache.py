"""Per-layer ring caches (`qtrace export --sliding-cache ring`): sliding-window and chunked layers keep
window + prefill_seq_len - 1 slots, written at position mod length, under a symbolic dim of their own
that specializations.json sizes. They must give the full caches' tokens and logits (within 1e-5 of the
largest logit) for prompts several windows long, prefilled in chunks, alone and in continuous
batching; a ring only as long as the window (QEfficient's) must not.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnx
import pytest

from qtrace import cli
from qtrace.examples.blocks.causal_lm import RING_DIMS, with_sliding_cache
from qtrace.examples.blocks.masks import ring_held_positions, ring_indices, ring_write_positions
from qtrace.examples.checkpoint import export_model, load_checkpoint
from qtrace.examples.config import CHUNKED, SLIDING, ConfigError
from qtrace.examples.generation import cache_layout, eager_step, generate, model_cache_layout, onnx_session, onnx_step

from conftest import INT32_MAX
from test_zoo_parity import FIXTURES

NAMES = ["mistral", "gemma2", "gpt_oss", "llama4"]  # all sliding; alternating; sliding + sinks; chunked + NoPE
CTX_LEN, PREFILL_LEN, NEW_TOKENS = 64, 8, 8
PROMPTS = [np.random.default_rng(n).integers(1, 120, size).tolist() for n, size in ((1, 37), (2, 5), (3, 22))]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def exports(tmp_path_factory: Any) -> Any:
    made: dict[tuple, str] = {}

    def get(name: str, mode: str, full_batch_size: int | None = None) -> str:
        key = (name, mode, full_batch_size)
        if key not in made:
            model = with_sliding_cache(load_checkpoint(os.path.join(FIXTURES, name)), mode)
            made[key] = str(tmp_path_factory.mktemp(f"{name}-{mode}-{full_batch_size}"))
            export_model(model, made[key], ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN,
                         full_batch_size=full_batch_size)
        return made[key]

    return get


def ring_sizes(model_dir: str) -> dict[str, int]:
    with open(os.path.join(model_dir, "specializations.json")) as f:
        symbols = json.load(f)["specializations"][0]["symbols"]
    return {k: int(v) for k, v in symbols.items() if k in RING_DIMS.values()}


def run(step: Any, layout: Any, sizes: dict[str, int], prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    """The logits of every prefill chunk and decode step, and the greedy tokens."""
    seen = []

    def recording(*args: Any) -> Any:
        logits, cache = step(*args)
        seen.append(logits[:, -1])
        return logits, cache

    tokens = generate(recording, [prompt], NEW_TOKENS, prefill_len=PREFILL_LEN, ctx_len=CTX_LEN, layout=layout,
                      sizes=sizes)[0]
    return np.concatenate(seen), tokens


def run_export(model_dir: str, prompt: list[int]) -> tuple[np.ndarray, list[int]]:
    session = onnx_session(model_dir)
    return run(onnx_step(session), cache_layout(session), ring_sizes(model_dir), prompt)


@pytest.mark.parametrize("name", NAMES)
def test_ring_caches_give_the_full_caches_tokens_and_logits(name: str, exports: Any) -> None:
    prompt = PROMPTS[0]
    full_logits, full_tokens = run_export(exports(name, "full"), prompt)
    ring_logits, ring_tokens = run_export(exports(name, "ring"), prompt)
    assert ring_tokens == full_tokens
    error = np.abs(ring_logits - full_logits).max() / np.abs(full_logits).max()
    assert error <= TOLERANCE


@pytest.mark.parametrize("name", NAMES)
def test_ring_caches_in_continuous_batching_give_each_prompt_its_full_cache_tokens(name: str, exports: Any) -> None:
    tokens = {}
    for mode in ("full", "ring"):
        directory = exports(name, mode, 3)
        session = onnx_session(directory)
        tokens[mode] = generate(onnx_step(session), PROMPTS, NEW_TOKENS, prefill_len=PREFILL_LEN, ctx_len=CTX_LEN,
                                layout=cache_layout(session), full_batch_size=3, sizes=ring_sizes(directory))
    assert tokens["ring"] == tokens["full"]


@pytest.mark.parametrize("name", NAMES)
def test_each_ring_has_its_own_dim_and_specialization_symbol(name: str, exports: Any) -> None:
    model = load_checkpoint(os.path.join(FIXTURES, name))
    directory = exports(name, "ring")
    proto = onnx.load(os.path.join(directory, "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    expected_sizes = {}
    for layer in range(model.cfg.num_hidden_layers):
        kind = model.cfg.layer_type(layer)
        length = RING_DIMS.get(kind, "ctx_len")
        assert dims[f"past_key.{layer}"][2] == length and dims[f"past_value.{layer}"][2] == length
        if kind in RING_DIMS:
            span = model.cfg.sliding_window if kind == SLIDING else model.cfg.attention_chunk_size
            expected_sizes[length] = span + PREFILL_LEN - 1
    assert expected_sizes and ring_sizes(directory) == expected_sizes
    with open(os.path.join(directory, "specializations.json")) as f:
        entries = json.load(f)["specializations"]
    assert all({k: int(e["symbols"][k]) for k in expected_sizes} == expected_sizes for e in entries)  # decode too
    with open(os.path.join(directory, "custom_io.yaml")) as f:
        assert f.read().count("IOName: past_") == 4 * model.cfg.num_hidden_layers


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_rings_with_blocked_full_layers_give_the_full_caches_tokens_and_logits(name: str, exports: Any,
                                                                               tmp_path: Any) -> None:
    """With --kv-blocks, full layers read their cache in blocks (gpt-oss: with its sinks); ring layers
    stay whole."""
    out = str(tmp_path / "ring-blocked")
    export_model(with_sliding_cache(load_checkpoint(os.path.join(FIXTURES, name)), "ring"), out, ctx_len=CTX_LEN,
                 prefill_seq_len=PREFILL_LEN, kv_blocks=4)
    full_logits, full_tokens = run_export(exports(name, "full"), PROMPTS[0])
    logits, tokens = run_export(out, PROMPTS[0])
    assert tokens == full_tokens
    assert np.abs(logits - full_logits).max() / np.abs(full_logits).max() <= TOLERANCE


def test_full_and_sliding_layers_keep_one_body_per_cache_shape(exports: Any) -> None:
    proto = onnx.load(os.path.join(exports("gemma2", "ring"), "model.onnx"), load_external_data=False)
    layer_functions = [f.name for f in proto.functions if "layer" in f.name]
    assert len(layer_functions) == 2  # a sliding (ring) body and a full body
    proto = onnx.load(os.path.join(exports("mistral", "ring"), "model.onnx"), load_external_data=False)
    assert len([f for f in proto.functions if "layer" in f.name]) == 1


@pytest.mark.parametrize("name", ["mistral", "llama4"])
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_a_ring_only_as_long_as_the_window_loses_keys_of_a_chunked_prefill(name: str) -> None:
    """QEfficient's ring holds `window` slots: after a chunk of 8 is written, its earlier queries have
    lost keys of their window. The same step function on rings of that length diverges."""
    model = with_sliding_cache(load_checkpoint(os.path.join(FIXTURES, name)), "ring")
    fn, _ = model.signature(max_ctx_len=CTX_LEN)
    logits = {}
    for label, sizes in (("exact", model.cache_sizes(CTX_LEN, PREFILL_LEN)),
                         ("window", {RING_DIMS[SLIDING]: model.cfg.sliding_window or 0,
                                     RING_DIMS[CHUNKED]: model.cfg.attention_chunk_size or 0})):
        logits[label], _ = run(eager_step(fn), model_cache_layout(model), sizes, PROMPTS[0])
    scale = np.abs(logits["exact"]).max()
    assert not np.allclose(logits["window"], logits["exact"], rtol=0, atol=1e-2 * scale)  # (NaN: a query saw nothing)


def test_ring_length_never_exceeds_the_context(exports: Any) -> None:
    model = with_sliding_cache(load_checkpoint(os.path.join(FIXTURES, "mistral")), "ring")
    assert model.cache_sizes(64, 8) == {"sliding_ctx_len": 5 + 8 - 1}
    assert model.cache_sizes(10, 8) == {"sliding_ctx_len": 10}
    assert model.cache_shape(0, 2, 64, 8) == (2, model.cfg.num_key_value_heads, 12, model.cfg.head_dim)


def test_ring_slot_arithmetic() -> None:
    """Slot s of a ring of 5 after position 13 holds 13 - ((13 - s) mod 5); before any write, nothing."""
    positions = np.array([[11, 12, 13], [-1, -1, -1]])
    held = ring_held_positions(positions, 5)
    np.testing.assert_array_equal(held[0, 0], [10, 11, 12, 13, 9])
    assert (held[1] < 0).all()
    np.testing.assert_array_equal(ring_indices(held, 5)[0, 0], [0, 1, 2, 3, 4])
    assert (ring_indices(held, 5)[1] == INT32_MAX).all()
    np.testing.assert_array_equal(ring_write_positions(positions, 5), [[1, 2, 3], [INT32_MAX] * 3])


# -- the command line -------------------------------------------------------------------------------------


def test_cli_exports_rings_and_generate_reads_their_sizes(tmp_path: Any, capsys: Any) -> None:
    tokens = {}
    for mode in ("full", "ring"):
        out = str(tmp_path / mode)
        assert cli.main(["export", os.path.join(FIXTURES, "gemma2"), "-o", out, "--ctx-len", str(CTX_LEN),
                         "--prefill-seq-len", str(PREFILL_LEN), "--sliding-cache", mode]) == 0
        capsys.readouterr()
        assert cli.main(["generate", out, "--prompt-ids", ",".join(map(str, PROMPTS[0])),
                         "--max-new-tokens", "6"]) == 0
        tokens[mode] = capsys.readouterr().out
    assert tokens["ring"] == tokens["full"] and tokens["full"].strip()


def test_cli_refuses_rings_for_a_model_without_sliding_layers(tmp_path: Any, capsys: Any) -> None:
    assert cli.main(["export", os.path.join(FIXTURES, "llama"), "-o", str(tmp_path / "out"),
                     "--sliding-cache", "ring"]) == 2
    assert "--sliding-cache ring: LlamaForCausalLM has no sliding-window or chunked layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unknown_sliding_cache_mode_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="--sliding-cache must be one of full, ring"):
        with_sliding_cache(load_checkpoint(os.path.join(FIXTURES, "mistral")), "paged")
