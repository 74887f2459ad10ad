"""Tracing (docs/architecture.md, "The pipeline"): numpy-style functions become graphs that compute what the function
computes eagerly; Python control flow on traced values fails at the user's line; names come from
parameters, dict keys, scopes, partials, closures and globals; @qtrace.function shares bodies."""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np
import pytest

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype

from conftest import INT32_MAX, assert_located, line_of


def ops(graph):
    return [node.op for node in graph.nodes]


# -- a small transformer block: plain numpy operators + qtrace primitives ---------------------------

MODEL, HEADS, HEAD_DIM, FFN, MAX_POSITIONS = 16, 2, 8, 32, 16


def make_params(rng):
    def weight(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    angles = np.arange(MAX_POSITIONS)[:, None] / 10000 ** (np.arange(HEAD_DIM // 2) / (HEAD_DIM // 2))
    return {
        "input_norm": (1 + 0.1 * rng.standard_normal(MODEL)).astype(np.float32),
        "wq": weight(MODEL, MODEL), "wk": weight(MODEL, MODEL), "wv": weight(MODEL, MODEL), "wo": weight(MODEL, MODEL),
        "post_norm": (1 + 0.1 * rng.standard_normal(MODEL)).astype(np.float32),
        "w_gate": weight(MODEL, FFN), "w_up": weight(MODEL, FFN), "w_down": weight(FFN, MODEL),
        "rope_cos": np.cos(angles).astype(np.float32), "rope_sin": np.sin(angles).astype(np.float32),
    }


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def heads(x, batch, seq):
    return x.reshape(batch, seq, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)


def transformer_block(params, hidden, position_ids, past_key, past_value):
    batch, seq = position_ids.shape
    h = qp.rms_norm(hidden, params["input_norm"], eps=1e-5)
    q, k, v = (heads(h @ params[w], batch, seq) for w in ("wq", "wk", "wv"))
    cos = qp.take(params["rope_cos"], position_ids, axis=0)[:, None]  # [B, 1, S, HEAD_DIM / 2]
    sin = qp.take(params["rope_sin"], position_ids, axis=0)[:, None]
    q, k = rope(q, cos, sin), rope(k, cos, sin)

    past_key = qp.ctx_scatter(past_key, position_ids, k)
    past_value = qp.ctx_scatter(past_value, position_ids, v)
    ctx_len = past_key.shape[2]
    positions = qp.arange(ctx_len)
    invalid = positions > position_ids.max(axis=1, keepdims=True)  # [B, C]
    ctx_indices = np.where(invalid, INT32_MAX, positions)[:, None, :]
    keys = qp.ctx_gather(past_key, ctx_indices, ctx_len)
    values = np.where(invalid[:, None, :, None], 0.0, qp.ctx_gather(past_value, ctx_indices, ctx_len))

    scores = q @ keys.transpose(0, 1, 3, 2) * HEAD_DIM ** -0.5
    future = positions > position_ids[:, None, :, None]  # [B, 1, S, C]
    probs = qp.softmax(np.where(future, -np.inf, scores), axis=-1)
    attention = (probs @ values).transpose(0, 2, 1, 3).reshape(batch, seq, MODEL)
    hidden = hidden + attention @ params["wo"]

    h = qp.rms_norm(hidden, params["post_norm"], eps=1e-5)
    mlp = (qp.silu(h @ params["w_gate"]) * (h @ params["w_up"])) @ params["w_down"]
    return {"hidden": hidden + mlp, "past_key.0_RetainedState": past_key, "past_value.0_RetainedState": past_value}


BLOCK_SPECS = (ShapeDtype(("batch_size", "seq_len", MODEL)), ShapeDtype(("batch_size", "seq_len"), "int64"),
               ShapeDtype(("batch_size", HEADS, "ctx_len", HEAD_DIM)),
               ShapeDtype(("batch_size", HEADS, "ctx_len", HEAD_DIM)))


def block_inputs(rng, batch, positions, ctx_len):
    position_ids = np.array(positions, np.int64).reshape(batch, -1)
    hidden = rng.standard_normal((batch, position_ids.shape[1], MODEL)).astype(np.float32)
    cache = rng.standard_normal((2, batch, HEADS, ctx_len, HEAD_DIM)).astype(np.float32)
    return hidden, position_ids, cache[0], cache[1]


def assert_same_tree(got, want):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_transformer_block_traces_with_symbolic_dims(rng):
    graph = qtrace.trace(functools.partial(transformer_block, make_params(rng)), BLOCK_SPECS)
    assert graph.output_names == ["hidden", "past_key.0_RetainedState", "past_value.0_RetainedState"]
    assert graph.outputs[0].aval == ShapeDtype(("batch_size", "seq_len", MODEL))
    assert graph.outputs[1].aval == BLOCK_SPECS[2]
    assert {"rms_norm", "ctx_scatter", "ctx_gather", "softmax", "silu", "matmul"} <= set(ops(graph))


def test_transformer_block_prefill_eval_equals_eager_bitwise(rng):
    params = make_params(rng)
    graph = qtrace.trace(functools.partial(transformer_block, params), BLOCK_SPECS)
    inputs = block_inputs(rng, 2, [[0, 1, 2], [0, 1, 2]], ctx_len=6)
    assert_same_tree(graph.eval(*inputs), transformer_block(params, *inputs))


def test_transformer_block_decode_eval_equals_eager_bitwise(rng):
    params = make_params(rng)
    graph = qtrace.trace(functools.partial(transformer_block, params), BLOCK_SPECS)
    inputs = block_inputs(rng, 3, [[4], [0], [7]], ctx_len=8)
    assert_same_tree(graph.eval(*inputs), transformer_block(params, *inputs))


def test_transformer_block_decode_ignores_the_cache_past_the_position(rng):
    """Cache rows after the current position must not change the result (they are masked)."""
    params = make_params(rng)
    hidden, position_ids, past_key, past_value = block_inputs(rng, 1, [[2]], ctx_len=6)
    changed_key, changed_value = past_key.copy(), past_value.copy()
    changed_key[:, :, 3:], changed_value[:, :, 3:] = 100.0, -100.0
    out = transformer_block(params, hidden, position_ids, past_key, past_value)["hidden"]
    changed = transformer_block(params, hidden, position_ids, changed_key, changed_value)["hidden"]
    np.testing.assert_array_equal(out, changed)


# -- dtype promotion ----------------------------------------------------------------------------------


def test_float16_times_python_float_stays_float16():
    graph = qtrace.trace(lambda x: x * 0.5, (ShapeDtype((3,), "float16"),))
    assert graph.outputs[0].dtype == np.float16


def test_python_float_times_float16_stays_float16():
    graph = qtrace.trace(lambda x: 0.5 * x + 1, (ShapeDtype((3,), "float16"),))
    assert graph.outputs[0].dtype == np.float16


def test_weak_scalar_result_matches_eager_numpy():
    x = np.array([1.5, -2.25, 3.0], np.float16)
    graph = qtrace.trace(lambda x: x * 0.5 - 1, (x,))
    result = graph.eval(x)
    assert result.dtype == np.float16
    np.testing.assert_array_equal(result, np.array([-0.25, -2.125, 0.5], np.float16))


def test_int32_plus_python_int_stays_int32():
    graph = qtrace.trace(lambda x: x + 1, (ShapeDtype((3,), "int32"),))
    assert graph.outputs[0].dtype == np.int32


def test_float16_times_numpy_float32_scalar_promotes_to_float32():
    graph = qtrace.trace(lambda x: x * np.float32(2), (ShapeDtype((3,), "float16"),))
    assert graph.outputs[0].dtype == np.float32


def test_float16_plus_float32_array_promotes_to_float32():
    graph = qtrace.trace(lambda x, y: x + y, (ShapeDtype((3,), "float16"), ShapeDtype((3,), "float32")))
    assert graph.outputs[0].dtype == np.float32
    assert "cast" in ops(graph)


# -- Python control flow on traced values -------------------------------------------------------------


def branch_on_value(x):
    if x > 0:  # concretize: if
        return x
    return -x


def int_of_value(x):
    return x * int(x)  # concretize: int


def int_of_symbolic_dim(x):
    return x.reshape(int(x.shape[1]), -1)  # concretize: int of dim


def range_over_symbolic_dim(x):
    return [x[:, i] for i in range(x.shape[1])]  # concretize: range


def float_of_value(x):
    return float(x.sum())  # concretize: float


def iterate_over_symbolic_first_dim(x):
    rows = []
    for row in x:  # concretize: iterate
        rows.append(row)
    return rows


def compare_symbolic_dim(x):
    return x if x.shape[0] > 1 else -x  # concretize: compare dim


def numpy_array_of_value(x):
    return np.asarray(x)  # concretize: asarray


@pytest.mark.parametrize("fn, marker", [
    (branch_on_value, "# concretize: if"),
    (int_of_value, "# concretize: int"),
    (int_of_symbolic_dim, "# concretize: int of dim"),
    (range_over_symbolic_dim, "# concretize: range"),
    (float_of_value, "# concretize: float"),
    (iterate_over_symbolic_first_dim, "# concretize: iterate"),
    (compare_symbolic_dim, "# concretize: compare dim"),
    (numpy_array_of_value, "# concretize: asarray"),
], ids=lambda v: v.__name__ if callable(v) else None)
def test_python_needing_a_concrete_value_raises_concretization_error_at_the_users_line(fn, marker):
    with pytest.raises(qtrace.ConcretizationError) as info:
        qtrace.trace(fn, (ShapeDtype(("batch_size", "seq_len")),))
    assert_located(info.value, fn, marker)


def test_concrete_shapes_may_drive_python_control_flow():
    def fn(x):
        if x.shape[1] == 3:
            x = x * 2
        return sum(x[:, i] for i in range(x.shape[1]))

    graph = qtrace.trace(fn, (ShapeDtype(("batch_size", 3)),))
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(graph.eval(x), 2 * x.sum(axis=1))


def test_iterating_over_a_concrete_first_dim_yields_rows():
    graph = qtrace.trace(lambda x: [row * 2 for row in x], (ShapeDtype((2, "n")),))
    assert graph.output_names == ["output.0", "output.1"]
    assert [v.shape for v in graph.outputs] == [(qtrace.Dim.named("n"),)] * 2


# -- names: inputs, outputs, scopes, constants --------------------------------------------------------

Pair = collections.namedtuple("Pair", ["key", "value"])


@dataclasses.dataclass
class Cache:
    key: object
    value: object


def test_inputs_are_named_by_parameter_names():
    graph = qtrace.trace(lambda hidden, mask: hidden * mask, (ShapeDtype((2,)), ShapeDtype((2,))))
    assert [v.name for v in graph.inputs] == ["hidden", "mask"]


def test_dict_input_leaves_are_named_by_their_keys():
    graph = qtrace.trace(lambda inputs: inputs["past_key.0"] + inputs["input"],
                         ({"past_key.0": ShapeDtype((2,)), "input": ShapeDtype((2,))},))
    assert [v.name for v in graph.inputs] == ["past_key.0", "input"]


def test_list_namedtuple_and_dataclass_inputs_are_named_by_path():
    def fn(layers, pair, cache):
        return layers[0] + layers[1] + pair.key + pair.value + cache.key + cache.value

    spec = ShapeDtype((2,))
    graph = qtrace.trace(fn, ([spec, spec], Pair(spec, spec), Cache(spec, spec)))
    assert [v.name for v in graph.inputs] == ["layers.0", "layers.1", "pair.key", "pair.value", "cache.key",
                                              "cache.value"]


def test_keyword_inputs_are_named_by_keyword_and_static_leaves_are_not_inputs():
    graph = qtrace.trace(lambda x, scale, bias: x * scale + bias, (ShapeDtype((2,)), 3.0), {"bias": ShapeDtype((2,))})
    assert [v.name for v in graph.inputs] == ["x", "bias"]


def test_pytree_inputs_evaluate_like_eager():
    def fn(layers, pair, cache, scale):
        return layers[0] * scale + pair.value - cache.key

    zeros = np.zeros(2, np.float32)
    args = ([np.ones(2, np.float32), zeros], Pair(zeros, np.array([1, 2], np.float32)),
            Cache(np.array([3, 4], np.float32), zeros), 2.0)
    graph = qtrace.trace(fn, args)
    np.testing.assert_array_equal(graph.eval(*args), [0, 0])


def test_dict_output_leaves_are_named_by_their_keys():
    graph = qtrace.trace(lambda x: {"logits": x * 2, "past_key.0_RetainedState": x}, (ShapeDtype((2,)),))
    assert graph.output_names == ["logits", "past_key.0_RetainedState"]


def test_tuple_and_nested_outputs_are_named_by_path():
    graph = qtrace.trace(lambda x: (x, [x * 2, {"a": x * 3}]), (ShapeDtype((2,)),))
    assert graph.output_names == ["output.0", "output.1.0", "output.1.1.a"]


def test_single_output_is_named_output():
    graph = qtrace.trace(lambda x: x * 2, (ShapeDtype((2,)),))
    assert graph.output_names == ["output"]


def test_eval_returns_the_output_pytree():
    graph = qtrace.trace(lambda x: {"double": x * 2, "pair": Pair(x, -x)}, (ShapeDtype((2,)),))
    result = graph.eval(np.array([1, 2], np.float32))
    assert isinstance(result["pair"], Pair)
    np.testing.assert_array_equal(result["double"], [2, 4])
    np.testing.assert_array_equal(result["pair"].value, [-1, -2])


def test_explicit_input_and_output_names_replace_the_derived_ones():
    graph = qtrace.trace(lambda x, y: (x + y, x - y), (ShapeDtype((2,)), ShapeDtype((2,))),
                         input_names=["a", "b"], output_names=["sum", "difference"])
    assert [v.name for v in graph.inputs] == ["a", "b"]
    assert graph.output_names == ["sum", "difference"]


def test_two_inputs_with_the_same_name_raise_trace_error():
    with pytest.raises(qtrace.TraceError):
        qtrace.trace(lambda x, y: x + y, (ShapeDtype((2,)), ShapeDtype((2,))), input_names=["a", "a"])


def test_output_that_is_not_an_array_raises_trace_error():
    with pytest.raises(qtrace.TraceError):
        qtrace.trace(lambda x: (x, "label"), (ShapeDtype((2,)),))


def test_example_args_that_are_not_a_sequence_raise_trace_error():
    with pytest.raises(qtrace.TraceError):
        qtrace.trace(lambda x: x, ShapeDtype((2,)))


def test_scope_prefixes_value_names():
    def fn(x):
        with qtrace.scope("layers.0"):
            with qtrace.scope("attn"):
                y = x * 2
            z = y + 1
        return z - 1

    graph = qtrace.trace(fn, (ShapeDtype((2,)),))
    names = [node.outputs[0].name for node in graph.nodes]
    assert names[0].startswith("layers.0/attn/")
    assert names[1].startswith("layers.0/") and not names[1].startswith("layers.0/attn/")
    assert "/" not in names[2]


def test_scope_outside_a_trace_does_nothing():
    with qtrace.scope("eager"):
        result = qp.add(np.ones(2), 1.0)
    np.testing.assert_array_equal(result, [2, 2])


def test_value_names_are_unique():
    def fn(x):
        with qtrace.scope("a"):
            y = x * 2 + 1
        with qtrace.scope("a"):
            y = y * 3 + 1
        return y

    graph = qtrace.trace(fn, (ShapeDtype((2,)),))
    names = [out.name for node in graph.nodes for out in node.outputs]
    assert len(names) == len(set(names))


GLOBAL_TABLE = np.arange(6, dtype=np.float32).reshape(3, 2)
GLOBAL_LAYERS = [np.ones(2, np.float32), np.full(2, 2, np.float32)]


def test_partial_dict_arguments_become_constants_named_by_key():
    def model(params, x):
        return x @ params["embed.weight"] + params["bias"]

    params = {"embed.weight": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}
    graph = qtrace.trace(functools.partial(model, params), (ShapeDtype((1, 2)),))
    assert sorted(v.name for v in graph.constants) == ["bias", "embed.weight"]
    assert [v.name for v in graph.inputs] == ["x"]


def test_partial_positional_array_becomes_a_constant_named_by_its_parameter():
    def model(weight, x):
        return x @ weight

    graph = qtrace.trace(functools.partial(model, np.ones((2, 2), np.float32)), (ShapeDtype((1, 2)),))
    assert [v.name for v in graph.constants] == ["weight"]


def test_closure_arrays_become_constants_named_by_variable():
    bias = np.ones(2, np.float32)

    def fn(x):
        return x + bias

    graph = qtrace.trace(fn, (ShapeDtype((2,)),))
    assert [v.name for v in graph.constants] == ["bias"]


def test_global_arrays_become_constants_named_by_global_and_path():
    def fn(x):
        return x @ GLOBAL_TABLE + GLOBAL_LAYERS[1]

    graph = qtrace.trace(fn, (ShapeDtype((1, 3)),))
    assert sorted(v.name for v in graph.constants) == ["GLOBAL_LAYERS.1", "GLOBAL_TABLE"]


def test_an_array_used_twice_is_one_constant():
    weight = np.ones((2, 2), np.float32)
    graph = qtrace.trace(lambda x: x @ weight @ weight, (ShapeDtype((1, 2)),))
    assert len([v for v in graph.constants if v.const.ndim]) == 1


def test_constants_hold_the_arrays_values():
    graph = qtrace.trace(lambda x: x + GLOBAL_TABLE, (ShapeDtype((3, 2)),))
    np.testing.assert_array_equal(graph.constants[0].const, GLOBAL_TABLE)


# -- @qtrace.function ---------------------------------------------------------------------------------


@qtrace.function
def decoder_layer(hidden, weight):
    return np.tanh(hidden @ weight) + hidden


def stack_of_layers(weights, hidden):
    for weight in weights:
        hidden = decoder_layer(hidden, weight)
    return hidden


def three_weights(rng):
    return [rng.standard_normal((4, 4)).astype(np.float32) for _ in range(3)]


def test_three_calls_with_one_signature_share_one_body(rng):
    graph = qtrace.trace(functools.partial(stack_of_layers, three_weights(rng)), (ShapeDtype(("batch_size", 4)),))
    assert list(graph.functions) == ["decoder_layer"]
    assert ops(graph) == ["call", "call", "call"]
    assert {node.params["function"].name for node in graph.nodes} == {"decoder_layer"}


def test_arrays_passed_to_a_function_are_parameters_of_its_body(rng):
    graph = qtrace.trace(functools.partial(stack_of_layers, three_weights(rng)), (ShapeDtype(("batch_size", 4)),))
    body = graph.functions["decoder_layer"].body
    assert [v.name for v in body.inputs] == ["hidden", "weight"]
    assert body.constants == []
    assert sorted(v.name for v in graph.constants) == ["weights.0", "weights.1", "weights.2"]


def test_a_call_with_a_different_shape_makes_a_second_body(rng):
    weight = rng.standard_normal((4, 4)).astype(np.float32)

    def fn(x, y):
        return decoder_layer(x, weight), decoder_layer(y, weight), decoder_layer(x * 2, weight)

    graph = qtrace.trace(fn, (ShapeDtype((2, 4)), ShapeDtype((3, 4))))
    assert len(graph.functions) == 2
    assert [v.aval for v in graph.functions["decoder_layer"].body.inputs][0] == ShapeDtype((2, 4))
    bodies = [node.params["function"].name for node in graph.nodes if node.op == "call"]
    assert bodies[0] == bodies[2] != bodies[1]


def test_function_eval_equals_eager(rng):
    weights = three_weights(rng)
    graph = qtrace.trace(functools.partial(stack_of_layers, weights), (ShapeDtype(("batch_size", 4)),))
    hidden = rng.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_array_equal(graph.eval(hidden), stack_of_layers(weights, hidden))


def test_function_called_outside_a_trace_runs_eagerly():
    hidden, weight = np.ones((1, 2), np.float32), np.eye(2, dtype=np.float32)
    np.testing.assert_array_equal(decoder_layer(hidden, weight), np.tanh(hidden) + hidden)


def test_function_body_values_are_scoped_by_the_function_name(rng):
    graph = qtrace.trace(functools.partial(stack_of_layers, three_weights(rng)), (ShapeDtype((1, 4)),))
    body = graph.functions["decoder_layer"].body
    assert all(out.name.startswith("decoder_layer/") for node in body.nodes for out in node.outputs)


def test_static_arguments_are_part_of_the_function_signature():
    @qtrace.function
    def scaled(x, factor):
        return x * factor

    graph = qtrace.trace(lambda x: scaled(x, 2.0) + scaled(x, 3.0) + scaled(x, 2.0), (ShapeDtype((2,)),))
    assert len(graph.functions) == 2
    np.testing.assert_array_equal(graph.eval(np.ones(2, np.float32)), [7, 7])


@qtrace.function
def scaled_layer(hidden, weight, scale):
    return hidden @ weight * (scale * 2)  # `scale * 2` is the same in every call: the functions pass hoists it


def test_functions_pass_keeps_chained_calls_connected(rng):
    from qtrace.passes import run_pipeline

    weights = three_weights(rng)

    def model(hidden, scale):
        for weight in weights:
            hidden = scaled_layer(hidden, weight, scale)
        return hidden

    graph = qtrace.trace(model, (ShapeDtype(("batch_size", 4)), ShapeDtype((4,))))
    run_pipeline(graph, ["functions", "shape_check"])
    hidden, scale = rng.standard_normal((2, 4)).astype(np.float32), np.arange(4, dtype=np.float32)
    np.testing.assert_allclose(graph.eval(hidden, scale), model(hidden, scale), rtol=1e-6)


def test_function_using_a_traced_value_from_outside_raises_trace_error():
    def fn(x):
        @qtrace.function
        def inner(y):
            return y + x

        return inner(x)

    with pytest.raises(qtrace.TraceError):
        qtrace.trace(fn, (ShapeDtype((2,)),))


# -- numpy protocols and unsupported numpy ------------------------------------------------------------


def test_numpy_ufuncs_record_primitives():
    graph = qtrace.trace(lambda x: np.sqrt(np.exp(x)) + np.maximum(x, 0), (ShapeDtype((2,)),))
    assert ops(graph) == ["exp", "sqrt", "maximum", "add"]


def test_numpy_functions_record_primitives():
    graph = qtrace.trace(lambda x: np.concatenate([np.transpose(x), np.where(x > 0, x, 0).T], axis=0),
                         (ShapeDtype((2, 3)),))
    assert ops(graph) == ["transpose", "gt", "where", "transpose", "concatenate"]


def test_numpy_array_operator_tracer_records_the_op():
    weight = np.ones((2, 3), np.float32)
    graph = qtrace.trace(lambda x: weight.T @ x + np.ones(3, np.float32)[:, None], (ShapeDtype((2, 1)),))
    assert "matmul" in ops(graph)
    np.testing.assert_array_equal(graph.eval(np.ones((2, 1), np.float32)), np.full((3, 1), 3))


NUMPY_CALLS = {
    "method-max": lambda x: x.max(-1),
    "method-mean-keepdims": lambda x: x.mean(axis=-1, keepdims=True),
    "method-astype": lambda x: x.astype(np.float16),
    "method-reshape-tuple": lambda x: x.reshape((2, 6)),
    "method-transpose-args": lambda x: x.transpose(1, 0),
    "method-squeeze": lambda x: x[None].squeeze(),
    "method-flatten": lambda x: x.flatten(),
    "method-clip": lambda x: x.clip(0, 1),
    "method-take-flat": lambda x: x.take(np.array([5, 0])),
    "method-argmax-all": lambda x: x.argmax(),
    "T": lambda x: x.T,
    "np.sum-keepdims": lambda x: np.sum(x, axis=-1, keepdims=True),
    "np.mean-positional-axis": lambda x: np.mean(x, -1),
    "np.amax": lambda x: np.amax(x, axis=0),
    "np.argmax": lambda x: np.argmax(x, axis=-1),
    "np.repeat": lambda x: np.repeat(x, 2, axis=1),
    "np.split": lambda x: np.split(x, 2, axis=-1),
    "np.stack": lambda x: np.stack([x, x], axis=-1),
    "np.moveaxis": lambda x: np.moveaxis(x[None], 0, -1),
    "np.expand_dims-two-axes": lambda x: np.expand_dims(x, (0, 2)),
    "np.broadcast_to": lambda x: np.broadcast_to(x, (2, 3, 4)),
    "np.zeros_like": lambda x: np.zeros_like(x),
    "np.ones_like-dtype": lambda x: np.ones_like(x, dtype=np.int32),
    "np.full_like": lambda x: np.full_like(x, 3),
    "np.take": lambda x: np.take(x, np.array([2, 0]), axis=1),
    "np.reshape-minus-one": lambda x: np.reshape(x, (2, -1)),
    "np.where-scalar": lambda x: np.where(x > 0, x, 0.0),
    "np.square": lambda x: np.square(x),
    "np.power-int": lambda x: np.power(x, 2),
    "np.matmul": lambda x: np.matmul(x, x.T),
    "divide-by-int": lambda x: x / 3,
    "reflected-subtract": lambda x: 1 - x,
    "bool-operators": lambda x: (x > 0) & (x < 1) | ~(x != 0) ^ (x > 2),
    "np.sum-of-bool": lambda x: np.sum(x > 0),
    "np.mean-dtype": lambda x: np.mean(x, axis=0, dtype=np.float64),
    "reversed-slice": lambda x: x[::-1],
}


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32"])
@pytest.mark.parametrize("fn", NUMPY_CALLS.values(), ids=NUMPY_CALLS.keys())
def test_numpy_methods_and_functions_on_traced_values_compute_what_numpy_computes(rng, fn, dtype):
    x = (rng.standard_normal((3, 4)) * 3).astype(dtype)
    graph = qtrace.trace(fn, (ShapeDtype(x.shape, x.dtype),))
    expected = fn(x)  # plain numpy: no qtrace involved
    results = graph.eval(x)
    for got, want in zip(*(r if isinstance(r, list) else [r] for r in (results, expected)), strict=True):
        want = np.asarray(want)
        assert (got.dtype, got.shape) == (want.dtype, want.shape)
        np.testing.assert_array_equal(got, want)


def sort_values(x):
    return np.sort(x)  # unsupported: sort


def cumulative_sum(x):
    return np.cumsum(x)  # unsupported: cumsum


def arctangent(x):
    return np.arctan(x)  # unsupported: arctan


def reduce_by_ufunc_method(x):
    return np.add.reduce(x)  # unsupported: add.reduce


@pytest.mark.parametrize("fn, numpy_name, marker", [
    (sort_values, "numpy.sort", "# unsupported: sort"),
    (cumulative_sum, "numpy.cumsum", "# unsupported: cumsum"),
    (arctangent, "numpy.arctan", "# unsupported: arctan"),
    (reduce_by_ufunc_method, "numpy.add.reduce", "# unsupported: add.reduce"),
], ids=["sort", "cumsum", "arctan", "add.reduce"])
def test_unsupported_numpy_function_raises_unsupported_error_naming_it(fn, numpy_name, marker):
    with pytest.raises(qtrace.UnsupportedError) as info:
        qtrace.trace(fn, (ShapeDtype((2, 3)),))
    assert f"{numpy_name} is not supported" in str(info.value)
    assert_located(info.value, fn, marker)


def test_unsupported_numpy_function_error_lists_supported_ones():
    with pytest.raises(qtrace.UnsupportedError) as info:
        qtrace.trace(sort_values, (ShapeDtype((2,)),))
    assert "concatenate" in str(info.value)


def test_one_argument_where_is_unsupported():
    with pytest.raises(qtrace.UnsupportedError):
        qtrace.trace(lambda x: np.where(x > 0), (ShapeDtype((2,)),))


@pytest.mark.parametrize("fn, op", [(lambda x: x // 2, "floor_divide"), (lambda x: x % 2, "remainder")],
                         ids=["floordiv", "mod"])
def test_floor_division_and_modulo_record_integer_primitives(fn, op):
    graph = qtrace.trace(fn, (ShapeDtype((2,), "int32"),))
    assert [n.op for n in graph.nodes] == [op]


@pytest.mark.parametrize("fn", [lambda x: x // 2, lambda x: x % 2], ids=["floordiv", "mod"])
def test_floor_division_and_modulo_of_floats_name_the_op_and_dtype(fn):
    with pytest.raises(qtrace.DTypeError, match=r"(floor_divide|remainder).*integer.*f32\[2\]"):
        qtrace.trace(fn, (ShapeDtype((2,), "float32"),))


def test_boolean_mask_indexing_is_unsupported():
    with pytest.raises(qtrace.UnsupportedError):
        qtrace.trace(lambda x: x[x > 0], (ShapeDtype((2,)),))


# -- source locations ---------------------------------------------------------------------------------


def test_every_node_records_the_users_line():
    def fn(x):
        y = np.exp(x)  # line: exp
        return qp.softmax(y)  # line: softmax

    graph = qtrace.trace(fn, (ShapeDtype((2,)),))
    assert [(n.location.line, n.location.function) for n in graph.nodes] == [
        (line_of(fn, "# line: exp"), "fn"), (line_of(fn, "# line: softmax"), "fn")]


def test_traced_value_escaping_its_trace_raises_trace_error():
    leaked = []
    qtrace.trace(lambda x: leaked.append(x) or x, (ShapeDtype((2,)),))
    with pytest.raises(qtrace.TraceError):
        qp.exp(leaked[0])




def test_eval_matches_keyword_arguments_by_name():
    graph = qtrace.trace(lambda a, b: a - b, (), {"a": ShapeDtype((2,)), "b": ShapeDtype((2,))})
    result = graph.eval(b=np.zeros(2, np.float32), a=np.ones(2, np.float32))
    np.testing.assert_array_equal(result, [1, 1])


def test_eval_matches_dict_entries_by_key():
    graph = qtrace.trace(lambda d: d["a"] - d["b"], ({"a": ShapeDtype((2,)), "b": ShapeDtype((2,))},))
    result = graph.eval({"b": np.zeros(2, np.float32), "a": np.ones(2, np.float32)})
    np.testing.assert_array_equal(result, [1, 1])


def test_eval_with_a_wrong_dtype_raises_dtype_error():
    graph = qtrace.trace(lambda x: x * 2, (ShapeDtype((2,), "float32"),))
    with pytest.raises(qtrace.DTypeError):
        graph.eval(np.ones(2, np.float64))


# -- indexing -----------------------------------------------------------------------------------------

INDEX = np.array([[0, 2], [3, 1]])
GETITEM_KEYS = {
    "int": 1,
    "negative-int": -1,
    "two-ints": (1, 2),
    "slice-with-step": slice(None, None, 2),
    "negative-step": (slice(None), slice(4, 0, -2)),
    "bounded-slice": (slice(1, 3), slice(-3, None)),
    "none": None,
    "none-and-int": (None, 1),
    "ellipsis-int": (Ellipsis, 2),
    "ellipsis-none": (Ellipsis, None),
    "middle-ellipsis": (0, Ellipsis, 1),
    "index-array": INDEX,
    "index-array-second-axis": (slice(None), INDEX),
    "int-and-index-array": (0, INDEX),
    "two-index-arrays": (INDEX, INDEX % 3),
    "none-then-index-array": (None, INDEX),
    "index-array-then-none": (INDEX, None),
    "ellipsis-index-array": (Ellipsis, INDEX),
    "list-index": ([0, 3],),
    "mixed": (slice(None), -2, None, slice(1, None, 3)),
}


@pytest.mark.parametrize("key", GETITEM_KEYS.values(), ids=GETITEM_KEYS.keys())
def test_getitem_matches_numpy(rng, key):
    x = rng.standard_normal((4, 5, 6)).astype(np.float32)
    graph = qtrace.trace(lambda a: a[key], (ShapeDtype(x.shape),))
    result = graph.eval(x)
    assert graph.outputs[0].shape == x[key].shape
    np.testing.assert_array_equal(result, x[key])


def test_getitem_with_a_traced_index_array_matches_numpy(rng):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    graph = qtrace.trace(lambda a, i: a[:, i], (ShapeDtype((4, 5)), ShapeDtype(("n",), "int32")))
    index = np.array([4, 0, -1], np.int32)
    np.testing.assert_array_equal(graph.eval(x, index), x[:, index])


def test_getitem_with_too_many_indices_raises_shape_error():
    def fn(x):
        return x[0, 0, 0]  # too many

    with pytest.raises(qtrace.ShapeError) as info:
        qtrace.trace(fn, (ShapeDtype((2, 3)),))
    assert_located(info.value, fn, "# too many")


def test_getitem_out_of_bounds_raises_shape_error():
    with pytest.raises(qtrace.ShapeError):
        qtrace.trace(lambda x: x[5], (ShapeDtype((2, 3)),))


SETITEM_KEYS = {
    "int": 0,
    "negative-int": -1,
    "two-ints": (1, 2),
    "slice-with-step": slice(None, None, 2),
    "negative-step": (slice(None), slice(4, 0, -2)),
    "ellipsis-int": (Ellipsis, 2),
    "index-array": np.array([0, 2]),
    "index-array-second-axis": (slice(None), np.array([4, 1])),
    "int-and-index-array": (0, np.array([0, 2])),
    "two-index-arrays": (np.array([0, 3]), np.array([1, 2])),
    "slice-int-slice": (slice(1, 3), 2, slice(None, None, 3)),
}


@pytest.mark.parametrize("value_kind", ["scalar", "row", "full"])
@pytest.mark.parametrize("key", SETITEM_KEYS.values(), ids=SETITEM_KEYS.keys())
def test_setitem_records_index_put_and_matches_numpy(rng, key, value_kind):
    x = rng.standard_normal((4, 5, 6)).astype(np.float32)
    region = x[key].shape
    value = {"scalar": 7.0, "row": rng.standard_normal(region[-1:]).astype(np.float32),
             "full": rng.standard_normal(region).astype(np.float32)}[value_kind]

    def fn(a):
        a[key] = value
        return a

    graph = qtrace.trace(fn, (ShapeDtype(x.shape),))
    assert "index_put" in ops(graph)
    expected = x.copy()
    expected[key] = value
    np.testing.assert_array_equal(graph.eval(x), expected)


def test_setitem_with_a_traced_value_matches_numpy(rng):
    def fn(cache, row):
        cache[:, 1] = row * 2
        return cache

    cache, row = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    graph = qtrace.trace(fn, (ShapeDtype((3, 4)), ShapeDtype((3,))))
    expected = cache.copy()
    expected[:, 1] = row * 2
    np.testing.assert_array_equal(graph.eval(cache, row), expected)


def test_setitem_does_not_change_other_references_to_the_input():
    def fn(x):
        before = x
        x[0] = 0.0
        return before, x

    graph = qtrace.trace(fn, (ShapeDtype((2,)),))
    before, after = graph.eval(np.array([5, 6], np.float32))
    np.testing.assert_array_equal(after, [0, 6])
    np.testing.assert_array_equal(before, [0, 6])  # numpy semantics: `before` is the same array


def test_setitem_with_updates_that_do_not_fit_raises_shape_error():
    def fn(x):
        x[0] = np.ones(4, np.float32)  # bad update
        return x

    with pytest.raises(qtrace.ShapeError) as info:
        qtrace.trace(fn, (ShapeDtype((2, 3)),))
    assert_located(info.value, fn, "# bad update")


def test_gather_with_a_negative_axis_counts_from_the_end():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    index = np.array([3, 0, 1])
    np.testing.assert_array_equal(qp.gather(x, [index], axis=-1), x[:, :, index])
    graph = qtrace.trace(lambda a: qp.gather(a, [index], axis=-1), (ShapeDtype((2, 3, 4)),))
    assert graph.outputs[0].shape == (2, 3, 3)
    np.testing.assert_array_equal(graph.eval(x), x[:, :, index])


def test_ufunc_keyword_arguments_raise_unsupported_error_at_the_line():
    def fn(x):
        return np.add(x, x, dtype=np.float64)  # marker: ufunc kwargs

    with pytest.raises(qtrace.UnsupportedError, match="dtype") as info:
        qtrace.trace(fn, (ShapeDtype((2,)),))
    assert_located(info.value, fn, "marker: ufunc kwargs")


def test_true_division_of_a_symbolic_dim_raises_shape_error_at_the_line():
    def fn(x):
        return x.reshape(x.shape[0] / 2, 2)  # marker: dim division

    with pytest.raises(qtrace.ShapeError, match="//") as info:
        qtrace.trace(fn, (ShapeDtype(("n",)),))
    assert_located(info.value, fn, "marker: dim division")


def test_a_tracer_leaked_from_an_earlier_trace_is_reported_as_such():
    leaked = []
    qtrace.trace(lambda x: leaked.append(x) or x, (ShapeDtype((2,)),))
    with pytest.raises(qtrace.TraceError, match="another"):
        qtrace.trace(lambda y: y + leaked[0], (ShapeDtype((2,)),))


def test_tracing_without_the_primitives_loaded_names_the_missing_import() -> None:
    """`import qtrace` loads the primitives only on first use (qtrace.trace, qtrace.lower); tracing
    through qtrace.tracing directly before that says what to import instead of failing obscurely."""
    import subprocess
    import sys

    code = ("import numpy as np\n"
            "from qtrace.tracing import trace\n"
            "from qtrace.ir import ShapeDtype\n"
            "for fn in (lambda x: np.exp(x), lambda x: x + 1, lambda x: np.concatenate([x, x])):\n"
            "    try:\n"
            "        trace(fn, [ShapeDtype((2,), 'float32')])\n"
            "    except Exception as exc:\n"
            "        print(type(exc).__name__, 'import qtrace.primitives' in str(exc))\n"
            "import qtrace\n"
            "print(qtrace.trace(lambda x: np.exp(x) + 1, [ShapeDtype((2,), 'float32')]).nodes[0].op)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.splitlines() == ["UnsupportedError True"] * 3 + ["exp"], result.stderr
