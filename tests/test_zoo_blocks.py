"""The model zoo's shared blocks against independent formulas, and the registry's contract.

Masks against a brute-force loop over (query, slot); RoPE tables and rotations against the
textbook formulas (rotate_half, rotate_every_two, partial rotary, longrope's switch); grouped-query
attention against attention with K/V repeated per query head; config errors that name config.json
and the field before anything is traced; the lowered graph never repeats K/V.
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any

import numpy as np
import onnx
import pytest

import qtrace
from qtrace import cli
from qtrace.examples.blocks import AttentionInputs, cached_attention
from qtrace.examples.blocks.masks import cache_indices, hidden_slots, score_bias
from qtrace.examples.blocks.rope import apply_rope, inverse_frequencies, rope_at, rope_tables, rotation_matrix
from qtrace.examples.checkpoint import export_model, load_checkpoint, random_model, read_safetensors, save_checkpoint
from qtrace.examples.config import CHUNKED, FULL, SLIDING, ConfigError, DecoderConfig, RopeSpec
from qtrace.examples.families.llama import tiny_config
from qtrace.examples.registry import architectures, get_architecture, read_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
INT32_MAX = 2147483647


def config(**changes: Any) -> DecoderConfig:
    base = dict(architecture="LlamaForCausalLM", vocab_size=16, hidden_size=16, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=4)
    return DecoderConfig(**{**base, **changes})


# -- masks ----------------------------------------------------------------------------------------------

POSITIONS = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [9, 10, 11, 12, -1, -1, -1, -1], [3, -1, -1, -1, -1, -1, -1, -1]])


def visible_by_loop(q: int, slot: int, kind: str, window: int = 0, chunk: int = 0) -> bool:
    q = max(q, 0)
    if kind == FULL:
        return slot <= q
    if kind == SLIDING:
        return q - window < slot <= q
    return slot <= q and slot // chunk == q // chunk


@pytest.mark.parametrize("kind", [FULL, SLIDING, CHUNKED])
def test_hidden_slots_match_a_loop_over_queries_and_slots(kind: str) -> None:
    cfg = config(sliding_window=3, attention_chunk_size=4)
    ctx_len = 16
    hidden = hidden_slots(POSITIONS, ctx_len, kind, cfg)
    assert hidden.shape == (3, 1, 8, ctx_len)
    for b, s, c in np.ndindex(3, 8, ctx_len):
        assert hidden[b, 0, s, c] == (not visible_by_loop(POSITIONS[b, s], c, kind, 3, 4)), (b, s, c)


@pytest.mark.parametrize("kind", [FULL, SLIDING, CHUNKED])
def test_traced_masks_equal_the_eager_ones_on_onnxruntime(kind: str) -> None:
    cfg = config(sliding_window=3, attention_chunk_size=4)
    spec = qtrace.ShapeDtype(("batch_size", "seq_len"), np.int64)
    cache = qtrace.ShapeDtype(("batch_size", 1, "ctx_len", 1), np.float32)

    def masks(position_ids: Any, cache: Any) -> dict[str, Any]:
        ctx_len = cache.shape[2]
        return {"bias": score_bias(position_ids, ctx_len, kind, cfg, np.float32),
                "indices": cache_indices(position_ids, ctx_len)}

    lowered = qtrace.lower(masks, (spec, cache))
    lowered.check()
    for ctx_len in (13, 16):
        cache_value = np.zeros((3, 1, ctx_len, 1), np.float32)
        got, expected = lowered.run(POSITIONS, cache_value), masks(POSITIONS, cache_value)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name])


def test_score_bias_stacks_the_query_groups_along_the_sequence() -> None:
    cfg = config(num_attention_heads=6, num_key_value_heads=2)  # 3 query heads per KV head
    bias = score_bias(POSITIONS, 10, FULL, cfg, np.float32)
    assert bias.shape == (3, 1, 3 * 8, 10)
    one = score_bias(POSITIONS, 10, FULL, config(num_attention_heads=2, num_key_value_heads=2), np.float32)
    for g in range(3):
        np.testing.assert_array_equal(bias[:, :, g * 8:(g + 1) * 8], one)
    assert set(np.unique(bias)) == {0.0, -np.inf}


def test_cache_indices_are_slots_up_to_the_rows_last_position_then_int32_max() -> None:
    indices = cache_indices(POSITIONS, 16)
    assert indices.shape == (3, 1, 16)
    for b in range(3):
        last = POSITIONS[b].max()
        np.testing.assert_array_equal(indices[b, 0], [c if c <= last else INT32_MAX for c in range(16)])


# -- RoPE -----------------------------------------------------------------------------------------------


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate_every_two(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rope_equals_the_textbook_rotation_of_the_rotary_dims(interleaved: bool, partial: float) -> None:
    head_dim, positions = 8, 12
    spec = RopeSpec(theta=100.0, partial_rotary_factor=partial, interleaved=interleaved)
    rot = int(head_dim * partial)
    tables = rope_tables(spec, head_dim, positions, 64)
    x = np.random.default_rng(0).standard_normal((2, 5, 3, head_dim)).astype(np.float32)  # [B,S,H,D]
    position_ids = np.array([[0, 1, 2, 3, 11], [4, 7, -1, -1, -1]])
    cos, sin = rope_at(tables, position_ids)
    got = apply_rope(x, cos, sin, tables.rotation)
    inv_freq = 1.0 / 100.0 ** (np.arange(0, rot, 2) / rot)
    angles = np.maximum(position_ids, 0)[..., None] * inv_freq                        # [B,S,rot/2]
    angles = np.repeat(angles, 2, axis=-1) if interleaved else np.concatenate([angles, angles], axis=-1)
    c, s = np.cos(angles)[:, :, None], np.sin(angles)[:, :, None]
    rotate = rotate_every_two if interleaved else rotate_half
    expected = np.concatenate([x[..., :rot] * c + rotate(x[..., :rot]) * s, x[..., rot:]], axis=-1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[..., rot:], x[..., rot:])  # pass-through dims untouched, bit for bit


def test_rotation_matrix_product_equals_rotate_half_exactly() -> None:
    x = np.random.default_rng(1).standard_normal((7, 16)).astype(np.float32)
    np.testing.assert_array_equal(x @ rotation_matrix(RopeSpec(), 16), rotate_half(x))
    np.testing.assert_array_equal(x @ rotation_matrix(RopeSpec(interleaved=True), 16), rotate_every_two(x))


def test_linear_rope_divides_the_frequencies_by_its_factor() -> None:
    default, _ = inverse_frequencies(RopeSpec(), 16, 64)
    linear, factor = inverse_frequencies(RopeSpec(kind="linear", scaling=(("factor", 4.0),)), 16, 64)
    np.testing.assert_allclose(linear, default / 4.0, rtol=1e-7)
    assert factor == 1.0


def test_longrope_switches_to_long_factors_per_sequence_past_the_original_context() -> None:
    spec = RopeSpec(kind="longrope", scaling=(("long_factor", (1.0, 4.0)), ("original_max_position_embeddings", 8),
                                              ("short_factor", (1.0, 2.0))))
    tables = rope_tables(spec, 4, 16, 32)
    factor = math.sqrt(1 + math.log(32 / 8) / math.log(8))
    short, _ = inverse_frequencies(spec, 4, 32)
    long, _ = inverse_frequencies(spec, 4, 32, long=True)
    np.testing.assert_allclose(short, 1 / (np.array([1.0, 2.0]) * 10000.0 ** (np.arange(0, 4, 2) / 4)), rtol=1e-6)
    positions = np.array([[3, 7], [3, 8]])  # row 0 stays within 8 positions, row 1 passes them
    cos, _ = rope_at(tables, positions)
    np.testing.assert_allclose(cos[0, :, 0, :2], np.cos(positions[0][:, None] * short) * factor, rtol=1e-5)
    np.testing.assert_allclose(cos[1, :, 0, :2], np.cos(positions[1][:, None] * long) * factor, rtol=1e-5)


# -- attention ------------------------------------------------------------------------------------------


def attention_with_repeated_kv(q: np.ndarray, keys: np.ndarray, values: np.ndarray, hidden: np.ndarray,
                               scale: float) -> np.ndarray:
    """The textbook form: every query head gets its own copy of its KV head."""
    groups = q.shape[2] // keys.shape[1]
    keys, values = np.repeat(keys, groups, axis=1), np.repeat(values, groups, axis=1)   # [B,H,C,D]
    scores = np.einsum("bshd,bhcd->bhsc", q, keys) * scale
    scores = np.where(hidden, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhsc,bhcd->bshd", probs, values)
    return out.reshape(out.shape[0], out.shape[1], -1)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_grouped_query_attention_equals_repeated_kv_attention(heads: int, kv_heads: int) -> None:
    rng = np.random.default_rng(heads + kv_heads)
    batch, seq, ctx_len, head_dim = 2, 3, 8, 4
    cfg = config(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    positions = np.array([[2, 3, 4], [0, 1, -1]])
    q = rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((batch, seq, kv_heads, head_dim)).astype(np.float32) for _ in range(2))
    past = rng.standard_normal((2, batch, kv_heads, ctx_len, head_dim)).astype(np.float32)
    inputs = AttentionInputs(positions, cache_indices(positions, ctx_len),
                             score_bias(positions, ctx_len, FULL, cfg, np.float32))
    out, key_cache, value_cache = cached_attention(q, k, v, inputs, past[0], past[1], scale=0.5)
    expected_keys, expected_values = past[0].copy(), past[1].copy()
    for b, s in np.ndindex(batch, seq):
        expected_keys[b, :, positions[b, s]] = k[b, s]
        expected_values[b, :, positions[b, s]] = v[b, s]
    np.testing.assert_array_equal(key_cache, expected_keys)
    hidden = hidden_slots(positions, ctx_len, FULL, cfg)
    np.testing.assert_allclose(out, attention_with_repeated_kv(q, expected_keys, expected_values, hidden, 0.5),
                               rtol=1e-5, atol=1e-6)


def value_names_reaching(model: onnx.ModelProto, sources: set[str]) -> set[str]:
    """Every tensor computed (transitively) from `sources` inside the model's layer functions."""
    reached = set(sources)
    for function in model.functions:
        for node in function.node:
            if reached & set(node.input):
                reached.update(node.output)
    return reached


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (8, 1)], ids=["gqa", "mqa"])
def test_lowered_attention_never_repeats_keys_or_values(heads: int, kv_heads: int) -> None:
    """No Expand, Tile or Concat consumes anything computed from a CtxGather (the K/V rows)."""
    model = random_model(tiny_config(num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8))
    fn, args = model.signature(max_ctx_len=32)
    proto = qtrace.lower(fn, args).parts.model
    (layer,) = [f for f in proto.functions if f.domain == "qtrace.local"]
    gathered = {o for n in layer.node if n.op_type == "CtxGather" for o in n.output}
    from_kv = value_names_reaching(proto, gathered)
    repeats = [n.op_type for n in layer.node if n.op_type in ("Expand", "Tile", "Concat") and from_kv & set(n.input)]
    assert repeats == []
    assert collections.Counter(n.op_type for n in layer.node)["CtxGather"] == 2


def test_the_repeat_check_sees_a_repeat_when_there_is_one() -> None:
    """The check above can fail: a K/V repeat written the textbook way is caught."""
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []), functions=[onnx.helper.make_function(
        "qtrace.local", "layer", ["k"], ["r"], [
            onnx.helper.make_node("CtxGather", ["k"], ["g"], domain="com.qualcomm.cloud"),
            onnx.helper.make_node("Concat", ["g", "g"], ["r"], axis=1)],
        [onnx.helper.make_opsetid("", 17)])])
    assert "r" in value_names_reaching(proto, {"g"})


# -- configs and the registry ---------------------------------------------------------------------------

CONFIG_ERRORS = {
    "unsupported_rope": ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
                         ["config.json", "rope_type", "dynamic"]),
    "heads_do_not_divide": ({"num_key_value_heads": 3}, ["config.json", "num_key_value_heads", "3",
                                                         "num_attention_heads", "4"]),
    "missing_field": ({"vocab_size": None}, ["config.json", "vocab_size", "missing"]),
    "non_integer": ({"num_hidden_layers": 2.5}, ["config.json", "num_hidden_layers", "2.5"]),
    "negative": ({"intermediate_size": -4}, ["config.json", "intermediate_size", "-4"]),
    "llama3_without_factor": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}},
                              ["config.json", "factor", "llama3"]),
    "bad_layer_types": ({"architectures": ["Gemma2ForCausalLM"], "query_pre_attn_scalar": 16,
                         "layer_types": ["full_attention"]}, ["config.json", "layer_types"]),
    "longrope_factors": ({"architectures": ["Phi3ForCausalLM"], "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0] * 8,
        "original_max_position_embeddings": 16}}, ["config.json", "short_factor", "8"]),
    "hidden_not_divisible": ({"hidden_size": 66, "head_dim": None}, ["config.json", "hidden_size", "66"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_name_the_file_and_field_before_tracing(case: str, tmp_path: Any, monkeypatch: Any) -> None:
    change, expected = CONFIG_ERRORS[case]
    data = {k: v for k, v in {**tiny_config(), **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "model.safetensors").write_bytes(b"")
    traced = []
    monkeypatch.setattr(qtrace.tracing, "trace", lambda *a, **k: traced.append(a))
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(str(tmp_path))
    for text in expected:
        assert text in str(caught.value), f"{text!r} not in {caught.value}"
    assert traced == []


def test_unknown_architecture_lists_the_supported_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        read_config({**tiny_config(), "architectures": ["BloomForCausalLM"]})
    message = str(caught.value)
    assert "BloomForCausalLM" in message
    assert all(name in message for name in architectures())
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        get_architecture("Nope")


def test_every_registered_architecture_has_a_parity_fixture() -> None:
    covered = set()
    for name in os.listdir(FIXTURES):
        path = os.path.join(FIXTURES, name, "config.json")
        if os.path.isfile(path):
            covered.update(json.load(open(path))["architectures"])
    assert set(architectures()) <= covered


@pytest.mark.parametrize("fixture, module", [("llama", "llama"), ("gemma2", "gemma"), ("mixtral", "mixtral")])
def test_loading_a_checkpoint_imports_only_its_family(fixture: str, module: str) -> None:
    """A fresh process that loads one checkpoint imports the one family module that registers its
    architecture, not the whole zoo (start-up time); listing still finds every family."""
    import subprocess
    import sys

    script = ("import sys; from qtrace.examples.checkpoint import load_checkpoint; load_checkpoint(sys.argv[1]); "
              "print(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('qtrace.examples.families.')))")
    out = subprocess.run([sys.executable, "-c", script, os.path.join(FIXTURES, fixture)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == repr([module])


def test_cli_lists_the_architectures(capsys: Any) -> None:
    assert cli.main(["export", "--list-architectures"]) == 0
    printed = capsys.readouterr().out.split("\n")
    assert sorted(line.split()[0] for line in printed if line.strip()) == sorted(architectures())


def test_fused_weights_are_zero_copy_views_of_the_checkpoint(tmp_path: Any) -> None:
    """Phi-3's qkv_proj / gate_up_proj, split at load, stay memory maps of exactly their rows of the
    checkpoint file, so `--weights reference` points into the checkpoint instead of copying them."""
    config = {**json.load(open(os.path.join(FIXTURES, "phi3", "config.json"))), "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 1, "num_attention_heads": 16, "num_key_value_heads": 8}
    save_checkpoint(random_model(config, seed=3), str(tmp_path / "checkpoint"), config)
    model = load_checkpoint(str(tmp_path / "checkpoint"))
    layer = model.params["layers"][0]
    for key in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        assert isinstance(layer[key], np.memmap) and not layer[key].flags.writeable, key
    fused = read_safetensors(str(tmp_path / "checkpoint" / "model.safetensors"))
    np.testing.assert_array_equal(np.concatenate([layer["q_proj"], layer["k_proj"], layer["v_proj"]]),
                                  fused["model.layers.0.self_attn.qkv_proj.weight"])
    np.testing.assert_array_equal(np.concatenate([layer["gate_proj"], layer["up_proj"]]),
                                  fused["model.layers.0.mlp.gate_up_proj.weight"])
    out = str(tmp_path / "out")
    export_model(model, out, ctx_len=32, prefill_seq_len=8, weights="reference")
    proto = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
    in_checkpoint = {t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL and
                     any(e.key == "location" and e.value.endswith(".safetensors") for e in t.external_data)}
    assert {f"layers.0.{k}" for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")} <= in_checkpoint
    assert os.path.getsize(os.path.join(out, "model.onnx.data")) < 0.2 * fused_bytes(fused)


def fused_bytes(tensors: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in tensors.values())
