"""The GPT-2 lineage's blocks against independent formulas (issue #9): ALiBi slopes as transformers
computes them and the per-head bias in the grouped score layout; the fused-QKV layouts against
projections cut from a fused weight by hand; the features the fixtures cannot switch off in their
config (ALiBi, learned positions) changing the logits; config errors that name the file and field."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import pytest

from qtrace.examples.blocks.alibi import alibi_bias, alibi_slopes
from qtrace.examples.blocks.attention import split_fused_qkv
from qtrace.examples.blocks.masks import score_bias
from qtrace.examples.checkpoint import load_checkpoint
from qtrace.examples.config import FULL, ConfigError, DecoderConfig
from qtrace.examples.generation import eager_step, model_cache_layout
from qtrace.examples.weights import linear_keys

from test_zoo_parity import CTX_LEN, FIXTURES, RELATIVE_TOLERANCE, load_reference, relative_errors, run_steps, \
    transformers_logits


def config(**changes: Any) -> DecoderConfig:
    base = dict(architecture="MptForCausalLM", vocab_size=16, hidden_size=24, intermediate_size=32,
                num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=6, head_dim=4, rope=None)
    return DecoderConfig(**{**base, **changes})


# -- ALiBi ----------------------------------------------------------------------------------------------

# transformers' build_mpt_alibi_tensor(heads, 2, alibi_bias_max)[:, 0, 0] is -slope per head (its bias is
# slope x (key - last key)); these values were printed by transformers 5.24.
TRANSFORMERS_SLOPES = {
    (6, 8): [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125],
    (6, 4): [0.5, 0.25, 0.125, 0.0625, 0.7071067690849304, 0.3535533845424652],
    (8, 8): [2.0 ** -i for i in range(1, 9)],
}


@pytest.mark.parametrize("heads, bias_max", list(TRANSFORMERS_SLOPES))
def test_alibi_slopes_are_transformers_mpt_slopes(heads: int, bias_max: int) -> None:
    assert alibi_slopes(heads, bias_max) == pytest.approx(TRANSFORMERS_SLOPES[heads, bias_max], rel=1e-7)


@pytest.mark.parametrize("heads, kv_heads", [(6, 6), (6, 2), (6, 1)])
def test_alibi_bias_is_slope_times_distance_in_the_grouped_layout(heads: int, kv_heads: int) -> None:
    cfg = config(num_attention_heads=heads, num_key_value_heads=kv_heads, alibi_slopes=alibi_slopes(heads))
    positions = np.array([[4, 5, 6], [0, -1, -1]])
    ctx_len, groups, seq = 8, heads // kv_heads, 3
    bias = alibi_bias(positions, np.arange(ctx_len), cfg, np.float32)
    assert bias.shape == (2, kv_heads, groups * seq, ctx_len)
    for b in range(2):
        for head in range(heads):
            kv, g = divmod(head, groups)
            for s in range(seq):
                for slot in range(ctx_len):
                    expected = cfg.alibi_slopes[head] * (slot - max(positions[b, s], 0))
                    assert bias[b, kv, g * seq + s, slot] == np.float32(expected)


def test_score_bias_with_alibi_keeps_the_causal_mask() -> None:
    cfg = config(alibi_slopes=alibi_slopes(6))
    positions = np.array([[2, 3]])
    bias = score_bias(positions, 6, FULL, cfg, np.float32)
    assert bias.shape == (1, 6, 2, 6)
    assert np.isneginf(bias[0, :, 0, 3:]).all() and np.isneginf(bias[0, :, 1, 4:]).all()
    assert np.isfinite(bias[0, :, 0, :3]).all() and np.isfinite(bias[0, :, 1, :4]).all()


def logits_error_against_transformers(name: str, **changes: Any) -> float:
    """The eager model's largest logit error (relative to the largest logit) with its config and params changed."""
    reference = load_reference(name)
    model = load_checkpoint(os.path.join(FIXTURES, name))
    cfg_changes = {k: v for k, v in changes.items() if k != "params"}
    model = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, **cfg_changes),
                                params={**model.params, **changes.get("params", {})})
    fn, _ = model.signature(max_ctx_len=CTX_LEN)
    logits, _ = run_steps(eager_step(fn), model_cache_layout(model), reference["prompt"].tolist(),
                          len(reference["decode_logits"]), 8)
    return float(relative_errors(logits, transformers_logits(reference)).max())


def test_the_mpt_fixture_needs_its_alibi() -> None:
    assert logits_error_against_transformers("mpt") <= RELATIVE_TOLERANCE
    assert logits_error_against_transformers("mpt", alibi_slopes=None) > 100 * RELATIVE_TOLERANCE


def test_the_gpt2_fixtures_need_their_learned_positions() -> None:
    for name in ("gpt2", "gpt_bigcode"):
        positions = load_checkpoint(os.path.join(FIXTURES, name)).params["embed_positions"]
        wrong = {"embed_positions": np.zeros_like(positions)}
        assert logits_error_against_transformers(name, params=wrong) > 100 * RELATIVE_TOLERANCE


# -- fused QKV layouts ----------------------------------------------------------------------------------

HEAD_DIM = 2


def head_rows(kind: str, heads: range) -> list[str]:
    return [f"{kind}{h}.{d}" for h in heads for d in range(HEAD_DIM)]


# Each layout as the checkpoint orders its output features, named "<q|k|v><head>.<dim>" (independent of
# the split code: written from transformers' view/split calls).
LAYOUTS = {
    "gpt2_q_k_v": (dict(num_attention_heads=4, num_key_value_heads=4),
                   head_rows("q", range(4)) + head_rows("k", range(4)) + head_rows("v", range(4))),
    "multi_query": (dict(num_attention_heads=4, num_key_value_heads=1),
                    head_rows("q", range(4)) + head_rows("k", range(1)) + head_rows("v", range(1))),
    "per_head_q_k_v": (dict(num_attention_heads=3, num_key_value_heads=3, qkv_shards=3),
                       [r for h in range(3) for kind in "qkv" for r in head_rows(kind, range(h, h + 1))]),
    "falcon_groups": (dict(num_attention_heads=6, num_key_value_heads=2, qkv_shards=2),
                      [r for g in range(2) for r in head_rows("q", range(3 * g, 3 * g + 3)) + head_rows("k", [g]) +
                       head_rows("v", [g])]),
    "codegen_qvk_shards": (dict(num_attention_heads=8, num_key_value_heads=8, qkv_shards=4, qkv_order="qvk"),
                           [r for s in range(4) for kind in "qvk" for r in head_rows(kind, range(2 * s, 2 * s + 2))]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fused_qkv_split_takes_each_heads_features(layout: str) -> None:
    changes, rows = LAYOUTS[layout]
    cfg = config(head_dim=HEAD_DIM, **changes)
    fused = np.array([rows], dtype=object)[None]  # [B=1, S=1, features], each feature its name
    q, k, v = (part.reshape(-1).tolist() for part in split_fused_qkv(fused, cfg))
    assert q == head_rows("q", range(cfg.num_attention_heads))
    assert k == head_rows("k", range(cfg.num_key_value_heads))
    assert v == head_rows("v", range(cfg.num_key_value_heads))


def weight_map(name: str) -> Any:
    model = load_checkpoint(os.path.join(FIXTURES, name))
    return model.arch.weights(model.cfg)


def test_conv1d_weights_are_used_as_stored_and_linear_ones_transposed() -> None:
    """GPT-2's Conv1D stores [in, out]: the driver transposes none of its layer weights; GPTBigCode's
    nn.Linear stores [out, in]: all of them."""
    gpt2, bigcode = weight_map("gpt2"), weight_map("gpt_bigcode")
    assert gpt2["layers.0.qkv_proj"].shape == (64, 192) and bigcode["layers.0.qkv_proj"].shape == (64 + 2 * 16, 64)
    assert linear_keys(gpt2) == frozenset()
    assert linear_keys(bigcode) == {"qkv_proj", "o_proj", "up_proj", "down_proj"}


# -- config errors --------------------------------------------------------------------------------------

CONFIG_ERRORS = {
    "falcon_alibi": ("falcon", {"alibi": True}, ["config.json", "alibi"]),
    "falcon_kv_heads": ("falcon_40b", {"num_kv_heads": 3}, ["config.json", "num_kv_heads", "3"]),
    "falcon_new_architecture_sequential": ("falcon_40b", {"num_ln_in_parallel_attn": 1, "parallel_attn": False},
                                           ["config.json", "parallel_attn"]),
    "mpt_bias": ("mpt", {"no_bias": False}, ["config.json", "no_bias", "ignores"]),
    "mpt_alibi_bias_max": ("mpt", {"attn_config": {"alibi_bias_max": 4}}, ["attn_config", "alibi_bias_max", "4"]),
    "mpt_qk_ln": ("mpt", {"attn_config": {"qk_ln": True}}, ["attn_config", "qk_ln"]),
    "mpt_logit_scale": ("mpt", {"logit_scale": 0.5}, ["config.json", "logit_scale"]),
    "codegen_heads": ("codegen", {"n_head": 2, "n_embd": 64}, ["config.json", "n_head", "4"]),
    "gptj_rotary_dim_missing": ("gptj", {"rotary_dim": None}, ["config.json", "rotary_dim", "missing"]),
    "gptj_rotary_dim_odd": ("gptj", {"rotary_dim": 7}, ["config.json", "rotary_dim", "7"]),
    "gpt2_activation": ("gpt2", {"activation_function": "swish"}, ["config.json", "activation_function", "swish"]),
    "gpt2_heads": ("gpt2", {"n_head": 5}, ["config.json", "n_embd", "n_head = 5"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_config_errors_name_the_file_and_field(case: str, tmp_path: Any) -> None:
    name, change, expected = CONFIG_ERRORS[case]
    config_json = json.load(open(os.path.join(FIXTURES, name, "config.json")))
    data = {k: v for k, v in {**config_json, **change}.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(data))
    os.symlink(os.path.join(FIXTURES, name, "model.safetensors"), tmp_path / "model.safetensors")
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(str(tmp_path))
    for text in expected:
        assert text in str(caught.value), f"{text!r} not in {caught.value}"
