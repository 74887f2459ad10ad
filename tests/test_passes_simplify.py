"""simplify (docs/architecture.md, "Passes"): dead-code elimination, common-subexpression elimination, constant folding
that never grows the model past its cap, cancelling transposes / reshapes / lossless casts, dropping
identity operations and explicit broadcasts. Every rewrite keeps Graph.eval unchanged."""

from __future__ import annotations

import collections

import numpy as np
import pytest

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype
from qtrace.passes import run_pipeline
from qtrace.passes.simplify import FOLD_LIMIT_BYTES

ROWS = ShapeDtype(("batch", 4))
VEC = np.array([0.5, -1.0, 2.0, 3.0], np.float32)


def ops(graph) -> collections.Counter:
    return collections.Counter(node.op for node in graph.nodes)


def constant_bytes(graph) -> int:
    return sum(c.const.nbytes for c in graph.constants)


def random_array(spec: ShapeDtype, rng) -> np.ndarray:
    shape = tuple(d if isinstance(d, int) else 2 for d in spec.shape)
    if np.dtype(spec.dtype).kind == "f":
        return (3 * rng.standard_normal(shape)).astype(spec.dtype)
    return rng.integers(-1000, 1000, shape).astype(spec.dtype)


def simplified(fn, *specs, passes=("simplify",), error_bound=None):
    """Trace fn, run the passes; check Graph.eval is unchanged and return (graph, inputs).

    Unchanged means exactly (simplify does no float math of its own beyond what folding evaluates
    with the same references), unless `error_bound(inputs)` gives, per output element, the rounding a
    rewrite may change: a matmul whose weight folding laid out anew may be summed in another order."""
    graph = qtrace.trace(fn, specs)
    rng = np.random.default_rng(0)
    inputs = [random_array(spec, rng) for spec in specs]
    before = graph.eval_flat(inputs)
    run_pipeline(graph, list(passes))
    after = graph.eval_flat(inputs)
    for want, have in zip(before, after):
        assert have.dtype == want.dtype and have.shape == want.shape
        if error_bound is None:
            np.testing.assert_array_equal(have, want)
        else:
            excess = np.abs(have.astype(np.float64) - want) - error_bound(inputs)
            assert np.all(excess <= 0), f"off by up to {excess.max():.3g} past the rounding bound"
    return graph, inputs


def dot_rounding_bound(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Twice the textbook bound on float32 rounding in x @ weight (K terms: K * 2**-24 * |x| @ |w|):
    two summation orders of the same products differ by at most that."""
    k = weight.shape[0]
    return 2 * k * 2.0**-24 * (np.abs(x.astype(np.float64)) @ np.abs(weight.astype(np.float64)))


# -- dead code ------------------------------------------------------------------------------------------


def test_dce_removes_nodes_no_output_depends_on():
    def fn(x):
        unused = np.exp(x) * 3.0  # noqa: F841
        return x + 1.0

    graph, _ = simplified(fn, ROWS, passes=["dce"])
    assert ops(graph) == {"add": 1}


def test_dce_removes_constants_only_dead_code_reads():
    weight = np.arange(16, dtype=np.float32).reshape(4, 4)

    def fn(x):
        unused = x @ weight  # noqa: F841
        return x + 1.0

    graph, _ = simplified(fn, ROWS, passes=["dce"])
    assert all(c.const is not weight for c in graph.constants)


def test_dce_keeps_everything_an_output_needs():
    graph, _ = simplified(lambda x: (np.exp(x), x * 2.0), ROWS, passes=["dce"])
    assert ops(graph) == {"exp": 1, "mul": 1}


def test_dce_removes_a_function_only_dead_code_calls():
    @qtrace.function
    def block(x):
        return np.tanh(x)

    def fn(x):
        unused = block(x)  # noqa: F841
        return x * 2.0

    graph, _ = simplified(fn, ROWS, passes=["dce"])
    assert graph.functions == {} and ops(graph) == {"mul": 1}


# -- common subexpressions ------------------------------------------------------------------------------


def test_cse_merges_identical_operations():
    graph, _ = simplified(lambda x: np.exp(x) + np.exp(x), ROWS, passes=["cse"])
    assert ops(graph) == {"exp": 1, "add": 1}


def test_cse_keeps_operations_with_different_parameters():
    graph, _ = simplified(lambda x: x.sum(0, keepdims=True) + x.sum(1, keepdims=True), ROWS, passes=["cse"])
    assert ops(graph)["reduce_sum"] == 2


def test_cse_keeps_operations_on_different_inputs():
    graph, _ = simplified(lambda x, y: np.exp(x) + np.exp(y), ROWS, ROWS, passes=["cse"])
    assert ops(graph)["exp"] == 2


def test_cse_merges_equal_small_constants_and_then_their_users():
    first, second = VEC.copy(), VEC.copy()
    graph, _ = simplified(lambda x: (x * first) + (x * second), ROWS, passes=["cse"])
    assert ops(graph) == {"mul": 1, "add": 1}
    assert len(graph.constants) == 1


# -- constant folding -----------------------------------------------------------------------------------


def test_fold_replaces_constant_arithmetic_with_its_value():
    graph, _ = simplified(lambda x: x + qp.exp(qp.negative(VEC)), ROWS, passes=["fold"])
    assert ops(graph) == {"add": 1}
    (folded,) = [v for v in graph.nodes[0].inputs if v.is_constant]
    np.testing.assert_allclose(folded.const, np.exp(-VEC), rtol=1e-7)


def test_fold_materializes_a_small_fill():
    graph, _ = simplified(lambda x: x * qp.full((4,), 3.0, np.float32), ROWS, passes=["fold"])
    assert ops(graph) == {"mul": 1}
    assert any(np.array_equal(c.const, np.full(4, 3.0, np.float32)) for c in graph.constants)


def test_fold_leaves_operations_with_symbolic_sizes():
    graph, _ = simplified(lambda x: x + qp.arange(x.shape[0]).astype(np.float32)[:, None], ROWS, passes=["fold"])
    assert ops(graph)["arange"] == 1


BIG = 256  # a [256, 256] float32 weight is 256 KiB, past the folding cap
WEIGHT = np.random.default_rng(5).standard_normal((BIG, BIG)).astype(np.float32)
assert WEIGHT.nbytes > FOLD_LIMIT_BYTES
WIDE = ShapeDtype(("batch", BIG))


def test_fold_does_not_duplicate_a_large_weight_used_twice():
    graph, _ = simplified(lambda x: x @ qp.transpose(WEIGHT) + x @ WEIGHT, WIDE, passes=["fold"])
    assert ops(graph)["transpose"] == 1
    assert constant_bytes(graph) == WEIGHT.nbytes


def test_fold_transforms_a_large_weight_used_once_in_place():
    graph, _ = simplified(lambda x: x @ qp.transpose(WEIGHT), WIDE, passes=["fold"],
                          error_bound=lambda inputs: dot_rounding_bound(inputs[0], WEIGHT.T))
    assert ops(graph) == {"matmul": 1}
    assert constant_bytes(graph) == WEIGHT.nbytes


def test_fold_does_not_expand_a_fill_into_a_large_constant():
    graph, _ = simplified(lambda x: x @ qp.zeros((BIG, BIG), np.float32), WIDE, passes=["fold"])
    assert ops(graph)["full"] == 1
    assert constant_bytes(graph) <= FOLD_LIMIT_BYTES


def test_fold_does_not_expand_a_broadcast_scalar_into_a_large_constant():
    fn = lambda x: np.concatenate([x, qp.broadcast_to(np.float32(2.0), (BIG, BIG))], axis=0)  # noqa: E731
    graph, _ = simplified(fn, ShapeDtype((2, BIG)), passes=["fold"])
    assert ops(graph)["broadcast_to"] == 1
    assert constant_bytes(graph) <= FOLD_LIMIT_BYTES


# -- cancelling pairs -----------------------------------------------------------------------------------

TENSOR = ShapeDtype((2, 3, 4, 5))


def test_transpose_of_transpose_becomes_one_transpose():
    graph, (x,) = simplified(lambda x: x.transpose(1, 2, 0, 3).transpose(2, 0, 3, 1), TENSOR, passes=["canonicalize"])
    (node,) = graph.nodes
    assert node.op == "transpose"
    np.testing.assert_array_equal(np.transpose(x, node.params["perm"]), x.transpose(1, 2, 0, 3).transpose(2, 0, 3, 1))


def test_transpose_followed_by_its_inverse_disappears():
    graph, _ = simplified(lambda x: x.transpose(0, 2, 3, 1).transpose(0, 3, 1, 2), TENSOR, passes=["canonicalize"])
    assert len(graph.nodes) == 0 and graph.outputs == graph.inputs


def test_reshape_of_reshape_becomes_one_reshape():
    graph, _ = simplified(lambda x: x.reshape(x.shape[0], 2, 2).reshape(x.shape[0] * 2, 2), ROWS,
                          passes=["canonicalize"])
    (node,) = graph.nodes
    assert node.op == "reshape" and node.inputs[0] is graph.inputs[0]


def test_reshape_there_and_back_disappears():
    graph, _ = simplified(lambda x: x.reshape(x.shape[0], 2, 2).reshape(x.shape), ROWS, passes=["canonicalize"])
    assert len(graph.nodes) == 0


def test_reshape_of_expand_dims_becomes_one_reshape():
    graph, _ = simplified(lambda x: x[:, None, :].reshape(x.shape[0], 2, 2), ROWS, passes=["canonicalize"])
    assert ops(graph) == {"reshape": 1}


LOSSLESS_CAST_PAIRS = [("float32", "float64"), ("float16", "float32"), ("int32", "int64"), ("bool", "int32")]


@pytest.mark.parametrize("dtype, wider", LOSSLESS_CAST_PAIRS)
def test_lossless_cast_and_back_disappears(dtype, wider):
    graph, _ = simplified(lambda x: x.astype(wider).astype(dtype), ShapeDtype(("batch", 4), dtype),
                          passes=["canonicalize"])
    assert len(graph.nodes) == 0


def test_lossless_cast_then_another_cast_becomes_one_cast():
    graph, _ = simplified(lambda x: x.astype(np.int64).astype(np.float32), ShapeDtype(("batch", 4), "int32"),
                          passes=["canonicalize"])
    (node,) = graph.nodes
    assert node.op == "cast" and node.inputs[0] is graph.inputs[0] and node.params["dtype"] == np.float32


LOSSY_CAST_PAIRS = [("float32", "float16"), ("float32", "int32"), ("int64", "int32"), ("float64", "float32")]


@pytest.mark.parametrize("dtype, narrower", LOSSY_CAST_PAIRS)
def test_lossy_cast_and_back_stays(dtype, narrower):
    graph, _ = simplified(lambda x: x.astype(narrower).astype(dtype), ShapeDtype(("batch", 4), dtype),
                             passes=["simplify"])
    assert ops(graph) == {"cast": 2}


def test_lossy_float16_round_trip_changes_values_so_it_must_stay():
    graph = qtrace.trace(lambda x: x.astype(np.float16).astype(np.float32), (ROWS,))
    run_pipeline(graph, ["simplify"])
    x = np.array([[0.1, 1 / 3, 1e-8, 2049.0]], np.float32)
    np.testing.assert_array_equal(graph.eval(x), x.astype(np.float16).astype(np.float32))
    assert not np.array_equal(graph.eval(x), x)


# -- identities and broadcasts --------------------------------------------------------------------------

IDENTITIES = {
    "times_one": lambda x: x * 1.0,
    "one_times": lambda x: 1.0 * x,
    "plus_zero": lambda x: x + 0.0,
    "zero_plus": lambda x: 0.0 + x,
    "minus_zero": lambda x: x - 0.0,
    "divided_by_one": lambda x: x / 1.0,
    "to_the_power_one": lambda x: x ** 1.0,
    "times_ones_array": lambda x: x * np.ones(4, np.float32),
    "times_ones_fill": lambda x: x * qp.ones_like(x),
    "reshape_to_own_shape": lambda x: x.reshape(x.shape),
    "identity_transpose": lambda x: x.transpose(0, 1),
    "cast_to_own_dtype": lambda x: qp.cast(x, np.float32),
    "broadcast_to_own_shape": lambda x: qp.broadcast_to(x, x.shape),
    "slice_of_everything": lambda x: qp.slice(x, [slice(None, None, 1), slice(0, None, 1)]),
}


@pytest.mark.parametrize("identity", sorted(IDENTITIES))
def test_identity_operation_is_removed(identity):
    graph, _ = simplified(IDENTITIES[identity], ROWS, passes=["canonicalize"])
    assert len(graph.nodes) == 0 and graph.outputs == graph.inputs


NOT_IDENTITIES = {
    "times_one_that_broadcasts": lambda x: x * np.ones((3, 1, 4), np.float32),
    "plus_zero_that_changes_dtype": lambda x: x + np.zeros(4, np.float64),
    "times_nearly_one": lambda x: x * np.float32(1.0000001),
    "reversing_slice": lambda x: x[:, ::-1],
    "slice_from_one": lambda x: x[:, 1:],
    "zero_minus": lambda x: 0.0 - x,
    "one_divided_by": lambda x: 1.0 / x,
}


@pytest.mark.parametrize("operation", sorted(NOT_IDENTITIES))
def test_operation_that_only_looks_like_an_identity_stays(operation):
    graph, _ = simplified(NOT_IDENTITIES[operation], ROWS, passes=["canonicalize"])
    assert len(graph.nodes) >= 1


def test_broadcast_of_a_constant_into_an_elementwise_op_is_dropped():
    graph, _ = simplified(lambda x: qp.broadcast_to(VEC, x.shape) + x, ROWS, passes=["canonicalize"])
    assert ops(graph) == {"add": 1}


def test_broadcast_of_a_value_into_an_elementwise_op_is_dropped():
    graph, _ = simplified(lambda x, y: qp.broadcast_to(x[:, :1], x.shape) * y, ROWS, ROWS, passes=["simplify"])
    assert "broadcast_to" not in ops(graph)


def test_broadcast_that_gives_the_result_its_shape_stays():
    graph, _ = simplified(lambda v, w: qp.broadcast_to(v, (3, 4)) + w, ShapeDtype((4,)), ShapeDtype((4,)),
                          passes=["canonicalize"])
    assert ops(graph) == {"broadcast_to": 1, "add": 1}


def test_simplify_reaches_a_fixed_point_over_its_pieces():
    def fn(x):
        y = (x.transpose(1, 0) * 1.0).transpose(1, 0)           # identity, then transposes that cancel
        unused = np.exp(y)  # noqa: F841
        return y.astype(np.float64).astype(np.float32) + qp.exp(qp.negative(VEC)) + np.tanh(x) - np.tanh(x)

    graph, _ = simplified(fn, ROWS)
    assert ops(graph) == {"add": 2, "tanh": 1, "sub": 1}
