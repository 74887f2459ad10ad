"""Symbolic dimensions (qtrace/dims.py) and how shapes built from them flow through tracing.

A symbolic dim is a polynomial over named sizes; the truth these tests check against is plain
integer arithmetic after substituting sizes, and shapes written out by hand."""

from __future__ import annotations

import operator

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype
from qtrace.dims import Dim, canonical_dim, canonical_shape, exact_divide, substitute

from conftest import assert_located

a, b, c = Dim.named("a"), Dim.named("b"), Dim.named("c")


def traced_shape(fn, *specs):
    graph = qtrace.trace(fn, specs)
    return graph.outputs[0].shape


# -- arithmetic ---------------------------------------------------------------------------------------


def test_product_is_commutative():
    assert a * b == b * a
    assert hash(a * b) == hash(b * a)


def test_sum_is_commutative():
    assert a + b == b + a
    assert hash(a + 3) == hash(3 + a)


def test_adding_then_subtracting_a_constant_gives_the_dim_back():
    assert (a + 1) - 1 == a


def test_a_dim_minus_itself_is_the_int_zero():
    difference = a - a
    assert difference == 0 and type(difference) is int


def test_polynomial_that_cancels_to_a_constant_becomes_an_int():
    value = (a * b + 5) - b * a
    assert value == 5 and type(value) is int


def test_repeated_addition_equals_scaling():
    assert a + a + a == 3 * a
    assert 2 * (a + b) == 2 * a + 2 * b


def test_distributive_law():
    assert a * (b + c) == a * b + a * c


def test_a_dim_never_equals_an_int():
    assert a != 1
    assert not (a == 0)


def test_exact_division_by_a_monomial():
    assert exact_divide(2 * a * b, a) == 2 * b
    assert exact_divide(a * b + a, a) == b + 1
    assert exact_divide(6 * a, 3) == 2 * a


def test_inexact_division_is_none():
    assert exact_divide(a + 1, 2) is None
    assert exact_divide(a * b, c) is None
    assert exact_divide(7, 2) is None


def test_floor_division_by_a_dim_that_does_not_divide_or_a_non_positive_int_raises_shape_error():
    for divisor in (b, 0, -2):
        with pytest.raises(qtrace.ShapeError, match="cannot divide symbolic dim a\\+1"):
            (a + 1) // divisor


@pytest.mark.parametrize("size", [1, 6, 7, 8, 20, 49])
def test_floor_division_by_an_int_is_a_quotient_dim_worth_integer_floor_division(size):
    block = (a + 6) // 7  # ceil(a / 7)
    assert isinstance(block, Dim) and block == (a + 6) // 7 and block != (a + 5) // 7
    assert str(block) == "(a+6)//7"
    assert substitute(block, {"a": size}) == (size + 6) // 7
    assert substitute(3 * block + a, {"a": size}) == 3 * ((size + 6) // 7) + size
    assert substitute(block, {"(a+6)//7": 5}) == 5  # a body that sees only the quotient takes it as given


@pytest.mark.parametrize("size", [5, 20])
def test_a_quotient_dim_lowers_to_its_run_time_value(size):
    def blocks_of_three(x):  # ceil(len / 3) block starts, computed from the input's symbolic length
        return qp.arange((x.shape[0] + 2) // 3) * 3

    lowered = qtrace.lower(blocks_of_three, (ShapeDtype(("n",), np.float32),))
    x = np.zeros(size, np.float32)
    np.testing.assert_array_equal(lowered.run(x), np.arange(0, size, 3))
    np.testing.assert_array_equal(blocks_of_three(x), np.arange(0, size, 3))


def test_str_writes_the_polynomial_with_the_highest_degree_first():
    assert str(2 * a * b + 3) == "2*a*b+3"
    assert str(3 - a) == "-a+3"
    assert str(a * a) == "a*a"


def test_substitute_evaluates_the_polynomial():
    assert substitute(2 * a * b + 3 - c, {"a": 4, "b": 5, "c": 6}) == 2 * 4 * 5 + 3 - 6


def test_substitute_of_a_missing_name_raises_key_error():
    with pytest.raises(KeyError):
        substitute(a + b, {"a": 1})


_OPS = [operator.add, operator.sub, operator.mul]


@st.composite
def polynomial_programs(draw):
    """A random straight-line program over the names a, b, c and small ints."""
    leaves = st.one_of(st.sampled_from(["a", "b", "c"]), st.integers(-5, 5))
    steps = draw(st.lists(st.tuples(st.sampled_from(_OPS), leaves), min_size=1, max_size=6))
    return draw(leaves), steps


def _run(program, value_of):
    start, steps = program
    total = value_of(start)
    for op, leaf in steps:
        total = op(total, value_of(leaf))
    return total


@given(polynomial_programs(), st.integers(1, 50), st.integers(1, 50), st.integers(1, 50))
def test_symbolic_arithmetic_agrees_with_integer_arithmetic(program, size_a, size_b, size_c):
    sizes = {"a": size_a, "b": size_b, "c": size_c}
    symbolic = _run(program, lambda leaf: Dim.named(leaf) if isinstance(leaf, str) else leaf)
    concrete = _run(program, lambda leaf: sizes[leaf] if isinstance(leaf, str) else leaf)
    assert substitute(symbolic, sizes) == concrete


# -- concretization -----------------------------------------------------------------------------------


@pytest.mark.parametrize("compare", [operator.lt, operator.le, operator.gt, operator.ge])
def test_ordering_a_dim_raises_concretization_error(compare):
    with pytest.raises(qtrace.ConcretizationError):
        compare(a, 4)


def test_int_of_a_dim_raises_concretization_error():
    with pytest.raises(qtrace.ConcretizationError):
        int(a)


def test_range_over_a_dim_raises_concretization_error():
    with pytest.raises(qtrace.ConcretizationError):
        range(a)


def test_bool_of_a_dim_is_true():
    assert bool(a)


# -- user spellings -----------------------------------------------------------------------------------


def test_equal_names_are_the_same_dim():
    spec = ShapeDtype(("batch_size", "batch_size"), "float32")
    assert spec.shape[0] == spec.shape[1] == Dim.named("batch_size")


def test_canonical_shape_keeps_ints_and_names_strings():
    assert canonical_shape(("a", 3, np.int64(2))) == (a, 3, 2)


def test_negative_dim_raises_shape_error():
    with pytest.raises(qtrace.ShapeError):
        canonical_dim(-1)


def test_bool_dim_raises_shape_error():
    with pytest.raises(qtrace.ShapeError):
        canonical_dim(True)


def test_dim_name_with_a_space_raises_shape_error():
    with pytest.raises(qtrace.ShapeError):
        ShapeDtype(("batch size",), "float32")


# -- symbolic shapes through primitives ---------------------------------------------------------------


def test_reshape_infers_minus_one_as_the_remaining_product():
    shape = traced_shape(lambda x: x.reshape(x.shape[0], -1), ShapeDtype(("a", "b", 8)))
    assert shape == (a, 8 * b)


def test_reshape_infers_minus_one_when_a_constant_divides_it():
    shape = traced_shape(lambda x: x.reshape(-1, 4), ShapeDtype(("a", "b", 8)))
    assert shape == (2 * a * b, 4)


def test_reshape_merging_symbolic_dims_gives_their_product():
    shape = traced_shape(lambda x: x.reshape(x.shape[1] * x.shape[0]), ShapeDtype(("a", "b")))
    assert shape == (a * b,)


def test_reshape_minus_one_that_does_not_divide_raises_at_the_users_line():
    def split_odd(x):
        return x.reshape(2, -1)  # bad reshape

    with pytest.raises(qtrace.ShapeError) as info:
        qtrace.trace(split_odd, (ShapeDtype(("a", 3)),))
    assert_located(info.value, split_odd, "# bad reshape")


def test_reshape_to_a_different_symbolic_size_raises_shape_error():
    with pytest.raises(qtrace.ShapeError):
        qtrace.trace(lambda x: x.reshape(x.shape[0], 4), (ShapeDtype(("a", "b")),))


def test_concatenate_sums_symbolic_dims():
    shape = traced_shape(lambda x, y: np.concatenate([x, y], axis=1),
                         ShapeDtype(("a", "b")), ShapeDtype(("a", "c")))
    assert shape == (a, b + c)


def test_concatenate_with_itself_doubles_the_dim():
    shape = traced_shape(lambda x: np.concatenate([x, x, x], axis=-1), ShapeDtype(("a", "b")))
    assert shape == (a, 3 * b)


def test_concatenate_with_mismatched_symbolic_dims_off_axis_raises_shape_error():
    with pytest.raises(qtrace.ShapeError):
        qtrace.trace(lambda x, y: np.concatenate([x, y], axis=1), (ShapeDtype(("a", 2)), ShapeDtype(("b", 2))))


def test_split_of_a_symbolic_sum_gives_back_the_parts():
    def halves(x, y):
        joined = np.concatenate([x, y], axis=0)
        return np.split(joined, [2], axis=0)

    graph = qtrace.trace(halves, (ShapeDtype((2, "b")), ShapeDtype(("a", "b"))))
    assert [v.shape for v in graph.outputs] == [(2, b), (a, b)]


def test_broadcasting_a_symbolic_dim_against_one_keeps_it():
    shape = traced_shape(lambda x, y: x + y, ShapeDtype(("a", 1)), ShapeDtype((1, "b")))
    assert shape == (a, b)


def test_broadcasting_two_different_symbolic_dims_raises_shape_error():
    with pytest.raises(qtrace.ShapeError):
        qtrace.trace(lambda x, y: x + y, (ShapeDtype(("a",)), ShapeDtype(("b",))))


def test_slice_from_one_shortens_a_symbolic_dim_by_one():
    assert traced_shape(lambda x: x[:, 1:], ShapeDtype((2, "b"))) == (2, b - 1)


def test_slice_of_the_last_three_of_a_symbolic_dim_raises_shape_error():
    """x[-3:] has min(a, 3) elements: no single size is right for every a, so it is refused."""
    with pytest.raises(qtrace.ShapeError, match="only when a is large enough"):
        qtrace.trace(lambda x: x[-3:], (ShapeDtype(("a",)),))


def test_slice_of_the_last_one_of_a_symbolic_dim_has_length_one():
    assert traced_shape(lambda x: x[-1:], ShapeDtype(("a",))) == (1,)


def test_int_index_on_a_symbolic_dim_removes_it():
    assert traced_shape(lambda x: x[:, -1], ShapeDtype((2, "b", 4))) == (2, 4)


def test_strided_slice_of_a_symbolic_dim_raises_shape_error():
    with pytest.raises(qtrace.ShapeError):
        qtrace.trace(lambda x: x[::2], (ShapeDtype(("a",)),))


def test_matmul_keeps_symbolic_batch_dims():
    shape = traced_shape(lambda x, w: x @ w, ShapeDtype(("a", "b", 8)), ShapeDtype((8, 3)))
    assert shape == (a, b, 3)


def test_arange_of_a_symbolic_dim_has_that_length():
    graph = qtrace.trace(lambda x: qp.arange(x.shape[1]), (ShapeDtype((2, "b")),))
    assert graph.outputs[0].shape == (b,)
    np.testing.assert_array_equal(graph.eval(np.zeros((2, 5), np.float32)), [0, 1, 2, 3, 4])


def test_full_with_a_symbolic_shape_evaluates_at_the_concrete_size():
    graph = qtrace.trace(lambda x: qp.full((x.shape[0], 2), 7, np.int32), (ShapeDtype(("a",)),))
    assert graph.outputs[0].aval == ShapeDtype(("a", 2), "int32")
    np.testing.assert_array_equal(graph.eval(np.zeros(3, np.float32)), [[7, 7], [7, 7], [7, 7]])


@given(st.integers(1, 5), st.integers(1, 5))
def test_graph_traced_with_symbolic_dims_runs_at_any_size(size_a, size_b):
    graph = qtrace.trace(lambda x: x.reshape(-1, 2).sum(axis=0), (ShapeDtype(("a", "b", 2)),))
    x = np.arange(size_a * size_b * 2, dtype=np.float32).reshape(size_a, size_b, 2)
    evens = np.float32(sum(range(0, 2 * size_a * size_b, 2)))
    odds = np.float32(sum(range(1, 2 * size_a * size_b, 2)))
    np.testing.assert_array_equal(graph.eval(x), [evens, odds])


def test_eval_with_inconsistent_sizes_for_one_symbol_raises_shape_error():
    graph = qtrace.trace(lambda x, y: x + y, (ShapeDtype(("a",)), ShapeDtype(("a",))))
    with pytest.raises(qtrace.ShapeError):
        graph.eval(np.zeros(2, np.float32), np.zeros(3, np.float32))


def test_symbolic_dim_used_as_a_value_raises_shape_error():
    with pytest.raises(qtrace.ShapeError):
        qtrace.trace(lambda x: x + x.shape[0], (ShapeDtype(("a",)),))
