"""Mixture of experts: routers against per-token formulas written here, both expert strategies against
transformers' numbers, the fixtures' MoE features biting, expert weights used as the checkpoint stores
them (referenced in place, never transposed), and the --moe-strategy flag.

The default strategy's parity (chunks, padding, continuous batching, float16, eager) is in
test_zoo_parity.py with every other family; here the other strategy runs the same prompts.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import onnx
import pytest

from qtrace import cli
from qtrace.examples.blocks.causal_lm import Model
from qtrace.examples.blocks.moe import (DEFAULT_MOE_STRATEGY, DENSE, GATHER, SIGMOID_INPUT, SIGMOID_TOPK,
                                        SOFTMAX_TOPK, TOPK_SOFTMAX, MoeConfig, experts_dense, experts_gather, route,
                                        with_moe_strategy)
from qtrace.examples.checkpoint import (checkpoint_tensors, export_model, load_checkpoint, random_model,
                                        read_checkpoint_config, read_safetensors, write_safetensors)
from qtrace.examples.config import ConfigError, replace
from qtrace.examples.generation import eager_step, model_cache_layout
from qtrace.weights import ConvertedWeight

from test_zoo_parity import (CTX_LEN, FIXTURES, NAMES, RELATIVE_TOLERANCE, fixture_config, load_reference,
                             relative_errors, run_on_onnxruntime, run_steps, transformers_logits)

MOE_NAMES = [n for n in NAMES if isinstance(read_checkpoint_config(os.path.join(FIXTURES, n))[1], MoeConfig)]
OTHER_STRATEGY = {GATHER: DENSE, DENSE: GATHER}[DEFAULT_MOE_STRATEGY]


def test_every_moe_family_has_a_fixture() -> None:
    architectures = {fixture_config(n)["architectures"][0] for n in MOE_NAMES}
    assert {"MixtralForCausalLM", "Qwen3MoeForCausalLM", "GraniteMoeForCausalLM",
            "Glm4MoeForCausalLM", "GptOssForCausalLM", "Llama4ForCausalLM"} <= architectures


# -- routers, token by token -----------------------------------------------------------------------------


def _config(router: str, **changes: Any) -> MoeConfig:
    base = MoeConfig(architecture="test", vocab_size=8, hidden_size=6, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=3, num_experts=8, experts_per_token=2,
                     moe_intermediate_size=4, moe_layers=(True,), router=router)
    return replace(base, **changes)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def expected_route(logits: list[float], cfg: MoeConfig, correction: list[float]) -> tuple[list[int], list[float]]:
    """One token's experts and weights, in plain Python from the families' definitions."""
    k, n = cfg.experts_per_token, len(logits)

    def best(values: list[float], count: int, among: list[int]) -> list[int]:
        return sorted(among, key=lambda e: (-values[e], e))[:count]

    if cfg.router == SOFTMAX_TOPK:
        top = max(logits)
        probs = [math.exp(v - top) / sum(math.exp(u - top) for u in logits) for v in logits]
        chosen = best(probs, k, list(range(n)))
        weights = [probs[e] for e in chosen]
        if cfg.norm_topk_prob:
            weights = [w / sum(weights) for w in weights]
        return chosen, weights
    if cfg.router in (TOPK_SOFTMAX, SIGMOID_INPUT):
        chosen = best(logits, k, list(range(n)))
        if cfg.router == SIGMOID_INPUT:
            return chosen, [_sigmoid(logits[e]) for e in chosen]
        top = max(logits[e] for e in chosen)
        total = sum(math.exp(logits[e] - top) for e in chosen)
        return chosen, [math.exp(logits[e] - top) / total for e in chosen]
    scores = [_sigmoid(v) for v in logits]
    choice = [s + b for s, b in zip(scores, correction)]
    size = n // cfg.n_group
    group_score = [sum(sorted(choice[g * size:(g + 1) * size])[-2:]) for g in range(cfg.n_group)]
    groups = best(group_score, cfg.topk_group, list(range(cfg.n_group)))
    chosen = best(choice, k, [e for e in range(n) if e // size in groups])
    weights = [scores[e] for e in chosen]
    if cfg.norm_topk_prob:
        weights = [w / (sum(weights) + 1e-20) for w in weights]
    return chosen, [w * cfg.routed_scaling_factor for w in weights]


ROUTER_CASES = {
    "softmax_topk_renormalised": _config(SOFTMAX_TOPK),
    "softmax_topk_raw": _config(SOFTMAX_TOPK, norm_topk_prob=False, experts_per_token=3),
    "topk_softmax": _config(TOPK_SOFTMAX),
    "sigmoid_topk_groups_scaled": _config(SIGMOID_TOPK, n_group=4, topk_group=2, routed_scaling_factor=2.5),
    "sigmoid_topk_one_group": _config(SIGMOID_TOPK, norm_topk_prob=False),
    "sigmoid_input_top1": _config(SIGMOID_INPUT, experts_per_token=1),
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_matches_the_per_token_formula(case: str) -> None:
    cfg = ROUTER_CASES[case]
    rng = np.random.default_rng(len(case))
    x = rng.standard_normal((16, cfg.hidden_size)).astype(np.float32)
    kernel = rng.standard_normal((cfg.hidden_size, cfg.num_experts)).astype(np.float32)
    correction = (0.3 * rng.standard_normal(cfg.num_experts)).astype(np.float32)
    p = {"router": kernel}
    if cfg.router == SIGMOID_TOPK:
        p["router_correction_bias"] = correction
    experts, weights = route(x, p, cfg)
    logits = (x.astype(np.float64) @ kernel.astype(np.float64))
    for t in range(len(x)):
        chosen, expected = expected_route(logits[t].tolist(), cfg, correction.tolist())
        assert sorted(experts[t].tolist()) == sorted(chosen), f"token {t}"
        order = [chosen.index(e) for e in experts[t].tolist()]
        np.testing.assert_allclose(weights[t], [expected[i] for i in order], rtol=1e-5, atol=1e-7)


def test_group_limit_and_correction_bias_change_the_choice() -> None:
    """A hand-made token: expert 1 scores best, but its group loses on its two best scores, and the
    correction bias lifts expert 6 over expert 7 without entering its weight."""
    cfg = _config(SIGMOID_TOPK, n_group=2, topk_group=1, norm_topk_prob=False)
    logits = np.array([[-3.0, 4.0, -3.0, -3.0, 1.0, 1.0, 0.5, 0.6]], np.float32)
    correction = np.array([0, 0, 0, 0, 0, 0, 0.2, 0], np.float32)
    experts, weights = route(logits, {"router": np.eye(8, dtype=np.float32), "router_correction_bias": correction},
                             cfg)
    assert sorted(experts[0].tolist()) == [4, 6]   # group 1 (1.0+1.0 > 4.0-3.0); 6 over 7 by the bias
    np.testing.assert_allclose(sorted(weights[0]), sorted([_sigmoid(1.0), _sigmoid(0.5)]), rtol=1e-6)


# -- the experts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, gate_up, router", [("out_in", "separate", SOFTMAX_TOPK),
                                                     ("out_in", "halves", TOPK_SOFTMAX),
                                                     ("in_out", "interleaved", TOPK_SOFTMAX),
                                                     ("in_out", "halves", SIGMOID_INPUT)])
def test_both_strategies_equal_a_loop_over_tokens_and_choices(layout: str, gate_up: str, router: str) -> None:
    cfg = _config(router, expert_layout=layout, gate_up=gate_up, experts_per_token=2)
    rng = np.random.default_rng(7)
    e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size

    def stack(out: int, inp: int) -> np.ndarray:
        shape = (e, out, inp) if layout == "out_in" else (e, inp, out)
        return rng.standard_normal(shape).astype(np.float32)

    p: dict[str, Any] = {"experts_down": stack(d, i)}
    if gate_up == "separate":
        p["experts_gate"], p["experts_up"] = stack(i, d), stack(i, d)
    else:
        p["experts_gate_up"] = stack(2 * i, d)
    x = rng.standard_normal((5, d)).astype(np.float32)
    experts = np.array([[0, 3], [3, 5], [7, 1], [2, 0], [6, 4]], np.int64)
    weights = rng.uniform(0.1, 1, (5, 2)).astype(np.float32)

    def matrix(name: str, expert: int) -> np.ndarray:  # [out, in] of one expert
        w = p[name][expert].astype(np.float64)
        return w if layout == "out_in" else w.T

    expected = np.zeros((5, d))
    for t in range(5):
        for c, expert in enumerate(experts[t]):
            token = x[t].astype(np.float64) * (weights[t, c] if router == SIGMOID_INPUT else 1.0)
            if gate_up == "separate":
                gate, up = matrix("experts_gate", expert) @ token, matrix("experts_up", expert) @ token
            else:
                fused = matrix("experts_gate_up", expert) @ token
                gate, up = (fused[0::2], fused[1::2]) if gate_up == "interleaved" else (fused[:i], fused[i:])
            out = matrix("experts_down", expert) @ (gate / (1 + np.exp(-gate)) * up)
            expected[t] += out if router == SIGMOID_INPUT else weights[t, c] * out
    for run in (experts_gather, experts_dense):
        np.testing.assert_allclose(run(x, experts, weights, p, cfg), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def other_strategy_exports(tmp_path_factory: Any) -> Any:
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            model = with_moe_strategy(load_checkpoint(os.path.join(FIXTURES, name)), OTHER_STRATEGY)
            made[name] = str(tmp_path_factory.mktemp(f"{name}-{OTHER_STRATEGY}"))
            export_model(model, made[name], ctx_len=CTX_LEN, prefill_seq_len=8)
        return made[name]

    return get


@pytest.mark.parametrize("name", MOE_NAMES)
def test_the_other_strategy_matches_transformers_too(name: str, other_strategy_exports: Any) -> None:
    reference = load_reference(name)
    logits, tokens = run_on_onnxruntime(other_strategy_exports(name), reference["prompt"].tolist(),
                                        len(reference["decode_logits"]), 8, None, None)
    assert relative_errors(logits, transformers_logits(reference)).max() <= RELATIVE_TOLERANCE
    assert tokens == reference["tokens"].tolist()


# -- the fixtures' MoE features bite ---------------------------------------------------------------------

SWITCHED_OFF = {  # fixture -> config change that must move the logits away from transformers'
    "mixtral": {"num_experts_per_tok": 1},
    "mixtral#window": {"sliding_window": None},
    "qwen3_moe": {"norm_topk_prob": True},
    "granitemoe": {"num_experts_per_tok": 1},
    "glm4_moe": {"n_group": 1, "topk_group": 1},
    "glm4_moe#scaling": {"routed_scaling_factor": 1.0},
    "gpt_oss": {"swiglu_limit": 100.0},
    "gpt_oss#window": {"sliding_window": 1000},
    "gpt_oss#yarn": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "llama4": {"attn_temperature_tuning": False},
    "llama4#qk_norm": {"use_qk_norm": False},
    "llama4#chunks": {"attention_chunk_size": 1000},
    "llama4#nope": {"no_rope_layers": [1, 1, 1, 1]},
    "llama4#llama3_rope": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
}


def eager_logits(model: Model, reference: dict[str, np.ndarray]) -> np.ndarray:
    fn, _ = model.signature(max_ctx_len=CTX_LEN)
    logits, _ = run_steps(eager_step(fn), model_cache_layout(model), reference["prompt"].tolist(),
                          len(reference["decode_logits"]), 8)
    return logits


def _changes_logits(model: Model, reference: dict[str, np.ndarray]) -> bool:
    return relative_errors(eager_logits(model, reference), transformers_logits(reference)).max() > \
        100 * RELATIVE_TOLERANCE


@pytest.mark.parametrize("case", [c for c in SWITCHED_OFF if c.split("#")[0] in MOE_NAMES])
def test_each_moe_feature_changes_the_logits(case: str, tmp_path: Any) -> None:
    name = case.split("#")[0]
    reference = load_reference(name)
    config = {**fixture_config(name), **SWITCHED_OFF[case]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    os.symlink(os.path.join(FIXTURES, name, "model.safetensors"), tmp_path / "model.safetensors")
    assert _changes_logits(load_checkpoint(str(tmp_path)), reference)


def test_gpt_oss_sinks_take_part_in_the_softmax() -> None:
    model = load_checkpoint(os.path.join(FIXTURES, "gpt_oss"))
    for layer in model.params["layers"]:
        layer["sinks"] = np.full_like(layer["sinks"], -np.inf)  # exp(-inf) = 0: no sink
    assert _changes_logits(model, load_reference("gpt_oss"))


def test_glm_correction_bias_decides_the_choice() -> None:
    model = load_checkpoint(os.path.join(FIXTURES, "glm4_moe"))
    for layer in model.params["layers"]:
        if "router_correction_bias" in layer:
            assert np.abs(layer["router_correction_bias"]).max() > 0.05
            layer["router_correction_bias"] = np.zeros_like(layer["router_correction_bias"])
    assert _changes_logits(model, load_reference("glm4_moe"))


# -- expert weights as stored ----------------------------------------------------------------------------

LARGE = dict(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=64, rms_norm_eps=1e-5)
STORED_AS = {  # architecture -> config: per-expert tensors [out, in]; one stack [E, out, in]
    "MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
    "GraniteMoeForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2),
}


@pytest.mark.parametrize("strategy", [GATHER, DENSE])
@pytest.mark.parametrize("architecture", list(STORED_AS))
def test_expert_weights_are_referenced_in_place_and_never_transposed(architecture: str, strategy: str,
                                                                     tmp_path: Any) -> None:
    """Every expert tensor (each over the 64 KiB below which constants may be folded) is an ONNX
    initializer pointing at its own bytes in the checkpoint, and no Transpose touches one, in the
    main graph or in the layer function that receives the stacks."""
    config = {**LARGE, **STORED_AS[architecture], "architectures": [architecture]}
    source = tmp_path / "checkpoint"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    write_safetensors(str(source / "model.safetensors"), checkpoint_tensors(random_model(config, seed=1)))
    model = with_moe_strategy(load_checkpoint(str(source)), strategy)
    out = str(tmp_path / "out")
    export_model(model, out, ctx_len=32, prefill_seq_len=8, weights="reference")
    proto = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)

    header_end = 8 + int.from_bytes((source / "model.safetensors").read_bytes()[:8], "little")
    stored = {name: (int(a.offset), a.nbytes) for name, a in read_safetensors(str(source / "model.safetensors")).items()
              if "experts." in name or "_linear" in name}
    assert stored and all(offset >= header_end for offset, _ in stored.values())
    places = {}
    for tensor in proto.graph.initializer:
        entries = {e.key: e.value for e in tensor.external_data}
        if "location" in entries:
            assert os.path.samefile(os.path.join(out, entries["location"]), source / "model.safetensors") or \
                os.path.basename(entries["location"]) == "model.onnx.data"
            if not entries["location"].endswith("model.onnx.data"):
                places[tensor.name] = (int(entries["offset"]), int(entries["length"]))
    assert set(stored.values()) <= set(places.values())  # each expert tensor, exactly its own bytes
    expert_names = {n for n, place in places.items() if place in set(stored.values())}
    for graph in [proto.graph, *proto.functions]:
        sources = expert_names | {i for i in getattr(graph, "input", []) if isinstance(i, str) and
                                  i.startswith("experts")}
        for node in graph.node:
            if node.op_type == "Transpose":
                assert not set(node.input) & sources, f"{node.name} transposes an expert weight"
    assert os.path.getsize(os.path.join(out, "model.onnx.data")) < sum(n for _, n in stored.values()) / 4


def test_per_expert_tensors_in_memory_are_stacked_once_at_load_and_maps_stay_maps(tmp_path: Any) -> None:
    config = {**LARGE, **STORED_AS["MixtralForCausalLM"], "architectures": ["MixtralForCausalLM"]}
    model = random_model(config, seed=2)
    stack = model.params["layers"][0]["experts_gate"]
    assert isinstance(stack, np.ndarray) and stack.shape == (4, 256, 128)
    (tmp_path / "config.json").write_text(json.dumps(config))
    write_safetensors(str(tmp_path / "model.safetensors"), checkpoint_tensors(model))  # rows back to files
    loaded = load_checkpoint(str(tmp_path))
    experts = loaded.params["layers"][0]["experts_gate"]
    assert isinstance(experts, list) and all(isinstance(e, np.memmap) for e in experts)
    np.testing.assert_array_equal(np.stack(experts), stack)
    converted = load_checkpoint(str(tmp_path), dtype=np.float16).params["layers"][0]["experts_gate"]
    # tensors still to convert stay a list as well: each is converted piece by piece while saving
    assert isinstance(converted, list) and all(isinstance(e, ConvertedWeight) and e.dtype == np.float16
                                               for e in converted)
    np.testing.assert_array_equal(np.stack([np.asarray(e) for e in converted]), stack.astype(np.float16))


# -- the flag -------------------------------------------------------------------------------------------


def test_cli_moe_strategy_exports_the_chosen_form(tmp_path: Any) -> None:
    outputs = {}
    for strategy in (GATHER, DENSE):
        out = str(tmp_path / strategy)
        assert cli.main(["export", os.path.join(FIXTURES, "mixtral"), "-o", out, "--ctx-len", str(CTX_LEN),
                         "--prefill-seq-len", "8", "--moe-strategy", strategy]) == 0
        proto = onnx.load(os.path.join(out, "model.onnx"), load_external_data=False)
        outputs[strategy] = {n.op_type for f in proto.functions if f.name == "mixtral_layer" for n in f.node}
    assert "Gather" in outputs[GATHER] and "Gather" not in outputs[DENSE]


def test_cli_moe_strategy_on_a_dense_model_is_refused_before_loading(tmp_path: Any, capsys: Any) -> None:
    assert cli.main(["export", os.path.join(FIXTURES, "llama"), "-o", str(tmp_path / "out"),
                     "--moe-strategy", "dense"]) == 2
    assert "--moe-strategy dense: LlamaForCausalLM has no mixture-of-experts layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_with_moe_strategy_names_the_flag_for_an_unknown_strategy() -> None:
    with pytest.raises(ConfigError, match="--moe-strategy must be one of gather, dense"):
        with_moe_strategy(load_checkpoint(os.path.join(FIXTURES, "mixtral")), "sparse")
