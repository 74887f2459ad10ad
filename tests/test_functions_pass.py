"""Function hygiene (the `functions` pass): identical @qtrace.function bodies merge; work every call
does on the same arguments (a mask built from position_ids) is hoisted out and computed once; what
the compiler rejects inside a function is reported at the user's line; Graph.eval never changes."""

from __future__ import annotations

import collections
import copy

import numpy as np
import pytest

import qtrace
import qtrace.primitives as qp
from qtrace import CheckError, ShapeDtype
from qtrace.examples.checkpoint import random_model
from qtrace.examples.families.llama import tiny_config
from qtrace.passes import run_pipeline
from qtrace.passes.shape_check import check_graph

from conftest import assert_located

HIDDEN = ShapeDtype(("batch", "seq", 8))
POSITIONS = ShapeDtype(("batch", "seq"), "int64")
CTX = 6


def ops(graph) -> collections.Counter:
    return collections.Counter(node.op for node in graph.nodes)


def calls(graph) -> list:
    return [node for node in graph.nodes if node.op == "call"]


def inputs_for(graph, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for value in graph.inputs:
        shape = tuple(d if isinstance(d, int) else 3 for d in value.shape)
        arrays.append(rng.standard_normal(shape).astype(value.dtype) if value.dtype.kind == "f"
                      else rng.integers(0, CTX, shape).astype(value.dtype))
    return arrays


def run_functions_pass(fn, *specs, passes=("functions",)):
    """Trace, run the passes, check the graph and that Graph.eval is unchanged; return the graph."""
    graph = qtrace.trace(fn, specs)
    inputs = inputs_for(graph)
    before = graph.eval_flat(inputs)
    run_pipeline(graph, list(passes))
    check_graph(graph)
    for want, have in zip(before, graph.eval_flat(inputs)):
        np.testing.assert_allclose(have, want, rtol=1e-6)
    return graph


# -- merging --------------------------------------------------------------------------------------------


def make_block(scale: float):
    """A fresh @qtrace.function (its own cache and name) whose body depends only on `scale`."""

    @qtrace.function
    def block(x, w):
        return np.tanh(x * w) * scale

    return block


W = np.linspace(0.5, 1.5, 8, dtype=np.float32)


def test_identical_bodies_merge_into_one_function():
    first, second = make_block(2.0), make_block(2.0)
    graph = run_functions_pass(lambda x: second(first(x, W), W), HIDDEN)
    assert len(graph.functions) == 1
    (function,) = graph.functions.values()
    assert all(call.params["function"] is function for call in calls(graph))


def test_bodies_that_differ_in_a_constant_stay_apart():
    first, second = make_block(2.0), make_block(3.0)
    graph = run_functions_pass(lambda x: second(first(x, W), W), HIDDEN)
    assert len(graph.functions) == 2


def test_identical_bodies_merge_inside_calling_bodies_too():
    inner_a, inner_b = make_block(2.0), make_block(2.0)

    @qtrace.function
    def outer(x, w):
        return inner_b(inner_a(x, w), w)

    graph = run_functions_pass(lambda x: outer(x, W), HIDDEN)
    assert len(graph.functions) == 2  # outer and one inner
    (outer_body,) = [f.body for f in graph.functions.values() if f.name.startswith("outer")]
    targets = {call.params["function"].name for call in calls(outer_body)}
    assert len(targets) == 1 and targets <= set(graph.functions)


# -- hoisting -------------------------------------------------------------------------------------------


@qtrace.function
def masked_layer(x, position_ids):
    slots = qp.arange(CTX)                                                     # invariant
    visible = slots[None, None, :] <= position_ids[:, :, None]                 # invariant: [B,S,C]
    scores = x @ np.ones((8, CTX), np.float32)                                 # per call
    return np.where(visible, scores, -1e9) @ np.ones((CTX, 8), np.float32) / CTX + x


def three_masked_layers(x, position_ids):
    for _ in range(3):
        x = masked_layer(x, position_ids)
    return x


def test_mask_built_from_position_ids_is_hoisted_and_computed_once():
    graph = run_functions_pass(three_masked_layers, HIDDEN, POSITIONS)
    (body,) = [f.body for f in graph.functions.values()]
    assert "arange" not in ops(body) and "le" not in ops(body)
    assert ops(graph)["le"] == 1 and len(calls(graph)) == 3
    mask = next(n for n in graph.nodes if n.op == "le").outputs[0]
    assert all(mask in call.inputs for call in calls(graph))


def test_parameter_only_hoisted_work_read_is_dropped():
    graph = run_functions_pass(three_masked_layers, HIDDEN, POSITIONS)
    (body,) = [f.body for f in graph.functions.values()]
    assert [v.aval for v in body.inputs] == [HIDDEN, ShapeDtype(("batch", "seq", CTX), "bool")]
    assert all(graph.inputs[1] not in call.inputs for call in calls(graph))


def test_per_call_work_stays_in_the_body():
    graph = run_functions_pass(three_masked_layers, HIDDEN, POSITIONS)
    (body,) = [f.body for f in graph.functions.values()]
    assert ops(body)["matmul"] == 2 and ops(body)["where"] == 1
    assert "matmul" not in ops(graph)


def test_nothing_is_hoisted_from_a_function_called_once():
    graph = run_functions_pass(lambda x, p: masked_layer(x, p), HIDDEN, POSITIONS)
    (body,) = [f.body for f in graph.functions.values()]
    assert ops(body)["le"] == 1 and "le" not in ops(graph)


def test_work_on_arguments_that_differ_between_calls_is_not_hoisted():
    def model(x, position_ids):
        return masked_layer(masked_layer(x, position_ids), position_ids + 1)

    graph = run_functions_pass(model, HIDDEN, POSITIONS)
    (body,) = [f.body for f in graph.functions.values()]
    assert ops(body)["le"] == 1


@qtrace.function
def layer_with_dead_code(x, position_ids):
    visible = qp.arange(x.shape[2])[None, None, :] <= position_ids[:, :, None]
    unused = x + visible.astype(np.float32)  # noqa: F841  (dead code reading the invariant mask)
    return np.where(visible, x, 0.0)


def test_hoisting_ignores_dead_code_in_the_body():
    def model(x, position_ids):
        for _ in range(3):
            x = layer_with_dead_code(x * 2.0, position_ids)
        return x

    graph = run_functions_pass(model, ShapeDtype(("batch", "seq", "seq")), POSITIONS)
    (body,) = [f.body for f in graph.functions.values()]
    assert len(body.inputs) == 2 and all(len(call.inputs) == 2 for call in calls(graph))


@qtrace.function
def regroup(x, position_ids):
    batch, seq = position_ids.shape
    started = position_ids.max(axis=1, keepdims=True) > 0  # invariant, carries no `seq`
    y = x.reshape(batch, seq, 4) * 2.0                     # needs the size of `seq`
    return np.where(started, y.reshape(batch, seq * 4), x)


def test_hoisting_keeps_the_parameter_that_gives_a_body_its_symbolic_size():
    def model(x, position_ids):
        batch, seq = position_ids.shape
        flat = x.reshape(batch, seq * 4)
        return regroup(regroup(flat + 1.0, position_ids) + 1.0, position_ids)

    graph = run_functions_pass(model, ShapeDtype(("batch", "seq", 4)), POSITIONS)
    assert "gt" in ops(graph)  # the invariant comparison was hoisted
    (body,) = [f.body for f in graph.functions.values()]
    assert any(v.shape == POSITIONS.shape for v in body.inputs)


def test_hoisting_in_the_llama_example_takes_the_context_mask_out_of_the_layers():
    model = random_model(tiny_config())
    cfg = model.cfg
    fn, args = model.signature()
    graph = qtrace.trace(fn, args)
    rng = np.random.default_rng(0)
    inputs = (rng.integers(0, cfg.vocab_size, (2, 3)), np.array([[0, 1, 2], [3, 4, 5]]),
              {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.empty_cache(2, 8).items()})
    before = graph.eval(*copy.deepcopy(inputs))
    run_pipeline(graph)
    (body,) = [f.body for f in graph.functions.values()]
    assert "arange" not in ops(body) and "arange" in ops(graph)
    after = graph.eval(*copy.deepcopy(inputs))
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-6, err_msg=name)


# -- what the compiler rejects inside a function ----------------------------------------------------------


@qtrace.function
def layer_with_symbolic_range(x):
    slots = qp.arange(x.shape[1])  # SYMBOLIC RANGE
    return x * slots.astype(np.float32)[None, :]


def test_symbolic_range_left_inside_a_function_is_reported_at_its_line():
    graph = qtrace.trace(lambda x: layer_with_symbolic_range(x), (ShapeDtype(("batch", "seq")),))
    with pytest.raises(CheckError, match="inside @qtrace.function layer_with_symbolic_range") as info:
        run_pipeline(graph, ["functions"])
    assert_located(info.value, layer_with_symbolic_range.__wrapped__, "# SYMBOLIC RANGE")


def test_symbolic_range_in_a_function_called_twice_is_hoisted_instead_of_reported():
    def model(x):
        return layer_with_symbolic_range(layer_with_symbolic_range(x))

    graph = run_functions_pass(model, ShapeDtype(("batch", "seq")))
    assert ops(graph)["arange"] == 1
