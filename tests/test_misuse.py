"""A catalogue of misuse: what a new user gets wrong, and the error they must see.

Each case is a small function registered with `@misuse(ErrorClass, "part", ...)`. Running it must
raise that qtrace error (never a raw traceback, never nothing), whose message holds every part (the
operation or flag, the shapes or values involved); when the mistake is on a line of the user's code,
the error points at it: the line of the case marked `# <-`. Cases without a user line (a CLI flag, a
file on disk) say `located=False`. The CLI, checkpoint and `generate` cases live in
tests/test_misuse_cli.py, with the same harness.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import numpy as np
import pytest

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype as S

from misuse_harness import Case, catalogue, check_case, ids

F32, F16, I64, I32 = np.float32, np.float16, np.int64, np.int32
CASES: list[Case] = []


# -- primitives: shapes ---------------------------------------------------------------------------------
misuse = catalogue(CASES, "primitives")


@misuse(qtrace.ShapeError, "matmul", "contracting dims differ", "f32[2,3] @ f32[4,2]")
def matmul_contracting_dims():
    qtrace.trace(lambda x: x @ np.ones((4, 2), F32), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "matmul", "batch dims do not broadcast", "f32[2,3,4] @ f32[5,4,2]")
def matmul_batch_dims():
    qtrace.trace(lambda x, y: x @ y, (S((2, 3, 4)), S((5, 4, 2))))  # <-


@misuse(qtrace.ShapeError, "matmul", "at least one dimension", "f32[] @ f32[3]")
def matmul_scalar_operand():
    qtrace.trace(lambda x, y: np.matmul(x, y), (S(()), S((3,))))  # <-


@misuse(qtrace.ShapeError, "matmul", "f32[batch,4] @ f32[seq,2]")
def matmul_symbolic_contracting_dims():
    qtrace.trace(lambda x, y: x @ y.T, (S(("batch", 4)), S((2, "seq"))))  # <-


@misuse(qtrace.DTypeError, "matmul", "bool operands", "bool[2,2]")
def matmul_bool():
    qtrace.trace(lambda x: (x > 0) @ (x > 0), (S((2, 2)),))  # <-


@misuse(qtrace.ShapeError, "add", "[2,3] and [4]", "do not broadcast")
def add_does_not_broadcast():
    qtrace.trace(lambda x, y: x + y, (S((2, 3)), S((4,))))  # <-


@misuse(qtrace.ShapeError, "mul", "[seq,4] and [3,4]", "dim 3 against seq")
def symbolic_dim_against_static():
    qtrace.trace(lambda x, y: x * y, (S(("seq", 4)), S((3, 4))))  # <-


@misuse(qtrace.ShapeError, "sub", "[a] and [b]")
def two_symbolic_dims_do_not_broadcast():
    qtrace.trace(lambda x, y: x - y, (S(("a",)), S(("b",))))  # <-


@misuse(qtrace.ShapeError, "where", "[3] and [2] and [2]")
def where_does_not_broadcast():
    qtrace.trace(lambda c, x: np.where(c > 0, x, x), (S((3,)), S((2,))))  # <-


@misuse(qtrace.ShapeError, "reshape", "f32[2,3]", "[4,2]", "sizes differ")
def reshape_sizes_differ():
    qtrace.trace(lambda x: x.reshape(4, 2), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "reshape", "only one -1", "(-1, -1)")
def reshape_two_unknown_dims():
    qtrace.trace(lambda x: x.reshape(-1, -1), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "reshape", "f32[2,3]", "not a whole number")
def reshape_unknown_dim_not_whole():
    qtrace.trace(lambda x: x.reshape(4, -1), (S((2, 3)),))  # <-


@misuse(qtrace.UnsupportedError, "reshape", "order 'F'")
def reshape_fortran_order():
    qtrace.trace(lambda x: x.reshape((3, 2), order="F"), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "reshape", "f32[n,4]", "[3,n]")
def reshape_symbolic_sizes_differ():
    qtrace.trace(lambda x: x.reshape(3, x.shape[0]), (S(("n", 4)),))  # <-


@misuse(qtrace.ShapeError, "transpose", "perm (0, 0)", "f32[2,3]")
def transpose_repeated_axis():
    qtrace.trace(lambda x: x.transpose(0, 0), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "transpose", "axis 2 is out of range", "rank 2")
def transpose_axis_out_of_range():
    qtrace.trace(lambda x: np.transpose(x, (2, 0)), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "transpose", "perm (1, 0)", "f32[2,3,4]")
def transpose_too_few_axes():
    qtrace.trace(lambda x: x.transpose(1, 0), (S((2, 3, 4)),))  # <-


@misuse(qtrace.ShapeError, "swapaxes", "axis 5 is out of range", "rank 2")
def swapaxes_out_of_range():
    qtrace.trace(lambda x: np.swapaxes(x, 0, 5), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "moveaxis", "axis -4 is out of range", "rank 3")
def moveaxis_out_of_range():
    qtrace.trace(lambda x: np.moveaxis(x, -4, 0), (S((2, 3, 4)),))  # <-


@misuse(qtrace.ShapeError, "squeeze", "axis 1", "f32[2,3]", "not 1")
def squeeze_axis_not_one():
    qtrace.trace(lambda x: np.squeeze(x, 1), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "squeeze", "axis 3 is out of range", "rank 2")
def squeeze_axis_out_of_range():
    qtrace.trace(lambda x: x.squeeze(3), (S((2, 1)),))  # <-


@misuse(qtrace.ShapeError, "expand_dims", "repeated axis", "(0, 0)")
def expand_dims_repeated_axis():
    qtrace.trace(lambda x: np.expand_dims(x, (0, 0)), (S((2,)),))  # <-


@misuse(qtrace.ShapeError, "expand_dims", "axis 5 is out of range", "rank 3")
def expand_dims_out_of_range():
    qtrace.trace(lambda x: np.expand_dims(x, 5), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "broadcast_to", "f32[2,3]", "[4,3,4]")
def broadcast_to_incompatible():
    qtrace.trace(lambda x: np.broadcast_to(x, (4, 3, 4)), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "broadcast_to", "f32[2,3]", "[3]")
def broadcast_to_fewer_dims():
    qtrace.trace(lambda x: np.broadcast_to(x, (3,)), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "broadcast_to", "f32[n]", "[m]")
def broadcast_to_other_symbolic_dim():
    qtrace.trace(lambda x, y: qp.broadcast_to(x, y.shape), (S(("n",)), S(("m",))))  # <-


@misuse(qtrace.ShapeError, "concatenate", "shapes differ off axis 0", "f32[2,3]", "f32[2,4]")
def concatenate_shapes_differ():
    qtrace.trace(lambda x, y: np.concatenate([x, y]), (S((2, 3)), S((2, 4))))  # <-


@misuse(qtrace.ShapeError, "concatenate", "at least one array")
def concatenate_nothing():
    qtrace.trace(lambda x: qp.concatenate([]) + x, (S((2,)),))  # <-


@misuse(qtrace.ShapeError, "concatenate", "zero-dimensional")
def concatenate_scalars():
    qtrace.trace(lambda x: np.concatenate([x, x]), (S(()),))  # <-


@misuse(qtrace.ShapeError, "concatenate", "axis 2 is out of range", "rank 2")
def concatenate_axis_out_of_range():
    qtrace.trace(lambda x: np.concatenate([x, x], axis=2), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "stack", "arrays must have one shape", "f32[2,3], f32[3,2]")
def stack_shapes_differ():
    qtrace.trace(lambda x, y: np.stack([x, y]), (S((2, 3)), S((3, 2))))  # <-


@misuse(qtrace.ShapeError, "split", "dim 0 of f32[5,2]", "3 equal sections")
def split_unequal_sections():
    qtrace.trace(lambda x: np.split(x, 3)[0], (S((5, 2)),))  # <-


@misuse(qtrace.ShapeError, "split", "indices must be increasing", "[3, 1]")
def split_decreasing_indices():
    qtrace.trace(lambda x: np.split(x, [3, 1])[0], (S((5,)),))  # <-


@misuse(qtrace.ShapeError, "split", "dim 0 of f32[n]", "2 equal sections")
def split_symbolic_dim_in_two():
    qtrace.trace(lambda x: np.split(x, 2)[0], (S(("n",)),))  # <-


# -- primitives: slicing and indexing -------------------------------------------------------------------


@misuse(qtrace.ShapeError, "slice", "step cannot be zero")
def slice_step_zero():
    qtrace.trace(lambda x: x[::0], (S((4,)),))  # <-


@misuse(qtrace.UnsupportedError, "slice bound must be a static int", "traced")
def slice_traced_bound():
    qtrace.trace(lambda x, n: x[:n], (S((4,)), S((), "int64")))  # <-


@misuse(qtrace.ShapeError, "slice bounds must be ints", "1.5")
def slice_float_bound():
    qtrace.trace(lambda x: x[1.5:], (S((4,)),))  # <-


@misuse(qtrace.ShapeError, "slice", "slice None:5 of symbolic dim n", "5 elements only when n is large enough")
def slice_constant_length_of_symbolic_dim():
    qtrace.trace(lambda x: x[:5], (S(("n",)),))  # <-


@misuse(qtrace.ShapeError, "slice", "strided slice", "(None:None:2)", "symbolic dim n")
def slice_strided_symbolic_dim():
    qtrace.trace(lambda x: x[::2], (S(("n", 3)),))  # <-


@misuse(qtrace.ShapeError, "index 3 is out of bounds for axis 0", "f32[3,2]")
def index_out_of_bounds():
    qtrace.trace(lambda x: x[3], (S((3, 2)),))  # <-


@misuse(qtrace.ShapeError, "index -4 is out of bounds for axis 1", "f32[2,3]")
def negative_index_out_of_bounds():
    qtrace.trace(lambda x: x[:, -4], (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "too many indices (3)", "f32[2,3]")
def too_many_indices():
    qtrace.trace(lambda x: x[0, 1, 2], (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "only have one Ellipsis")
def two_ellipses():
    qtrace.trace(lambda x: x[..., 0, ...], (S((2, 3)),))  # <-


@misuse(qtrace.UnsupportedError, "boolean-mask indexing", "data-dependent shape", "where()")
def boolean_mask_index():
    qtrace.trace(lambda x: x[x > 0], (S((4,)),))  # <-


@misuse(qtrace.DTypeError, "index arrays must be integers", "float32")
def float_index_array():
    qtrace.trace(lambda x: x[np.array([0.0, 1.0], F32)], (S((4,)),))  # <-


@misuse(qtrace.UnsupportedError, "index arrays separated by slices")
def separated_index_arrays():
    qtrace.trace(lambda x: x[np.array([0, 1]), :, np.array([1, 0])], (S((2, 3, 2)),))  # <-


@misuse(qtrace.UnsupportedError, "index item 'a' is not supported")
def string_index():
    qtrace.trace(lambda x: x["a"], (S((4,)),))  # <-


@misuse(qtrace.DTypeError, "take", "indices must be an integer array", "f32[2]")
def take_float_indices():
    qtrace.trace(lambda x, i: qp.take(x, i), (S((4,)), S((2,))))  # <-


@misuse(qtrace.ShapeError, "take", "axis 2 is out of range", "rank 2")
def take_axis_out_of_range():
    qtrace.trace(lambda x: np.take(x, np.array([0]), axis=2), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "gather", "3 index arrays from axis 0 are too many", "f32[2,2]")
def gather_too_many_index_arrays():
    qtrace.trace(lambda x: qp.gather(x, [np.array([0])] * 3), (S((2, 2)),))  # <-


@misuse(qtrace.ConcretizationError, "traced value", "numpy array", "qtrace.primitives.take")
def numpy_array_indexed_by_tracer():
    table = np.ones((10, 4), F32)
    qtrace.trace(lambda ids: table[ids], (S((3,), "int64"),))  # <-


def _assign_updates_that_do_not_fit(x):
    x[0] = np.ones(4, F32)  # <-
    return x


@misuse(qtrace.ShapeError, "index_put", "updates f32[4] do not broadcast to the indexed region [3] of f32[2,3]",
        at=_assign_updates_that_do_not_fit)
def assignment_updates_do_not_broadcast():
    qtrace.trace(_assign_updates_that_do_not_fit, (S((2, 3)),))


def _assign_with_new_axis(x):
    x[None, 0] = 1.0  # <-
    return x


@misuse(qtrace.UnsupportedError, "None (new axis) in an assignment index", at=_assign_with_new_axis)
def assignment_with_new_axis():
    qtrace.trace(_assign_with_new_axis, (S((2, 3)),))


def _assign_into_numpy_array(x):
    buffer = np.zeros(3, F32)
    buffer[0] = x[0]  # <-
    return x


@misuse(qtrace.ConcretizationError, "float()", "f32[]", "traced value", at=_assign_into_numpy_array)
def assignment_of_a_tracer_into_a_numpy_array():
    qtrace.trace(_assign_into_numpy_array, (S((3,)),))


# -- primitives: reductions, nn, elementwise dtypes ---------------------------------------------------


@misuse(qtrace.ShapeError, "reduce_max", "cannot reduce an empty axis", "f32[0,3]")
def max_of_an_empty_axis():
    qtrace.trace(lambda x: x[:0].max(axis=0), (S((2, 3)),))  # <-


@misuse(qtrace.UnsupportedError, "sum", "unsupported arguments ['out']")
def sum_with_out():
    qtrace.trace(lambda x: np.sum(x, out=np.zeros(())), (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "mean", "unsupported arguments ['where']")
def mean_with_where():
    qtrace.trace(lambda x: np.mean(x, where=True), (S((3,)),))  # <-


@misuse(qtrace.ShapeError, "sum", "axis 2 is out of range", "rank 2")
def sum_axis_out_of_range():
    qtrace.trace(lambda x: x.sum(axis=2), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "mean", "repeated axis", "(0, -2)")
def mean_repeated_axis():
    qtrace.trace(lambda x: x.mean(axis=(0, -2)), (S((2, 3)),))  # <-


@misuse(qtrace.ShapeError, "max", "axis must be an int", "1.0")
def max_float_axis():
    qtrace.trace(lambda x: x.max(axis=1.0), (S((2, 3)),))  # <-


@misuse(qtrace.DTypeError, "argmax", "bool array", "bool[3]")
def argmax_of_bools():
    qtrace.trace(lambda x: np.argmax(x > 0), (S((3,)),))  # <-


@misuse(qtrace.ShapeError, "argmax", "axis 1 is out of range", "rank 1")
def argmax_axis_out_of_range():
    qtrace.trace(lambda x: x.argmax(axis=1), (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "var", "ddof=1 over the symbolic dim n")
def var_ddof_over_symbolic_dim():
    qtrace.trace(lambda x: x.var(ddof=1), (S(("n",)),))  # <-


@misuse(qtrace.ShapeError, "var with ddof=3 over 3 elements divides by 0")
def var_ddof_too_large():
    qtrace.trace(lambda x: np.var(x, ddof=3), (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "softmax", "floating-point array", "i64[3]")
def softmax_of_ints():
    qtrace.trace(lambda x: qp.softmax(x), (S((3,), "int64"),))  # <-


@misuse(qtrace.ShapeError, "softmax", "axis 1 is out of range", "rank 1")
def softmax_axis_out_of_range():
    qtrace.trace(lambda x: qp.softmax(x, axis=1), (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "exp", "floating-point array", "i64[3]")
def exp_of_ints():
    qtrace.trace(lambda x: np.exp(x), (S((3,), "int64"),))  # <-


@misuse(qtrace.DTypeError, "sqrt", "floating-point array", "bool[3]")
def sqrt_of_bools():
    qtrace.trace(lambda x: np.sqrt(x > 0), (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "neg", "numeric (non-bool)", "bool[3]")
def negate_bools():
    qtrace.trace(lambda x: -(x > 0), (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "bitwise and", "float32")
def and_of_floats():
    qtrace.trace(lambda x: x & x, (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "bitwise invert", "int64")
def invert_ints():
    qtrace.trace(lambda x: ~x, (S((3,), "int64"),))  # <-


@misuse(qtrace.DTypeError, "floor_divide", "integer array, got f32[3]")
def floor_divide_floats():
    qtrace.trace(lambda x: x // 2, (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "remainder", "integer array, got f32[3]")
def remainder_of_floats():
    qtrace.trace(lambda x: x % 2, (S((3,)),))  # <-


@misuse(qtrace.ShapeError, "rms_norm", "weight f32[3]", "last dim of f32[2,4]")
def rms_norm_weight_size():
    qtrace.trace(lambda x: qp.rms_norm(x, np.ones(3, F32)), (S((2, 4)),))  # <-


@misuse(qtrace.ShapeError, "rms_norm", "eps must be a non-negative float", "-1e-06")
def rms_norm_negative_eps():
    qtrace.trace(lambda x: qp.rms_norm(x, np.ones(4, F32), eps=-1e-6), (S((2, 4)),))  # <-


@misuse(qtrace.ShapeError, "gelu", "approximate must be 'none' or 'tanh'", "'fast'")
def gelu_unknown_approximation():
    qtrace.trace(lambda x: qp.gelu(x, approximate="fast"), (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "add", "the Python int 1180591620717411303424 does not fit int64")
def python_int_past_int64():
    qtrace.trace(lambda x: x + 2**70, (S((3,), "int64"),))  # <-


@misuse(qtrace.DTypeError, "mul", "the Python int 4294967296 does not fit int32")
def python_int_past_int32():
    qtrace.trace(lambda x: x * 2**32, (S((3,), "int32"),))  # <-


@misuse(qtrace.UnsupportedError, "ndarray.cumsum", "f32[3]")
def unsupported_ndarray_method():
    qtrace.trace(lambda x: x.cumsum(), (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "numpy.cumsum is not supported", "concatenate")
def unsupported_numpy_function():
    qtrace.trace(lambda x: np.cumsum(x), (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "numpy.arctan2 is not supported", "supported ufuncs")
def unsupported_ufunc():
    qtrace.trace(lambda x: np.arctan2(x, x), (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "numpy.add.reduce is not supported")
def ufunc_method():
    qtrace.trace(lambda x: np.add.reduce(x), (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "numpy.exp", "keyword arguments ['dtype']")
def ufunc_keyword():
    qtrace.trace(lambda x: np.exp(x, dtype=F16), (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "numpy.exp: out= is not supported on traced values")
def ufunc_out_argument():
    qtrace.trace(lambda x: np.exp(x, out=np.zeros(3, F32)), (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "one-argument np.where", "data-dependent shape")
def where_one_argument():
    qtrace.trace(lambda x: np.where(x > 0)[0], (S((3,)),))  # <-


@misuse(qtrace.UnsupportedError, "repeat counts must be one static int")
def repeat_with_array_counts():
    qtrace.trace(lambda x: np.repeat(x, [1, 2, 3]), (S((3,)),))  # <-


# -- primitives: creation and symbolic dims ---------------------------------------------------------------


@misuse(qtrace.ShapeError, "arange", "step cannot be zero")
def arange_step_zero():
    qtrace.trace(lambda x: x + qp.arange(0, 3, 0), (S((3,), "int64"),))  # <-


@misuse(qtrace.ShapeError, "arange(0, n, 2)", "not a polynomial")
def arange_symbolic_with_step():
    qtrace.trace(lambda x: qp.arange(0, x.shape[0], 2), (S(("n",)),))  # <-


@misuse(qtrace.ShapeError, "broadcast_to", "f32[3]", "[2,2]")
def full_with_an_array_of_the_wrong_shape():
    qtrace.trace(lambda x: qp.full((2, 2), x), (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "dtype complex64 is not supported")
def zeros_complex():
    qtrace.trace(lambda x: x + qp.zeros(3, np.complex64).real, (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "dtype uint64 is not supported")
def cast_to_unsupported_dtype():
    qtrace.trace(lambda x: x.astype(np.uint64), (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "not a dtype", "'float33'")
def cast_to_a_misspelled_dtype():
    qtrace.trace(lambda x: x.astype("float33"), (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "full", "the Python int 70000000000 does not fit int32")
def full_value_past_dtype():
    qtrace.trace(lambda x: x + qp.full(3, 70_000_000_000, np.int32), (S((3,), "int32"),))  # <-


@misuse(qtrace.ShapeError, "symbolic dim n cannot be used as a value", "arange or full")
def symbolic_dim_as_a_value():
    qtrace.trace(lambda x: x * qp.maximum(x.shape[0], 1), (S(("n",)),))  # <-


@misuse(qtrace.ConcretizationError, "symbolic dim n has no concrete value")
def int_of_a_symbolic_dim():
    qtrace.trace(lambda x: x.reshape(int(x.shape[0]), 1), (S(("n",)),))  # <-


def _loop_over_symbolic_dim(x):
    total = x[0]
    for i in range(x.shape[0]):  # <-
        total = total + x[i]
    return total


@misuse(qtrace.ConcretizationError, "symbolic dim n", at=_loop_over_symbolic_dim)
def range_over_a_symbolic_dim():
    qtrace.trace(_loop_over_symbolic_dim, (S(("n",)),))


@misuse(qtrace.ConcretizationError, "cannot compare symbolic dim n with 4")
def compare_a_symbolic_dim():
    qtrace.trace(lambda x: x[:2] if x.shape[0] > 4 else x, (S(("n",)),))  # <-


@misuse(qtrace.ShapeError, "symbolic dim", "n / 2")
def true_division_of_a_symbolic_dim():
    qtrace.trace(lambda x: x.reshape(x.shape[0] / 2, 2), (S(("n",)),))  # <-


# -- Cloud AI 100 KV-cache primitives -------------------------------------------------------------------


@misuse(qtrace.ShapeError, "ctx_scatter", "data must be [batch, heads, ctx, dim] or [batch, ctx, dim]", "f32[2,8]")
def ctx_scatter_of_a_matrix():
    qtrace.trace(lambda c, p, u: qp.ctx_scatter(c, p, u), (S((2, 8)), S((2, 1), "int64"), S((2, 1))))  # <-


@misuse(qtrace.DTypeError, "ctx_scatter", "position_ids must be an integer array", "f32[1,2]")
def ctx_scatter_float_positions():
    qtrace.trace(lambda c, p, u: qp.ctx_scatter(c, p, u), (S((1, 2, 8, 4)), S((1, 2)), S((1, 2, 2, 4))))  # <-


@misuse(qtrace.ShapeError, "ctx_scatter", "updates must be [1,2,3,4]", "f32[1,2,3,5]")
def ctx_scatter_updates_shape():
    qtrace.trace(lambda c, p, u: qp.ctx_scatter(c, p, u),  # <-
                 (S((1, 2, 8, 4)), S((1, 3), "int64"), S((1, 2, 3, 5))))


@misuse(qtrace.DTypeError, "ctx_scatter", "updates must have the dtype of data", "f16[1,2,3,4]")
def ctx_scatter_updates_dtype():
    qtrace.trace(lambda c, p, u: qp.ctx_scatter(c, p, u),  # <-
                 (S((1, 2, 8, 4)), S((1, 3), "int64"), S((1, 2, 3, 4), "float16")))


@misuse(qtrace.ShapeError, "ctx_scatter", "position_ids must be [batch, seq] with batch b", "i64[c,3]")
def ctx_scatter_batch_mismatch():
    qtrace.trace(lambda c, p, u: qp.ctx_scatter(c, p, u),  # <-
                 (S(("b", 2, 8, 4)), S(("c", 3), "int64"), S(("b", 2, 3, 4))))


@misuse(qtrace.ShapeError, "ctx_gather", "ctx_indices must be [B or 1, 1 or H, K]", "i64[8]")
def ctx_gather_indices_rank():
    qtrace.trace(lambda c, i: qp.ctx_gather(c, i), (S((1, 2, 8, 4)), S((8,), "int64")))  # <-


@misuse(qtrace.ShapeError, "ctx_gather", "comp_ctx_len (4) must equal the number of indices K", "i64[1,1,8]")
def ctx_gather_comp_ctx_len():
    qtrace.trace(lambda c, i: qp.ctx_gather(c, i, 4), (S((1, 2, 8, 4)), S((1, 1, 8), "int64")))  # <-


@misuse(qtrace.ShapeError, "ctx_gather_cb", "batch_index must be [b,1]", "i64[b]")
def ctx_gather_cb_batch_index_shape():
    qtrace.trace(lambda c, b, i: qp.ctx_gather_cb(c, b, i),  # <-
                 (S(("n", 2, 8, 4)), S(("b",), "int64"), S(("b", 1, 8), "int64")))


@misuse(qtrace.DTypeError, "ctx_scatter_cb", "batch_index must be an integer array", "f32[1,1]")
def ctx_scatter_cb_float_batch_index():
    qtrace.trace(lambda c, b, p, u: qp.ctx_scatter_cb(c, b, p, u),  # <-
                 (S((3, 2, 8, 4)), S((1, 1)), S((1, 2), "int64"), S((1, 2, 2, 4))))


@misuse(qtrace.ShapeError, "ctx_gather", "data must be", "f32[]")
def ctx_gather_of_a_scalar():
    qtrace.trace(lambda c, i: qp.ctx_gather(c, i), (S(()), S((1, 1, 8), "int64")))  # <-


# -- tracing: Python needs concrete values ---------------------------------------------------------------
misuse = catalogue(CASES, "tracing")


def _branch_on_a_tracer(x):
    if x.sum() > 0:  # <-
        return x
    return -x


@misuse(qtrace.ConcretizationError, "Python control flow", "bool[]", "where", at=_branch_on_a_tracer)
def if_on_a_traced_value():
    qtrace.trace(_branch_on_a_tracer, (S((3,)),))


@misuse(qtrace.ConcretizationError, "int()", "i64[]")
def int_of_a_traced_value():
    qtrace.trace(lambda x, n: x * int(n), (S((3,)), S((), "int64")))  # <-


@misuse(qtrace.ConcretizationError, "float()", "f32[]")
def float_of_a_traced_value():
    qtrace.trace(lambda x: x * float(x.max()), (S((3,)),))  # <-


@misuse(qtrace.ConcretizationError, "item()", "f32[]")
def item_of_a_traced_value():
    qtrace.trace(lambda x: x * x.sum().item(), (S((3,)),))  # <-


@misuse(qtrace.ConcretizationError, "tolist()", "f32[3]")
def tolist_of_a_traced_value():
    qtrace.trace(lambda x: x.tolist(), (S((3,)),))  # <-


@misuse(qtrace.ConcretizationError, "conversion to a numpy array", "f32[3]")
def asarray_of_a_traced_value():
    qtrace.trace(lambda x: np.asarray(x) + 1, (S((3,)),))  # <-


@misuse(qtrace.ConcretizationError, "use as a Python index", "i64[]")
def tracer_as_a_list_index():
    items = [1.0, 2.0, 3.0]
    qtrace.trace(lambda x, i: x * items[i], (S((3,)), S((), "int64")))  # <-


@misuse(qtrace.ConcretizationError, "Python control flow", "bool[3]")
def python_and_of_traced_values():
    qtrace.trace(lambda x: (x > 0) and (x < 1), (S((3,)),))  # <-


@misuse(qtrace.ConcretizationError, "Python control flow", "bool[]")
def python_max_of_traced_values():
    qtrace.trace(lambda x, y: max(x.sum(), y.sum()), (S((3,)), S((3,))))  # <-


@misuse(qtrace.ConcretizationError, "len() of a traced value whose first dim is symbolic (n)")
def len_of_a_symbolic_dim():
    qtrace.trace(lambda x: x * len(x), (S(("n",)),))  # <-


@misuse(qtrace.TraceError, "len() of a 0-d traced value")
def len_of_a_scalar():
    qtrace.trace(lambda x: x * len(x), (S(()),))  # <-


def _iterate_symbolic(x):
    total = x[0]
    for row in x:  # <-
        total = total + row
    return total


@misuse(qtrace.ConcretizationError, "first dim is symbolic (n)", at=_iterate_symbolic)
def iterate_over_a_symbolic_dim():
    qtrace.trace(_iterate_symbolic, (S(("n", 2)),))


LEAKED: list[Any] = []


def _leak(x):
    LEAKED.append(x)
    return x + 1


@misuse(qtrace.TraceError, "from another (finished) trace")
def tracer_leaked_into_another_trace():
    qtrace.trace(_leak, (S((3,)),))
    qtrace.trace(lambda y: y + LEAKED[-1], (S((3,)),))  # <-


@misuse(qtrace.TraceError, "exp", "escaped its trace")
def tracer_leaked_and_used_eagerly():
    qtrace.trace(_leak, (S((3,)),))
    qp.exp(LEAKED[-1])  # <-


STATE = np.zeros(3, F32)


def _write_global(x):
    STATE[0] = 1.0  # <-
    return x + STATE


@misuse(qtrace.TraceError, "writes into numpy array STATE", "constant of the model", at=_write_global)
def closure_array_written_while_tracing():
    qtrace.trace(_write_global, (S((3,)),))


def _recurse_forever(x, depth):
    return _recurse_forever(x + 1, depth + 1)  # <-


@misuse(qtrace.TraceError, "maximum recursion depth", "_recurse_forever", at=_recurse_forever)
def unbounded_recursion():
    qtrace.trace(lambda x: _recurse_forever(x, 0), (S((3,)),))


@misuse(qtrace.TraceError, "example_args must be a tuple or list", "ndarray")
def example_args_not_a_tuple():
    qtrace.trace(lambda x: x, np.zeros(3, F32))  # <-


@misuse(qtrace.TraceError, "example_args must be a tuple or list", "ShapeDtype")
def lower_example_args_not_a_tuple():
    qtrace.lower(lambda x: x, S((3,)))  # <-


@misuse(qtrace.ShapeError, "symbolic dim name", "'batch size'")
def shape_with_a_bad_dim_name():
    S(("batch size", 3))  # <-


@misuse(qtrace.ShapeError, "cannot be negative", "-2")
def shape_with_a_negative_dim():
    S((3, -2))  # <-


@misuse(qtrace.ShapeError, "must be an int or a symbolic name", "2.5")
def shape_with_a_float_dim():
    S((3, 2.5))  # <-


@misuse(qtrace.DTypeError, "dtype complex64 is not supported")
def shape_dtype_complex():
    S((3,), "complex64")  # <-


@misuse(qtrace.DTypeError, "not a dtype", "'f32'")
def shape_dtype_short_name():
    S((3,), "f32")  # <-


@misuse(qtrace.TraceError, "input_names has 1 names for 2 array inputs (x, y)")
def input_names_count():
    qtrace.trace(lambda x, y: x + y, (S((3,)), S((3,))), input_names=["a"])  # <-


@misuse(qtrace.TraceError, "two inputs are both named 'a'")
def input_names_repeated():
    qtrace.trace(lambda x, y: x + y, (S((3,)), S((3,))), input_names=["a", "a"])  # <-


@misuse(qtrace.TraceError, "input_names must be a list of strings", "'xy'")
def input_names_a_string():
    qtrace.lower(lambda x, y: x + y, (S((3,)), S((3,))), input_names="xy")  # <-


# -- pytrees: arguments at run time ----------------------------------------------------------------------
misuse = catalogue(CASES, "pytrees")


def _lowered_pair():
    return qtrace.lower(lambda x, cache: {"y": x + cache["k"]}, (S((3,)), {"k": S((3,))}))


@misuse(qtrace.TraceError, "arguments do not match the traced ones", "expected 2 entries, got 1")
def run_with_too_few_arguments():
    _lowered_pair().run(np.zeros(3, F32))  # <-


@misuse(qtrace.TraceError, "arguments do not match the traced ones", "expected keys ['k'], got ['v']")
def run_with_another_dict_key():
    _lowered_pair().run(np.zeros(3, F32), {"v": np.zeros(3, F32)})  # <-


@misuse(qtrace.TraceError, "arguments do not match the traced ones", "expected a dict, got list")
def run_with_a_list_for_a_dict():
    _lowered_pair().run(np.zeros(3, F32), [np.zeros(3, F32)])  # <-


@misuse(qtrace.TraceError, "arguments do not match the traced ones", "expected keys [], got ['extra']")
def run_with_an_extra_keyword():
    _lowered_pair().run(np.zeros(3, F32), {"k": np.zeros(3, F32)}, extra=1)  # <-


class Pair(NamedTuple):
    key: Any
    value: Any


@misuse(qtrace.TraceError, "arguments do not match the traced ones", "expected a namedtuple, got tuple")
def run_with_a_tuple_for_a_namedtuple():
    lowered = qtrace.lower(lambda p: p.key * p.value, (Pair(S((2,)), S((2,))),))
    lowered.run((np.ones(2, F32), np.ones(2, F32)))  # <-


@misuse(qtrace.TraceError, "graph", "arguments do not match the traced ones")
def graph_eval_with_a_missing_argument():
    graph = qtrace.trace(lambda x, y: x * y, (S((2,)), S((2,))))
    graph.eval(np.ones(2, F32))  # <-


@misuse(qtrace.TraceError, "output 'output' is set", "not an array")
def output_a_set():
    qtrace.trace(lambda x: {x.sum()}, (S((3,)),))  # <-


@misuse(qtrace.TraceError, "output 'output.1' is str 'done'")
def output_a_string():
    qtrace.trace(lambda x: (x, "done"), (S((3,)),))  # <-


@misuse(qtrace.TraceError, "output 'scale' is float 2.0")
def output_a_python_float():
    qtrace.trace(lambda x: {"y": x, "scale": 2.0}, (S((3,)),))  # <-


# -- outputs and names -------------------------------------------------------------------------------------
misuse = catalogue(CASES, "outputs")


@misuse(qtrace.TraceError, "returned None", "must return at least one array")
def function_returns_nothing():
    qtrace.lower(lambda x: None, (S((3,)),))  # <-


@misuse(qtrace.TraceError, "returned {}", "must return at least one array")
def function_returns_an_empty_dict():
    qtrace.lower(lambda x: {}, (S((3,)),))  # <-


@misuse(qtrace.TraceError, "output_names has 1 names for 2 outputs")
def output_names_count():
    qtrace.trace(lambda x: (x, x + 1), (S((3,)),), output_names=["y"])  # <-


@misuse(qtrace.TraceError, "two outputs are both named 'y'")
def output_names_repeated():
    qtrace.trace(lambda x: (x, x + 1), (S((3,)),), output_names=["y", "y"])  # <-


@misuse(qtrace.TraceError, "output 'x' has the name of an input")
def output_named_like_an_input():
    qtrace.lower(lambda x: {"x": x * 2}, (S((3,)),))  # <-


@misuse(qtrace.TraceError, "output names collide after retained-state naming", "past_key.0_RetainedState")
def retained_state_names_collide():
    def step(past_key, position_ids, k):
        cache = {"past_key.0": past_key}
        new = qp.ctx_scatter(cache["past_key.0"], position_ids, k)
        return {"a": new, "b": qp.ctx_scatter(new, position_ids, k)}

    args = (S((1, 1, 8, 4)), S((1, 2), "int64"), S((1, 1, 2, 4)))
    qtrace.lower(step, args, input_names=["past_key.0", "position_ids", "k"])  # <-


@misuse(qtrace.ShapeError, "output past_key.0_RetainedState is the retained state of input past_key.0",
        "f32[1,1,8,4]", "f16[1,1,8,4]")
def retained_state_with_another_dtype():
    qtrace.lower(lambda past_key, p, k: {"past_key.0_RetainedState": past_key.astype(F16)},  # <-
                 (S((1, 1, 8, 4)), S((1, 2), "int64"), S((1, 1, 2, 4))), input_names=["past_key.0", "p", "k"])


@misuse(qtrace.TraceError, "output_names must be a list of strings")
def output_names_a_string():
    qtrace.lower(lambda x: x + 1, (S((3,)),), output_names="y")  # <-


# -- @qtrace.function -------------------------------------------------------------------------------------
misuse = catalogue(CASES, "functions")


@qtrace.function
def _scaled(x, factors):
    return x * factors[0]


@misuse(qtrace.TraceError, "non-array argument of a @qtrace.function must be hashable", "bytearray")
def function_with_an_unhashable_static_argument():
    qtrace.trace(lambda x: _scaled(x, bytearray(b"\x02")), (S((3,)),))  # <-


def _outer_value_in_body(x):
    @qtrace.function
    def inner(y):
        return y + x  # <-

    return inner(x * 2)


@misuse(qtrace.TraceError, "enclosing trace", "pass it to the function as an argument", at=_outer_value_in_body)
def function_body_uses_an_outer_traced_value():
    qtrace.trace(_outer_value_in_body, (S((3,)),))


@qtrace.function
def _same_signature_forever(x):
    return _same_signature_forever(x * 2)  # <-


@misuse(qtrace.TraceError, "_same_signature_forever calls itself with the same signature",
        at=_same_signature_forever.__wrapped__)
def function_recursion_without_end():
    qtrace.trace(lambda x: _same_signature_forever(x), (S((3,)),))


@qtrace.function
def _body_without_result(x):
    y = x + 1  # noqa: F841


@misuse(qtrace.TraceError, "_body_without_result", "returned None")
def function_body_returns_nothing():
    qtrace.trace(lambda x: _body_without_result(x), (S((3,)),))  # <-


@qtrace.function
def _body_with_symbolic_range(x):
    return x + qp.arange(x.shape[0]).astype(F32)  # <-


@misuse(qtrace.CheckError, "arange", "inside @qtrace.function _body_with_symbolic_range", "symbolic",
        at=_body_with_symbolic_range.__wrapped__)
def function_body_with_a_symbolic_range():
    qtrace.lower(lambda x: _body_with_symbolic_range(x) * 2, (S(("n",)),))


# -- dtypes ------------------------------------------------------------------------------------------------
misuse = catalogue(CASES, "dtypes")


@misuse(qtrace.DTypeError, "x f32[3] is promoted to float64 for div", "Cloud AI 100 has no float64")
def float64_numpy_scalar():
    qtrace.lower(lambda x: x / np.sqrt(2.0), (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "promoted to float64 for mul with w f64[3]", "astype(np.float32)")
def float64_weight():
    w = np.arange(3.0)
    qtrace.lower(lambda x: x * w, (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "input x is f64[3]", "no float64")
def float64_input():
    qtrace.lower(lambda x: x + 1, (S((3,), "float64"),))  # <-


@misuse(qtrace.DTypeError, "float64", "div")
def int_true_division_gives_float64():
    qtrace.lower(lambda i: i / 2, (S((3,), "int64"),))  # <-


@misuse(qtrace.DTypeError, "float64", "reduce_mean")
def mean_of_ints_gives_float64():
    qtrace.lower(lambda i: i.mean(), (S((3,), "int64"),))  # <-


@misuse(qtrace.DTypeError, "float64", "ones()/zeros() without a dtype")
def ones_without_a_dtype():
    qtrace.lower(lambda x: x + qp.ones(x.shape), (S((3,)),))  # <-


@misuse(qtrace.LoweringError, "dtype must be None or float16", "'float8'")
def lower_to_float8():
    qtrace.lower(lambda x: x, (S((3,)),), dtype="float8")  # <-


@misuse(qtrace.LoweringError, "dtype must be None or float16", "'bfloat16'")
def lower_to_bfloat16():
    qtrace.lower(lambda x: x, (S((3,)),), dtype="bfloat16")  # <-


@misuse(qtrace.DTypeError, "pow", "numeric (non-bool) array, got bool[3]")
def power_of_bools():
    qtrace.lower(lambda x: (x > 0) ** (x > 1), (S((3,)),))  # <-


@misuse(qtrace.LoweringError, "neg", "ONNX Neg does not accept uint8")
def negate_uint8():
    qtrace.lower(lambda x: -x, (S((3,), "uint8"),))  # <-


@misuse(qtrace.DTypeError, "branches must have the same dtype" if False else "where", "bool")
def where_with_a_string_branch():
    qtrace.trace(lambda x: np.where(x > 0, x, "zero"), (S((3,)),))  # <-


@misuse(qtrace.DTypeError, "NoneType None is not an array or a number")
def compare_with_none():
    qtrace.trace(lambda x: x == None, (S((3,)),))  # <-  # noqa: E711


# -- opsets and lower() arguments ---------------------------------------------------------------------------
misuse = catalogue(CASES, "opsets")


@misuse(qtrace.LoweringError, "opset must be an int", "str '17'")
def opset_as_a_string():
    qtrace.lower(lambda x: x + 1, (S((3,)),), opset="17")  # <-


@misuse(qtrace.LoweringError, "opset 16 is not supported", "17..21")
def opset_too_old():
    qtrace.lower(lambda x: x + 1, (S((3,)),), opset=16)  # <-


@misuse(qtrace.LoweringError, "opset 22 is not supported", "17..21")
def opset_too_new():
    qtrace.lower(lambda x: x + 1, (S((3,)),), opset=22)  # <-


@misuse(qtrace.LoweringError, "opset must be an int", "float 17.0")
def opset_as_a_float():
    qtrace.lower(lambda x: x + 1, (S((3,)),), opset=17.0)  # <-


@misuse(qtrace.LoweringError, "opset must be an int", "bool True")
def opset_as_a_bool():
    qtrace.lower(lambda x: x + 1, (S((3,)),), opset=True)  # <-


@misuse(qtrace.CheckError, "unknown pass(es) ['fusion']", "registered")
def unknown_pass():
    qtrace.lower(lambda x: x + 1, (S((3,)),), passes=["fusion"])  # <-


@misuse(qtrace.TraceError, "passes must be a list of strings", "'fuse'")
def passes_as_a_string():
    qtrace.lower(lambda x: x + 1, (S((3,)),), passes="fuse")  # <-


# -- running and saving a lowered model ---------------------------------------------------------------------
misuse = catalogue(CASES, "files")


def _lowered_ids():
    return qtrace.lower(lambda x, ids: {"y": x * 2, "i": ids + 1},
                        (S(("batch", "seq", 4)), S(("batch", "seq"), "int64")))


@misuse(qtrace.ShapeError, "symbolic dim seq is 3 in input x but 5 in input ids")
def run_one_dim_two_sizes():
    _lowered_ids().run(np.zeros((2, 3, 4), F32), np.zeros((2, 5), I64))  # <-


@misuse(qtrace.DTypeError, "input ids expects i64[batch,seq], got i32[2,3]", ".astype(np.int64)")
def run_int32_for_int64():
    _lowered_ids().run(np.zeros((2, 3, 4), F32), np.zeros((2, 3), I32))  # <-


@misuse(qtrace.ShapeError, "input x expects f32[batch,seq,4], got f32[2,3,5]", "dim 2 must be 4")
def run_wrong_static_dim():
    _lowered_ids().run(np.zeros((2, 3, 5), F32), np.zeros((2, 3), I64))  # <-


@misuse(qtrace.ShapeError, "input x expects f32[batch,seq,4] (rank 3), got f32[3,4] (rank 2)")
def run_wrong_rank():
    _lowered_ids().run(np.zeros((3, 4), F32), np.zeros((2, 3), I64))  # <-


@misuse(qtrace.ShapeError, "symbolic dim batch must be at least 1")
def run_empty_batch():
    _lowered_ids().run(np.zeros((0, 3, 4), F32), np.zeros((0, 3), I64))  # <-


@misuse(qtrace.DTypeError, "input x expects f32[batch,seq,4], got f64[1,1,4]")
def verify_with_float64():
    _lowered_ids().verify(np.zeros((1, 1, 4)), np.zeros((1, 1), I64))  # <-


@misuse(qtrace.TraceError, "feeds do not match the model's inputs", "missing ['ids']", "unknown ['id']")
def run_named_with_a_misspelled_name():
    _lowered_ids().run_named({"x": np.zeros((1, 1, 4), F32), "id": np.zeros((1, 1), I64)})  # <-


@misuse(qtrace.DTypeError, "input x expects f32[batch,seq,4]", "got <U1[1,1,4]")
def run_with_strings():
    _lowered_ids().run(np.array([[["a", "b", "c", "d"]]]), np.zeros((1, 1), I64))  # <-


@misuse(qtrace.FileError, "saving the model to", "model.onnx failed", located=True)
def save_under_a_file():
    import tempfile

    directory = tempfile.mkdtemp()
    blocker = os.path.join(directory, "not_a_dir")
    open(blocker, "w").close()
    qtrace.lower(lambda x: x + 1, (S((3,)),)).save(os.path.join(blocker, "model.onnx"))  # <-


@misuse(qtrace.FileError, "saving the model to", "Is a directory")
def save_onto_a_directory():
    import tempfile

    directory = tempfile.mkdtemp()
    os.mkdir(os.path.join(directory, "model.onnx"))
    qtrace.lower(lambda x: x + 1, (S((3,)),)).save(os.path.join(directory, "model.onnx"))  # <-


@misuse(qtrace.FileError, "dump", "not_a_dir")
def dump_dir_is_a_file():
    import tempfile

    directory = tempfile.mkdtemp()
    blocker = os.path.join(directory, "not_a_dir")
    open(blocker, "w").close()
    qtrace.lower(lambda x: x + 1, (S((3,)),), dump_dir=blocker)  # <-


# -- more API misuse --------------------------------------------------------------------------------------
misuse = catalogue(CASES, "api")


@misuse(qtrace.TraceError, "the function to trace is str 'model'", "not a callable")
def trace_a_string():
    qtrace.trace("model", (S((3,)),))  # <-


@misuse(qtrace.TraceError, "@qtrace.function needs a function", "int 3")
def function_of_a_number():
    qtrace.function(3)  # <-


@misuse(qtrace.ShapeError, "a shape must be a tuple of ints and symbolic names", "None")
def shape_dtype_without_a_shape():
    S(None)  # <-


@misuse(qtrace.UsageError, "save needs a file path", "NoneType None")
def save_without_a_path():
    qtrace.lower(lambda x: x + 1, (S((3,)),)).save(None)  # <-


@misuse(qtrace.LoweringError, "full", "symbolic dim z is used but no input", "carries it")
def symbolic_dim_no_input_carries():
    qtrace.lower(lambda x: qp.zeros(("z", 3), F32) + x, (S((3,)),))  # <-


@misuse(qtrace.UsageError, "argument scale is 3.0, but the model was traced with 2.0")
def run_with_another_static_argument():
    lowered = qtrace.lower(lambda x, scale: x * scale, (S((3,)), 2.0))
    lowered.run(np.ones(3, F32), 3.0)  # <-


@misuse(qtrace.ShapeError, "take", "index 5 is out of bounds for axis 0 of f32[3]")
def constant_index_past_the_dim():
    qtrace.trace(lambda x: x[np.array([0, 5])], (S((3,)),))  # <-


@misuse(qtrace.ShapeError, "gather", "index -3 is out of bounds for axis 1 of f32[2,2]")
def constant_gather_index_past_the_dim():
    qtrace.trace(lambda x: qp.gather(x, [np.array([0]), np.array([-3])]), (S((2, 2)),))  # <-


@misuse(qtrace.RunError, "onnxruntime could not run the model", "Gather")
def traced_index_past_the_dim_at_run_time():
    lowered = qtrace.lower(lambda x, i: qp.take(x, i), (S((3,)), S((2,), "int64")))
    lowered.run(np.ones(3, F32), np.array([0, 7]))  # <-


def _assign_after_view(x):
    head = x[:2]
    x[0] = 0.0  # <-
    return head + 1


@misuse(qtrace.TraceError, "index_put", "changes, in numpy, a view of it taken at", "read afterwards",
        ".copy()", at=_assign_after_view)
def assignment_seen_through_an_earlier_view():
    qtrace.trace(_assign_after_view, (S((3,)),))


def _assign_into_view(x):
    rows = x.reshape(2, 2)
    rows[0] = 1.0  # <-
    return x


@misuse(qtrace.TraceError, "index_put", "the array it is a view of", "returned as an output", at=_assign_into_view)
def assignment_into_a_reshaped_view():
    qtrace.trace(_assign_into_view, (S((4,)),))


@pytest.mark.parametrize("case", [c for c in CASES], ids=ids)
def test_misuse(case: Case) -> None:
    check_case(case)
