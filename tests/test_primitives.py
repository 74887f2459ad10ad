"""Every primitive, three ways (the acceptance of the core issue):

1. its numpy reference (the primitive's user-facing function called on numpy arrays) matches an
   independent formula written here, element by element in Python, on random inputs;
2. tracing the same call gives values whose shape and dtype are those of the eager result, and the
   graph evaluates to the eager result bit for bit; with symbolic dims the shape is the eager one
   once the symbols are given their sizes;
3. bad shapes and dtypes raise the qtrace error pointing at the user's file and line, both when
   tracing and eagerly.

Each primitive is one `Case` row: how to call it, how to draw inputs, its formula, and bad inputs.
The ctx_* primitives have their own file (test_kv_cache.py) with the same three checks.

Tolerances: +, -, *, / and comparisons are exact (float64 then one rounding is exactly what IEEE
float32/float16 arithmetic gives); sums and products use integer-valued floats so they are exact
too; transcendental functions get a few units in the last place.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype
from qtrace.dims import substitute

from conftest import examples

FLOATS = [np.dtype(np.float32), np.dtype(np.float16)]
INTS = [np.dtype(np.int32), np.dtype(np.int64)]
NUMERIC = FLOATS + INTS
BOOL = np.dtype(bool)

# -- drawing inputs -----------------------------------------------------------------------------------


def elements(dtype, lo=-4.0, hi=4.0, *, integral=False, away_from_zero=0.0):
    """Values for arrays of `dtype`: bools, small ints, or finite normal floats in [lo, hi]."""
    dtype = np.dtype(dtype)
    if dtype == BOOL:
        return st.booleans()
    if dtype.kind in "iu" or integral:
        values = st.integers(int(lo), int(hi))
        return values if dtype.kind in "iu" else values.map(float)
    if away_from_zero:
        magnitude = st.floats(away_from_zero, hi, width=dtype.itemsize * 8)
        return st.tuples(magnitude, st.sampled_from([-1.0, 1.0])).map(lambda ms: ms[0] * ms[1])
    return st.floats(lo, hi, width=dtype.itemsize * 8, allow_nan=False, allow_infinity=False,
                     allow_subnormal=False)


def arrays(dtype, shape, **kwargs):
    return hnp.arrays(np.dtype(dtype), tuple(shape), elements=elements(dtype, **kwargs))


SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)
NONSCALAR_SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)


def unary_inputs(dtypes, **kwargs):
    @st.composite
    def draw_inputs(draw):
        dtype = draw(st.sampled_from(dtypes))
        return (draw(arrays(dtype, draw(SHAPES), **kwargs)),), {}

    return draw_inputs()


def binary_inputs(dtypes, lo=-4, hi=4, rhs=None, **kwargs):
    """Two arrays of one dtype whose shapes broadcast (rhs: other bounds for the second operand)."""
    @st.composite
    def draw_inputs(draw):
        dtype = draw(st.sampled_from(dtypes))
        shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3)).input_shapes
        lhs_bounds = dict(lo=lo, hi=hi, **kwargs)
        rhs_bounds = dict(lhs_bounds, **(rhs or {}))
        return (draw(arrays(dtype, shapes[0], **lhs_bounds)), draw(arrays(dtype, shapes[1], **rhs_bounds))), {}

    return draw_inputs()


# -- formulas -----------------------------------------------------------------------------------------


def elementwise(fn, *operands, dtype):
    """out[i] = fn(operand_0[i], operand_1[i], ...) over the broadcast shape, as Python scalars."""
    operands = np.broadcast_arrays(*operands)
    out = np.empty(operands[0].shape, dtype)
    for index in np.ndindex(out.shape):
        out[index] = fn(*(x[index].item() for x in operands))
    return out


def unary_formula(fn):
    return lambda x: elementwise(fn, x, dtype=x.dtype)


def binary_formula(fn, result=None):
    return lambda x, y: elementwise(fn, x, y, dtype=x.dtype if result is None else result)


def compare_formula(fn):
    return lambda x, y: elementwise(fn, x, y, dtype=BOOL)


def along_axis(x, axis, fn, dtype):
    """Apply fn to every 1-D line of x along `axis` (a list of Python scalars -> list)."""
    out = np.empty(x.shape, dtype)
    others = [d for i, d in enumerate(x.shape) if i != axis]
    for rest in np.ndindex(*others):
        index = list(rest)
        index.insert(axis, slice(None))
        index = tuple(index)
        out[index] = fn([v.item() for v in x[index]])
    return out


def reduction_formula(fn, result_dtype):
    def formula(x, *, axis, keepdims):
        axes = range(x.ndim) if axis is None else [a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)]
        axes = set(axes)
        groups: dict[tuple, list] = {}
        for index in np.ndindex(x.shape):
            key = tuple(0 if i in axes else k for i, k in enumerate(index) if keepdims or i not in axes)
            groups.setdefault(key, []).append(x[index].item())
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keepdims or i not in axes)
        out = np.empty(shape, result_dtype(x.dtype))
        for key, values in groups.items():
            out[key] = fn(values)
        return out

    return formula


def first_argmax(values):
    best = max(values)
    return values.index(best)


def softmax_line(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def matmul_formula(a, b):
    a2 = a.reshape((1,) + a.shape) if a.ndim == 1 else a
    b2 = b.reshape(b.shape + (1,)) if b.ndim == 1 else b
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    a3 = np.broadcast_to(a2, batch + a2.shape[-2:])
    b3 = np.broadcast_to(b2, batch + b2.shape[-2:])
    n, k, m = a2.shape[-2], a2.shape[-1], b2.shape[-1]
    out = np.empty(batch + (n, m), a.dtype)
    for index in np.ndindex(*batch):
        for i, j in itertools.product(range(n), range(m)):
            out[index + (i, j)] = sum(a3[index + (i, t)].item() * b3[index + (t, j)].item() for t in range(k))
    if a.ndim == 1:
        out = out[..., 0, :]
    if b.ndim == 1:
        out = out[..., 0]
    return out


def erf(v):
    return 1.0 - math.erfc(v)


def gelu_formula(x, *, approximate):
    if approximate == "tanh":
        def fn(v):
            return 0.5 * v * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    else:
        def fn(v):
            return v * 0.5 * (1.0 + erf(v / math.sqrt(2.0)))
    return elementwise(fn, x, dtype=x.dtype)


def rms_norm_formula(x, weight, *, eps):
    w = [v.item() for v in weight]

    def line(values):
        mean_square = sum(v * v for v in values) / len(values)
        return [w[i] * values[i] / math.sqrt(mean_square + eps) for i in range(len(values))]

    return along_axis(x, x.ndim - 1, line, x.dtype)


def layer_norm_formula(x, weight, bias=None, *, eps):
    w = [v.item() for v in weight]
    b = [0.0] * len(w) if bias is None else [v.item() for v in bias]

    def line(values):
        mean = sum(values) / len(values)
        variance = sum((v - mean) ** 2 for v in values) / len(values)
        return [(values[i] - mean) / math.sqrt(variance + eps) * w[i] + b[i] for i in range(len(values))]

    return along_axis(x, x.ndim - 1, line, x.dtype)


def cast_value(v, dtype):
    dtype = np.dtype(dtype)
    if dtype == BOOL:
        return v != 0
    if dtype.kind in "iu":
        return int(v)  # truncation toward zero
    return float(v)


def resolve_minus_one(size, shape):
    known = math.prod(d for d in shape if d != -1)
    return tuple(size // known if d == -1 else d for d in shape)


def reshape_formula(x, *, shape):
    flat = [x[index].item() for index in np.ndindex(x.shape)]  # row-major order
    target = resolve_minus_one(x.size, shape)
    out = np.empty(target, x.dtype)
    for position, index in enumerate(np.ndindex(target)):
        out[index] = flat[position]
    return out


def transpose_formula(x, *, perm):
    out = np.empty(tuple(x.shape[p] for p in perm), x.dtype)
    for index in np.ndindex(out.shape):
        source = [0] * x.ndim
        for j, p in enumerate(perm):
            source[p] = index[j]
        out[index] = x[tuple(source)]
    return out


def broadcast_to_formula(x, *, shape):
    offset = len(shape) - x.ndim
    out = np.empty(shape, x.dtype)
    for index in np.ndindex(*shape):
        out[index] = x[tuple(0 if x.shape[d] == 1 else index[offset + d] for d in range(x.ndim))]
    return out


def squeeze_formula(x, *, axis):
    axes = {a % x.ndim for a in axis}
    out = np.empty(tuple(d for i, d in enumerate(x.shape) if i not in axes), x.dtype)
    for index in np.ndindex(out.shape):
        rest = iter(index)
        out[index] = x[tuple(0 if i in axes else next(rest) for i in range(x.ndim))]
    return out


def expand_dims_formula(x, *, axis):
    ndim = x.ndim + len(axis)
    axes = {a % ndim for a in axis}
    dims = iter(x.shape)
    out = np.empty(tuple(1 if i in axes else next(dims) for i in range(ndim)), x.dtype)
    for index in np.ndindex(out.shape):
        out[index] = x[tuple(k for i, k in enumerate(index) if i not in axes)]
    return out


def concatenate_formula(*xs, axis):
    axis %= xs[0].ndim
    sizes = [x.shape[axis] for x in xs]
    shape = xs[0].shape[:axis] + (sum(sizes),) + xs[0].shape[axis + 1:]
    out = np.empty(shape, xs[0].dtype)
    for index in np.ndindex(shape):
        position, which = index[axis], 0
        while position >= sizes[which]:
            position, which = position - sizes[which], which + 1
        out[index] = xs[which][index[:axis] + (position,) + index[axis + 1:]]
    return out


def split_formula(x, *, sections, axis):
    axis %= x.ndim
    size = x.shape[axis]
    if isinstance(sections, int):
        cuts = [size // sections * i for i in range(sections + 1)]
    else:
        cuts = [0, *sections, size]
    pieces = []
    for lo, hi in zip(cuts, cuts[1:]):
        piece = np.empty(x.shape[:axis] + (max(hi - lo, 0),) + x.shape[axis + 1:], x.dtype)
        for index in np.ndindex(piece.shape):
            piece[index] = x[index[:axis] + (lo + index[axis],) + index[axis + 1:]]
        pieces.append(piece)
    return pieces


def slice_formula(x, *, slices):
    picks = [list(range(*slice(*s).indices(n))) for s, n in zip(slices, x.shape)]
    out = np.empty(tuple(len(p) for p in picks), x.dtype)
    for index in np.ndindex(out.shape):
        out[index] = x[tuple(p[k] for p, k in zip(picks, index))]
    return out


def take_formula(x, indices, *, axis):
    axis %= x.ndim
    out = np.empty(x.shape[:axis] + indices.shape + x.shape[axis + 1:], x.dtype)
    for index in np.ndindex(out.shape):
        picked = int(indices[index[axis:axis + indices.ndim]]) % x.shape[axis]
        out[index] = x[index[:axis] + (picked,) + index[axis + indices.ndim:]]
    return out


def gather_formula(x, *indices, axis):
    indices = np.broadcast_arrays(*indices)
    width = indices[0].ndim
    out = np.empty(x.shape[:axis] + indices[0].shape + x.shape[axis + len(indices):], x.dtype)
    for index in np.ndindex(out.shape):
        batch = index[axis:axis + width]
        picked = tuple(int(i[batch]) % x.shape[axis + k] for k, i in enumerate(indices))
        out[index] = x[index[:axis] + picked + index[axis + width:]]
    return out


def index_put_formula(data, updates, idx, *, lead):
    """data[(:,) * lead + (idx,)] = updates, with idx 1-D and free of repeats."""
    region_shape = data.shape[:lead] + idx.shape + data.shape[lead + 1:]
    region = np.broadcast_to(updates, region_shape)
    out = data.copy()
    for index in np.ndindex(region_shape):
        target = index[:lead] + (int(idx[index[lead]]) % data.shape[lead],) + index[lead + 1:]
        out[target] = region[index]
    return out


# -- the cases ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """Arguments (ShapeDtype specs and static params) that must raise `error`."""

    error: type
    specs: tuple
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    name: str  # the primitive the call records
    call: Callable[..., Any]  # one-line lambda: arrays positional, static params as keywords
    inputs: st.SearchStrategy  # -> (arrays, params)
    formula: Callable[..., Any]
    bad: tuple[Bad, ...]
    ulps: float = 0  # 0: exact
    symbolic: bool = True  # the call accepts symbolic dims in its inputs

    def __str__(self) -> str:
        return self.name


def f32(*shape):
    return ShapeDtype(shape, "float32")


def i32(*shape):
    return ShapeDtype(shape, "int32")


def boolean(*shape):
    return ShapeDtype(shape, "bool")


NOT_FLOAT = Bad(qtrace.DTypeError, (i32(2, 3),))
NOT_BOOL = Bad(qtrace.DTypeError, (f32(2, 3),))
NOT_BROADCASTING = Bad(qtrace.ShapeError, (f32(2, 3), f32(3, 2)))
BOOL_OPERANDS = Bad(qtrace.DTypeError, (boolean(2), boolean(2)))

NOT_INTEGER = Bad(qtrace.DTypeError, (f32(2), f32(2)))


def integer_division_inputs():
    """Integer operands that broadcast, divisors of both signs and never 0 (Python's // and % are the formula)."""
    @st.composite
    def draw_inputs(draw):
        dtype = draw(st.sampled_from(INTS))
        shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3)).input_shapes
        divisor = draw(arrays(dtype, shapes[1], lo=1, hi=5)) * draw(hnp.arrays(dtype, shapes[1],
                                                                              elements=st.sampled_from([-1, 1])))
        return (draw(arrays(dtype, shapes[0], lo=-12, hi=12)), divisor.astype(dtype)), {}

    return draw_inputs()


CASES: list[Case] = []


def unary_float_case(name, call, fn, ulps=4, **bounds):
    CASES.append(Case(name, call, unary_inputs(FLOATS, **bounds), unary_formula(fn), (NOT_FLOAT,), ulps=ulps))


unary_float_case("exp", lambda x: qp.exp(x), math.exp)
unary_float_case("log", lambda x: qp.log(x), math.log, lo=0.125, hi=8.0)
unary_float_case("sqrt", lambda x: qp.sqrt(x), math.sqrt, lo=0.0, hi=8.0, ulps=0)
unary_float_case("rsqrt", lambda x: qp.rsqrt(x), lambda v: 1.0 / math.sqrt(v), lo=0.125, hi=8.0)
unary_float_case("reciprocal", lambda x: qp.reciprocal(x), lambda v: 1.0 / v, away_from_zero=0.25, ulps=0)
unary_float_case("tanh", lambda x: qp.tanh(x), math.tanh)
unary_float_case("sigmoid", lambda x: qp.sigmoid(x), lambda v: 0.5 * (1.0 + math.tanh(0.5 * v)), ulps=8)
unary_float_case("erf", lambda x: qp.erf(x), erf)
unary_float_case("sin", lambda x: qp.sin(x), math.sin)
unary_float_case("cos", lambda x: qp.cos(x), math.cos)

CASES += [
    Case("neg", lambda x: qp.negative(x), unary_inputs(NUMERIC), unary_formula(lambda v: 0 - v),
         (Bad(qtrace.DTypeError, (boolean(2),)),)),
    Case("abs", lambda x: qp.abs(x), unary_inputs(NUMERIC), unary_formula(lambda v: v if v >= 0 else -v),
         (Bad(qtrace.DTypeError, (boolean(2),)),)),
    Case("logical_not", lambda x: qp.logical_not(x), unary_inputs([BOOL]), unary_formula(lambda v: not v),
         (NOT_BOOL,)),
    Case("add", lambda x, y: qp.add(x, y), binary_inputs(NUMERIC), binary_formula(lambda u, v: u + v),
         (NOT_BROADCASTING, BOOL_OPERANDS)),
    Case("sub", lambda x, y: qp.subtract(x, y), binary_inputs(NUMERIC), binary_formula(lambda u, v: u - v),
         (NOT_BROADCASTING, BOOL_OPERANDS)),
    Case("mul", lambda x, y: qp.multiply(x, y), binary_inputs(NUMERIC), binary_formula(lambda u, v: u * v),
         (NOT_BROADCASTING, BOOL_OPERANDS)),
    Case("div", lambda x, y: qp.divide(x, y), binary_inputs(FLOATS, away_from_zero=0.25),
         binary_formula(lambda u, v: u / v), (NOT_BROADCASTING,)),
    Case("pow", lambda x, y: qp.power(x, y), binary_inputs(FLOATS, lo=0.5, hi=2.0, rhs=dict(lo=-2.0)),
         binary_formula(math.pow), (NOT_BROADCASTING, BOOL_OPERANDS), ulps=4),
    Case("floor_divide", lambda x, y: qp.floor_divide(x, y), integer_division_inputs(),
         binary_formula(lambda u, v: u // v), (NOT_INTEGER, Bad(qtrace.ShapeError, (i32(2, 3), i32(3, 2))))),
    Case("remainder", lambda x, y: qp.remainder(x, y), integer_division_inputs(),
         binary_formula(lambda u, v: u % v), (NOT_INTEGER,)),
    Case("maximum", lambda x, y: qp.maximum(x, y), binary_inputs(NUMERIC, integral=True),
         binary_formula(lambda u, v: u if u >= v else v), (NOT_BROADCASTING, BOOL_OPERANDS)),
    Case("minimum", lambda x, y: qp.minimum(x, y), binary_inputs(NUMERIC, integral=True),
         binary_formula(lambda u, v: u if u <= v else v), (NOT_BROADCASTING, BOOL_OPERANDS)),
    Case("eq", lambda x, y: qp.equal(x, y), binary_inputs(NUMERIC + [BOOL], integral=True),
         compare_formula(lambda u, v: u == v), (NOT_BROADCASTING,)),
    Case("ne", lambda x, y: qp.not_equal(x, y), binary_inputs(NUMERIC + [BOOL], integral=True),
         compare_formula(lambda u, v: u != v), (NOT_BROADCASTING,)),
    Case("lt", lambda x, y: qp.less(x, y), binary_inputs(NUMERIC, integral=True),
         compare_formula(lambda u, v: u < v), (NOT_BROADCASTING, BOOL_OPERANDS)),
    Case("le", lambda x, y: qp.less_equal(x, y), binary_inputs(NUMERIC, integral=True),
         compare_formula(lambda u, v: u <= v), (NOT_BROADCASTING, BOOL_OPERANDS)),
    Case("gt", lambda x, y: qp.greater(x, y), binary_inputs(NUMERIC, integral=True),
         compare_formula(lambda u, v: u > v), (NOT_BROADCASTING, BOOL_OPERANDS)),
    Case("ge", lambda x, y: qp.greater_equal(x, y), binary_inputs(NUMERIC, integral=True),
         compare_formula(lambda u, v: u >= v), (NOT_BROADCASTING, BOOL_OPERANDS)),
    Case("logical_and", lambda x, y: qp.logical_and(x, y), binary_inputs([BOOL]),
         compare_formula(lambda u, v: u and v), (Bad(qtrace.DTypeError, (f32(2), f32(2))),)),
    Case("logical_or", lambda x, y: qp.logical_or(x, y), binary_inputs([BOOL]),
         compare_formula(lambda u, v: u or v), (Bad(qtrace.DTypeError, (f32(2), f32(2))),)),
    Case("logical_xor", lambda x, y: qp.logical_xor(x, y), binary_inputs([BOOL]),
         compare_formula(lambda u, v: u != v), (Bad(qtrace.DTypeError, (f32(2), f32(2))),)),
]


@st.composite
def where_inputs(draw):
    dtype = draw(st.sampled_from(NUMERIC))
    shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=3)).input_shapes
    return (draw(arrays(BOOL, shapes[0])), draw(arrays(dtype, shapes[1])), draw(arrays(dtype, shapes[2]))), {}


CASES.append(Case(
    "where", lambda c, x, y: qp.where(c, x, y), where_inputs(),
    lambda c, x, y: elementwise(lambda k, u, v: u if k else v, c, x, y, dtype=x.dtype),
    (Bad(qtrace.ShapeError, (boolean(2, 3), f32(2, 3), f32(3, 2))),)))


@st.composite
def cast_inputs(draw):
    source, target = draw(st.sampled_from(NUMERIC + [BOOL])), draw(st.sampled_from(NUMERIC + [BOOL]))
    return (draw(arrays(source, draw(SHAPES))),), {"dtype": target}


CASES.append(Case(
    "cast", lambda x, **p: qp.cast(x, p["dtype"]), cast_inputs(),
    lambda x, *, dtype: elementwise(lambda v: cast_value(v, dtype), x, dtype=dtype),
    (Bad(qtrace.DTypeError, (f32(2),), {"dtype": "complex64"}),)))


@st.composite
def arange_inputs(draw):
    start, stop = draw(st.integers(-6, 6)), draw(st.integers(-6, 6))
    return (), {"start": start, "stop": stop, "step": draw(st.sampled_from([-3, -1, 1, 2]))}


@st.composite
def full_inputs(draw):
    dtype = draw(st.sampled_from(NUMERIC + [BOOL]))
    fill = draw(elements(dtype, integral=dtype.kind == "f"))
    return (), {"shape": draw(SHAPES), "fill_value": fill, "dtype": dtype}


def full_formula(*, shape, fill_value, dtype):
    out = np.empty(shape, dtype)
    for index in np.ndindex(*shape):
        out[index] = fill_value
    return out


CASES += [
    Case("arange", lambda **p: qp.arange(p["start"], p["stop"], p["step"]), arange_inputs(),
         lambda *, start, stop, step: np.array(list(range(start, stop, step)), dtype=np.int64),
         (Bad(qtrace.ShapeError, (), {"start": 0, "stop": 4, "step": 0}),), symbolic=False),
    Case("full", lambda **p: qp.full(p["shape"], p["fill_value"], p["dtype"]), full_inputs(), full_formula,
         (Bad(qtrace.ShapeError, (), {"shape": (2, -3), "fill_value": 1, "dtype": "float32"}),
          Bad(qtrace.DTypeError, (), {"shape": (2,), "fill_value": 1, "dtype": "complex64"})), symbolic=False),
]


# reductions
def reduction_inputs(dtypes, integral=True):
    @st.composite
    def draw_inputs(draw):
        dtype = draw(st.sampled_from(dtypes))
        x = draw(arrays(dtype, draw(NONSCALAR_SHAPES), integral=integral))
        axes = draw(st.one_of(st.none(), st.integers(-x.ndim, x.ndim - 1),
                              st.lists(st.integers(0, x.ndim - 1), unique=True, max_size=x.ndim).map(tuple)))
        return (x,), {"axis": axes, "keepdims": draw(st.booleans())}

    return draw_inputs()


def sum_dtype(dtype):
    return np.dtype(np.int64) if dtype.kind in "iub" else dtype


def mean_dtype(dtype):
    return dtype if dtype.kind == "f" else np.dtype(np.float64)


AXIS_OUT_OF_RANGE = Bad(qtrace.ShapeError, (f32(2, 3),), {"axis": 2, "keepdims": False})


@st.composite
def argmax_inputs(draw):
    dtype = draw(st.sampled_from(NUMERIC))
    x = draw(arrays(dtype, draw(NONSCALAR_SHAPES), integral=True))  # ties: the first maximum wins
    return (x,), {"axis": draw(st.integers(-x.ndim, x.ndim - 1)), "keepdims": draw(st.booleans())}


CASES += [
    Case("reduce_sum", lambda x, **p: qp.sum(x, axis=p["axis"], keepdims=p["keepdims"]),
         reduction_inputs(NUMERIC + [BOOL]), reduction_formula(sum, sum_dtype), (AXIS_OUT_OF_RANGE,)),
    Case("reduce_mean", lambda x, **p: qp.mean(x, axis=p["axis"], keepdims=p["keepdims"]),
         reduction_inputs(NUMERIC), reduction_formula(lambda v: sum(v) / len(v), mean_dtype), (AXIS_OUT_OF_RANGE,)),
    Case("reduce_max", lambda x, **p: qp.max(x, axis=p["axis"], keepdims=p["keepdims"]),
         reduction_inputs(NUMERIC, integral=False), reduction_formula(max, lambda d: d), (AXIS_OUT_OF_RANGE,)),
    Case("reduce_min", lambda x, **p: qp.min(x, axis=p["axis"], keepdims=p["keepdims"]),
         reduction_inputs(NUMERIC, integral=False), reduction_formula(min, lambda d: d), (AXIS_OUT_OF_RANGE,)),
    Case("argmax", lambda x, **p: qp.argmax(x, axis=p["axis"], keepdims=p["keepdims"]), argmax_inputs(),
         lambda x, *, axis, keepdims: reduction_formula(first_argmax, lambda d: np.dtype(np.int64))(
             x, axis=axis, keepdims=keepdims),
         (AXIS_OUT_OF_RANGE, Bad(qtrace.DTypeError, (boolean(2, 3),), {"axis": 0, "keepdims": False}))),
]


@st.composite
def top_k_inputs(draw):
    dtype = draw(st.sampled_from(NUMERIC))
    x = draw(arrays(dtype, draw(NONSCALAR_SHAPES), integral=True))  # small ints: many ties
    axis = draw(st.integers(-x.ndim, x.ndim - 1))
    return (x,), {"k": draw(st.integers(1, x.shape[axis])), "axis": axis}


def top_k_formula(x, *, k, axis):
    """Per line: positions sorted by (value descending, position ascending), the first k."""
    def first_k(values):
        return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]

    axis %= x.ndim
    shape = x.shape[:axis] + (k,) + x.shape[axis + 1:]
    values, indices = np.empty(shape, x.dtype), np.empty(shape, np.int64)
    for rest in np.ndindex(*(d for i, d in enumerate(x.shape) if i != axis)):
        line = [x[rest[:axis] + (j,) + rest[axis:]].item() for j in range(x.shape[axis])]
        for position, index in enumerate(first_k(line)):
            values[rest[:axis] + (position,) + rest[axis:]] = line[index]
            indices[rest[:axis] + (position,) + rest[axis:]] = index
    return values, indices


CASES.append(Case("top_k", lambda x, **p: qp.top_k(x, p["k"], axis=p["axis"]), top_k_inputs(), top_k_formula,
                  (Bad(qtrace.ShapeError, (f32(2, 3),), {"k": 4, "axis": 1}),
                   Bad(qtrace.ShapeError, (f32(2, 3),), {"k": 0, "axis": 1}),
                   Bad(qtrace.ShapeError, (f32(2, 3),), {"k": 1, "axis": 2}),
                   Bad(qtrace.DTypeError, (boolean(2, 3),), {"k": 1, "axis": 1})),
                  symbolic=False))  # k entries of a symbolic axis: see the test below


@st.composite
def matmul_inputs(draw):
    dtype = draw(st.sampled_from(NUMERIC))
    batch = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3)).input_shapes
    n, k, m = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    a_shape = (k,) if draw(st.booleans()) else batch[0] + (n, k)
    b_shape = (k,) if draw(st.booleans()) else batch[1] + (k, m)
    return (draw(arrays(dtype, a_shape, integral=True)), draw(arrays(dtype, b_shape, integral=True))), {}


CASES.append(Case("matmul", lambda a, b: qp.matmul(a, b), matmul_inputs(), matmul_formula,
                  (Bad(qtrace.ShapeError, (f32(2, 3), f32(2, 3))), Bad(qtrace.ShapeError, (f32(), f32(2))),
                   Bad(qtrace.DTypeError, (boolean(2, 2), boolean(2, 2))))))


# neural-network ops
@st.composite
def softmax_inputs(draw):
    dtype = draw(st.sampled_from(FLOATS))
    x = draw(arrays(dtype, draw(NONSCALAR_SHAPES)))
    return (x,), {"axis": draw(st.integers(-x.ndim, x.ndim - 1))}


@st.composite
def gelu_inputs(draw):
    dtype = draw(st.sampled_from(FLOATS))
    return (draw(arrays(dtype, draw(SHAPES))),), {"approximate": draw(st.sampled_from(["none", "tanh"]))}


@st.composite
def rms_norm_inputs(draw):
    dtype = draw(st.sampled_from(FLOATS))
    shape = draw(NONSCALAR_SHAPES)
    x = draw(arrays(dtype, shape, away_from_zero=0.25))
    weight = draw(arrays(dtype, shape[-1:], lo=-2.0, hi=2.0))
    return (x, weight), {"eps": draw(st.sampled_from([1e-6, 1e-5, 0.5]))}


@st.composite
def layer_norm_inputs(draw):
    dtype = draw(st.sampled_from(FLOATS))
    shape = draw(NONSCALAR_SHAPES)
    x = draw(arrays(dtype, shape))
    weight = draw(arrays(dtype, shape[-1:], lo=-2.0, hi=2.0))
    bias = (draw(arrays(dtype, shape[-1:], lo=-2.0, hi=2.0)),) if draw(st.booleans()) else ()
    return (x, weight, *bias), {"eps": draw(st.sampled_from([1e-6, 1e-5, 0.5]))}


CASES += [
    Case("softmax", lambda x, **p: qp.softmax(x, axis=p["axis"]), softmax_inputs(),
         lambda x, *, axis: along_axis(x, axis % x.ndim, softmax_line, x.dtype),
         (Bad(qtrace.DTypeError, (i32(2, 3),), {"axis": -1}), Bad(qtrace.ShapeError, (f32(2, 3),), {"axis": 2})),
         ulps=12),
    Case("silu", lambda x: qp.silu(x), unary_inputs(FLOATS), unary_formula(lambda v: v / (1.0 + math.exp(-v))),
         (NOT_FLOAT,), ulps=8),
    Case("gelu", lambda x, **p: qp.gelu(x, approximate=p["approximate"]), gelu_inputs(), gelu_formula,
         (Bad(qtrace.DTypeError, (i32(2),), {"approximate": "none"}),
          Bad(qtrace.ShapeError, (f32(2),), {"approximate": "fast"})), ulps=2),
    Case("rms_norm", lambda x, w, **p: qp.rms_norm(x, w, eps=p["eps"]), rms_norm_inputs(), rms_norm_formula,
         (Bad(qtrace.ShapeError, (f32(2, 4), f32(3)), {"eps": 1e-6}),
          Bad(qtrace.DTypeError, (i32(2, 4), i32(4)), {"eps": 1e-6})), ulps=8),
    Case("layer_norm", lambda x, w, *b, **p: qp.layer_norm(x, w, *b, eps=p["eps"]), layer_norm_inputs(),
         layer_norm_formula,
         (Bad(qtrace.ShapeError, (f32(2, 4), f32(3)), {"eps": 1e-5}),
          Bad(qtrace.ShapeError, (f32(2, 4), f32(4), f32(4, 1)), {"eps": 1e-5}),
          Bad(qtrace.ShapeError, (f32(), f32(1)), {"eps": 1e-5}),
          Bad(qtrace.DTypeError, (i32(2, 4), i32(4)), {"eps": 1e-5}),
          Bad(qtrace.ShapeError, (f32(2, 4), f32(4)), {"eps": -1.0})), ulps=4),
]


# shape ops
@st.composite
def reshape_inputs(draw):
    dtype = draw(st.sampled_from(NUMERIC))
    x = draw(arrays(dtype, draw(SHAPES)))
    factors = list(draw(st.permutations(x.shape))) + [1] * draw(st.integers(0, 1))
    target = draw(st.permutations(factors))
    if target and draw(st.booleans()):
        target[draw(st.integers(0, len(target) - 1))] = -1
    return (x,), {"shape": tuple(target)}


@st.composite
def transpose_inputs(draw):
    x = draw(arrays(draw(st.sampled_from(NUMERIC)), draw(SHAPES)))
    return (x,), {"perm": tuple(draw(st.permutations(range(x.ndim))))}


@st.composite
def broadcast_to_inputs(draw):
    target = draw(SHAPES)
    kept = draw(st.integers(0, len(target)))
    source = tuple(1 if draw(st.booleans()) else d for d in target[len(target) - kept:])
    return (draw(arrays(draw(st.sampled_from(NUMERIC)), source)),), {"shape": target}


@st.composite
def squeeze_inputs(draw):
    shape = draw(SHAPES)
    shape = tuple(1 if draw(st.booleans()) else d for d in shape) + (1,)
    ones = [i for i, d in enumerate(shape) if d == 1]
    axes = draw(st.lists(st.sampled_from(ones), unique=True, min_size=1))
    return (draw(arrays(draw(st.sampled_from(NUMERIC)), shape)),), {"axis": tuple(axes)}


@st.composite
def expand_dims_inputs(draw):
    x = draw(arrays(draw(st.sampled_from(NUMERIC)), draw(SHAPES)))
    count = draw(st.integers(1, 2))
    ndim = x.ndim + count
    axes = draw(st.lists(st.integers(-ndim, ndim - 1), min_size=count, max_size=count,
                         unique_by=lambda a: a % ndim))
    return (x,), {"axis": tuple(axes)}


@st.composite
def concatenate_inputs(draw):
    dtype = draw(st.sampled_from(NUMERIC))
    shape = list(draw(NONSCALAR_SHAPES))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    xs = []
    for _ in range(draw(st.integers(1, 3))):
        shape[axis] = draw(st.integers(1, 3))
        xs.append(draw(arrays(dtype, shape)))
    return tuple(xs), {"axis": axis}


@st.composite
def split_inputs(draw):
    shape = list(draw(NONSCALAR_SHAPES))
    axis = draw(st.integers(0, len(shape) - 1))
    if draw(st.booleans()):
        sections = draw(st.integers(1, 3))
        shape[axis] = sections * draw(st.integers(1, 2))
    else:
        shape[axis] = draw(st.integers(1, 5))
        sections = sorted(draw(st.lists(st.integers(0, shape[axis]), min_size=1, max_size=3)))
    x = draw(arrays(draw(st.sampled_from(NUMERIC)), shape))
    return (x,), {"sections": sections if isinstance(sections, int) else tuple(sections), "axis": axis}


@st.composite
def slice_inputs(draw):
    x = draw(arrays(draw(st.sampled_from(NUMERIC)), draw(NONSCALAR_SHAPES)))
    bound = st.one_of(st.none(), st.integers(-5, 5))
    slices = tuple((draw(bound), draw(bound), draw(st.sampled_from([-2, -1, 1, 2, 3]))) for _ in x.shape)
    assume(any(s != (None, None, 1) for s in slices))  # qp.slice returns an identity slice without recording it
    return (x,), {"slices": slices}


@st.composite
def take_inputs(draw):
    x = draw(arrays(draw(st.sampled_from(NUMERIC)), draw(NONSCALAR_SHAPES)))
    axis = draw(st.integers(-x.ndim, x.ndim - 1))
    size = x.shape[axis]
    indices = draw(hnp.arrays(draw(st.sampled_from(INTS)), draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)),
                              elements=st.integers(-size, size - 1)))
    return (x, indices), {"axis": axis}


@st.composite
def gather_inputs(draw):
    x = draw(arrays(draw(st.sampled_from(NUMERIC)), draw(hnp.array_shapes(min_dims=2, max_dims=3, max_side=3))))
    count = draw(st.integers(1, 2))
    axis = draw(st.integers(0, x.ndim - count))
    shapes = draw(hnp.mutually_broadcastable_shapes(num_shapes=count, max_dims=2, max_side=3)).input_shapes
    indices = [draw(hnp.arrays(draw(st.sampled_from(INTS)), shape,
                               elements=st.integers(-x.shape[axis + k], x.shape[axis + k] - 1)))
               for k, shape in enumerate(shapes)]
    return (x, *indices), {"axis": axis}


@st.composite
def index_put_inputs(draw):
    dtype = draw(st.sampled_from(NUMERIC))
    data = draw(arrays(dtype, draw(hnp.array_shapes(min_dims=1, max_dims=3, max_side=4))))
    lead = draw(st.integers(0, data.ndim - 1))
    size = data.shape[lead]
    picked = draw(st.lists(st.integers(-size, size - 1), min_size=1, max_size=size, unique_by=lambda i: i % size))
    idx = np.array(picked, dtype=draw(st.sampled_from(INTS)))
    region = data.shape[:lead] + idx.shape + data.shape[lead + 1:]
    updates_shape = region[draw(st.integers(0, len(region))):]
    return (data, draw(arrays(dtype, updates_shape)), idx), {"lead": lead}


CASES += [
    Case("reshape", lambda x, **p: qp.reshape(x, p["shape"]), reshape_inputs(), reshape_formula,
         (Bad(qtrace.ShapeError, (f32(2, 3),), {"shape": (4, 2)}),
          Bad(qtrace.ShapeError, (f32(2, 3),), {"shape": (-1, -1)})), symbolic=False),
    Case("transpose", lambda x, **p: qp.transpose(x, p["perm"]), transpose_inputs(), transpose_formula,
         (Bad(qtrace.ShapeError, (f32(2, 3),), {"perm": (0, 0)}),
          Bad(qtrace.ShapeError, (f32(2, 3),), {"perm": (0, 2)}))),
    Case("broadcast_to", lambda x, **p: qp.broadcast_to(x, p["shape"]), broadcast_to_inputs(), broadcast_to_formula,
         (Bad(qtrace.ShapeError, (f32(2, 3),), {"shape": (3, 3)}),
          Bad(qtrace.ShapeError, (f32(2, 3),), {"shape": (3,)})), symbolic=False),
    Case("squeeze", lambda x, **p: qp.squeeze(x, p["axis"]), squeeze_inputs(), squeeze_formula,
         (Bad(qtrace.ShapeError, (f32(2, 3),), {"axis": (0,)}), Bad(qtrace.ShapeError, (f32(1, 3),), {"axis": (2,)}))),
    Case("expand_dims", lambda x, **p: qp.expand_dims(x, p["axis"]), expand_dims_inputs(), expand_dims_formula,
         (Bad(qtrace.ShapeError, (f32(2, 3),), {"axis": (0, 0)}), Bad(qtrace.ShapeError, (f32(2),), {"axis": (3,)}))),
    Case("concatenate", lambda *xs, **p: qp.concatenate(xs, axis=p["axis"]), concatenate_inputs(),
         concatenate_formula,
         (Bad(qtrace.ShapeError, (f32(2, 3), f32(3, 3)), {"axis": 1}),
          Bad(qtrace.ShapeError, (f32(2, 3), f32(2, 3)), {"axis": 2}),
          Bad(qtrace.ShapeError, (f32(), f32()), {"axis": 0}))),
    Case("split", lambda x, **p: qp.split(x, p["sections"], axis=p["axis"]), split_inputs(), split_formula,
         (Bad(qtrace.ShapeError, (f32(2, 3),), {"sections": 2, "axis": 1}),
          Bad(qtrace.ShapeError, (f32(2, 3),), {"sections": (2, 1), "axis": 1})), symbolic=False),
    Case("slice", lambda x, **p: qp.slice(x, [slice(*s) for s in p["slices"]]), slice_inputs(), slice_formula,
         (Bad(qtrace.ShapeError, (f32(2, 3),), {"slices": ((None, None, 0), (None, None, 1))}),), symbolic=False),
    Case("take", lambda x, i, **p: qp.take(x, i, axis=p["axis"]), take_inputs(), take_formula,
         (Bad(qtrace.DTypeError, (f32(4, 3), f32(2)), {"axis": 0}),
          Bad(qtrace.ShapeError, (f32(4, 3), i32(2)), {"axis": 2}))),
    Case("gather", lambda x, *i, **p: qp.gather(x, i, axis=p["axis"]), gather_inputs(), gather_formula,
         (Bad(qtrace.DTypeError, (f32(4, 3), f32(2)), {"axis": 0}),
          Bad(qtrace.ShapeError, (f32(4, 3), i32(2), i32(2), i32(2)), {"axis": 0}),
          Bad(qtrace.ShapeError, (f32(4, 3), i32(2), i32(3)), {"axis": 0}))),
    Case("index_put", lambda d, u, i, **p: qp.index_put(d, (slice(None),) * p["lead"] + (i,), u),
         index_put_inputs(), index_put_formula,
         (Bad(qtrace.ShapeError, (f32(4, 3), f32(2, 2), i32(2)), {"lead": 0}),
          Bad(qtrace.DTypeError, (f32(4, 3), f32(2, 3), f32(2)), {"lead": 0}))),
]

# running sums (the on-device sampler's cumsum)
def running_sum(values):
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out


@st.composite
def cumsum_inputs(draw):
    x = draw(arrays(draw(st.sampled_from(NUMERIC)), draw(NONSCALAR_SHAPES), integral=True))  # exact sums
    return (x,), {"axis": draw(st.integers(-x.ndim, x.ndim - 1))}


CASES += [
    Case("cumsum", lambda x, **p: qp.cumsum(x, axis=p["axis"]), cumsum_inputs(),
         lambda x, *, axis: along_axis(x, axis % x.ndim, running_sum, x.dtype),
         (Bad(qtrace.ShapeError, (f32(2, 3),), {"axis": 2}), Bad(qtrace.ShapeError, (f32(),), {"axis": 0}),
          Bad(qtrace.DTypeError, (boolean(2, 3),), {"axis": 0}))),
]


COVERED_IN_TEST_KV_CACHE = {"ctx_scatter", "ctx_scatter_cb", "ctx_gather", "ctx_gather_cb"}

# -- checks -------------------------------------------------------------------------------------------


def as_list(result):
    return list(result) if isinstance(result, (list, tuple)) else [result]


def assert_matches(result, expected, ulps):
    """Same dtype and shape; values equal, or within `ulps` units of the dtype's epsilon."""
    for got, want in zip(as_list(result), as_list(expected), strict=True):
        got = np.asarray(got)
        assert got.dtype == want.dtype, f"dtype {got.dtype}, expected {want.dtype}"
        assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
        if ulps == 0 or want.dtype.kind != "f":
            np.testing.assert_array_equal(got, want)
        else:
            eps = float(np.finfo(want.dtype).eps)
            wide = want.astype(np.float64)
            scale = max(1.0, float(np.max(np.abs(wide)))) if wide.size else 1.0
            np.testing.assert_allclose(got.astype(np.float64), wide, rtol=ulps * eps, atol=ulps * eps * scale)


def specs_of(arrays):
    return tuple(ShapeDtype(a.shape, a.dtype) for a in arrays)


def symbolic_specs(arrays):
    """Each dim of size n > 1 becomes the symbol `n{n}` (equal sizes share a symbol); 1 stays 1."""
    return tuple(ShapeDtype(tuple(d if d == 1 else f"n{d}" for d in a.shape), a.dtype) for a in arrays)


def primitive_ops(graph):
    return {node.op for node in graph.nodes}


def test_every_primitive_has_a_case():
    covered = {case.name for case in CASES} | COVERED_IN_TEST_KV_CACHE
    assert covered == set(qp.PRIMITIVES)


@pytest.mark.parametrize("case", CASES, ids=str)
@settings(max_examples=examples(0.8))
@given(data=st.data())
def test_reference_matches_formula(case, data):
    arrays, params = data.draw(case.inputs, label="inputs")
    assert_matches(case.call(*arrays, **params), case.formula(*arrays, **params), case.ulps)


@pytest.mark.parametrize("case", CASES, ids=str)
@settings(max_examples=examples(0.4))
@given(data=st.data())
def test_traced_shape_and_dtype_equal_the_eager_result(case, data):
    arrays, params = data.draw(case.inputs, label="inputs")
    eager = as_list(case.call(*arrays, **params))
    graph = qtrace.trace(case.call, specs_of(arrays), params)
    assert [v.aval for v in graph.outputs] == [ShapeDtype(e.shape, e.dtype) for e in eager]


@pytest.mark.parametrize("case", CASES, ids=str)
@settings(max_examples=examples(0.4))
@given(data=st.data())
def test_traced_graph_records_the_primitive_and_evaluates_to_the_eager_result(case, data):
    arrays, params = data.draw(case.inputs, label="inputs")
    eager = as_list(case.call(*arrays, **params))
    graph = qtrace.trace(case.call, specs_of(arrays), params)
    if any(e.size for e in eager):  # an empty result may be built without the primitive
        assert case.name in primitive_ops(graph)
    for got, want in zip(as_list(graph.eval(*arrays, **params)), eager, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("case", [c for c in CASES if c.symbolic], ids=str)
@settings(max_examples=examples(0.4))
@given(data=st.data())
def test_symbolic_trace_has_the_eager_shape_at_the_concrete_sizes(case, data):
    arrays, params = data.draw(case.inputs, label="inputs")
    eager = as_list(case.call(*arrays, **params))
    graph = qtrace.trace(case.call, symbolic_specs(arrays), params)
    sizes = {f"n{d}": d for a in arrays for d in a.shape}
    for value, want in zip(graph.outputs, eager, strict=True):
        assert tuple(substitute(d, sizes) for d in value.shape) == want.shape
        assert value.dtype == want.dtype


BAD_CASES = [pytest.param(case, bad, id=f"{case.name}-{i}") for case in CASES for i, bad in enumerate(case.bad)]


def assert_at_call_line(error, case):
    location = error.location
    assert location is not None, f"no location in: {error}"
    assert os.path.abspath(location.file) == os.path.abspath(__file__)
    assert location.line == case.call.__code__.co_firstlineno


@pytest.mark.parametrize("case, bad", BAD_CASES)
def test_bad_input_raises_the_qtrace_error_at_the_users_line_when_tracing(case, bad):
    with pytest.raises(bad.error) as info:
        qtrace.trace(case.call, bad.specs, bad.params)
    assert_at_call_line(info.value, case)


@pytest.mark.parametrize("case, bad", BAD_CASES)
def test_bad_input_raises_the_qtrace_error_at_the_users_line_eagerly(case, bad):
    arrays = [np.zeros(spec.shape, spec.dtype) for spec in bad.specs]
    with pytest.raises(bad.error) as info:
        case.call(*arrays, **bad.params)
    assert_at_call_line(info.value, case)


def test_shape_error_message_names_the_op_the_shapes_and_the_line():
    def project(x, w):
        return x @ w  # contracting dims differ

    with pytest.raises(qtrace.ShapeError) as info:
        qtrace.trace(project, (ShapeDtype(("batch_size", "seq_len", 256)), ShapeDtype((512, 256))))
    text = str(info.value)
    assert text.startswith("matmul: ")
    assert "f32[batch_size,seq_len,256]" in text and "f32[512,256]" in text
    assert text.endswith(f":{info.value.location.line} in project")
    assert info.value.location.line == project.__code__.co_firstlineno + 1


# -- behaviours of particular primitives --------------------------------------------------------------


def test_sum_of_int32_is_int64_like_numpy():
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    assert qp.sum(x, axis=1).dtype == np.int64
    np.testing.assert_array_equal(qp.sum(x, axis=1), [3, 12])


def test_divide_of_ints_is_float64_like_numpy():
    result = qp.divide(np.array([1, 3], np.int32), np.array([2, 4], np.int32))
    assert result.dtype == np.float64
    np.testing.assert_array_equal(result, [0.5, 0.75])


def test_cast_of_negative_float_to_int_truncates_toward_zero():
    np.testing.assert_array_equal(qp.cast(np.array([-1.5, 1.5, -0.5], np.float32), "int32"), [-1, 1, 0])


def test_take_with_negative_index_counts_from_the_end():
    np.testing.assert_array_equal(qp.take(np.array([10, 20, 30]), np.array([-1, 0]), axis=0), [30, 10])


def test_softmax_of_large_logits_does_not_overflow():
    result = qp.softmax(np.array([1000.0, 1000.0], np.float32))
    np.testing.assert_array_equal(result, [0.5, 0.5])


def test_repeat_repeats_each_entry_in_place():
    result = qp.repeat(np.array([[1, 2], [3, 4]]), 2, axis=0)
    np.testing.assert_array_equal(result, [[1, 2], [1, 2], [3, 4], [3, 4]])


def test_stack_adds_a_new_axis():
    result = qp.stack([np.array([1, 2]), np.array([3, 4])], axis=1)
    np.testing.assert_array_equal(result, [[1, 3], [2, 4]])


def test_clip_limits_both_ends():
    np.testing.assert_array_equal(qp.clip(np.array([-3, 0, 3]), -1, 2), [-1, 0, 2])


def test_gelu_tanh_flag_true_means_the_tanh_form():
    x = np.array([0.5, -1.25], np.float64)
    expected = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) for v in x]
    np.testing.assert_allclose(qp.gelu(x, approximate=True), expected, rtol=1e-15)


def test_mean_over_an_empty_axis_raises_shape_error():
    with pytest.raises(qtrace.ShapeError):
        qtrace.trace(lambda x: qp.mean(x, axis=0), (ShapeDtype((0, 3)),))


def test_reduction_with_out_argument_is_unsupported():
    with pytest.raises(qtrace.UnsupportedError):
        qtrace.trace(lambda x: qp.sum(x, out=x), (ShapeDtype((2,)),))


def test_squeeze_accepts_a_numpy_integer_axis():
    assert qp.squeeze(np.zeros((1, 2)), np.int64(0)).shape == (2,)


# How a user spells var / std (numpy functions and methods, which trace to qtrace's), and the same call
# through qtrace.primitives, which runs qtrace's reference on numpy arrays.
VAR_STD_CALLS = {
    "np.var_keepdims": (lambda x: np.var(x, axis=-1, keepdims=True), lambda x: qp.var(x, axis=-1, keepdims=True)),
    "method_var": (lambda x: x.var(1), lambda x: qp.var(x, 1)),
    "np.std_ddof_1": (lambda x: np.std(x, axis=(0, 2), ddof=1), lambda x: qp.std(x, axis=(0, 2), ddof=1)),
    "method_std_all_axes": (lambda x: x.std(), qp.std),
    "var_of_ints": (lambda x: np.var(x.astype(np.int32), axis=0), lambda x: qp.var(x.astype(np.int32), axis=0)),
}


@pytest.mark.parametrize("name", sorted(VAR_STD_CALLS))
def test_var_and_std_traced_and_eager_equal_numpy(name):
    spelling, qtrace_call = VAR_STD_CALLS[name]
    x = np.random.default_rng(5).uniform(-3, 3, (3, 4, 5)).astype(np.float32)
    expected = spelling(x)  # numpy's own var / std: x is a numpy array
    traced = qtrace.trace(spelling, (ShapeDtype(x.shape, x.dtype),)).eval(x)
    for got in (qtrace_call(x), traced):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_var_is_written_with_mean_subtract_and_multiply():
    graph = qtrace.trace(lambda x: x.var(-1), (ShapeDtype(("B", 4)),))
    assert sorted(node.op for node in graph.nodes) == ["mul", "reduce_mean", "reduce_mean", "sub"]


def test_var_with_ddof_over_a_symbolic_dim_raises_at_the_users_line():
    def fn(x):
        return x.var(0, ddof=1)

    with pytest.raises(qtrace.UnsupportedError) as info:
        qtrace.trace(fn, (ShapeDtype(("B", 4)),))
    assert info.value.location.line == fn.__code__.co_firstlineno + 1
    assert "ddof" in str(info.value)


def test_top_k_on_symbolic_dims():
    """Other axes may be symbolic; k > 1 entries of a symbolic axis are refused (they exist only
    when the dim is large enough), k = 1 is always there."""
    graph = qtrace.trace(lambda x: qp.top_k(x, 2), (ShapeDtype(("tokens", 8)),))
    assert [str(v.aval) for v in graph.outputs] == ["f32[tokens,2]", "i64[tokens,2]"]
    assert qtrace.trace(lambda x: qp.top_k(x, 1), (ShapeDtype((2, "n")),)).outputs[1].shape == (2, 1)
    with pytest.raises(qtrace.ShapeError, match="symbolic dim n"):
        qtrace.trace(lambda x: qp.top_k(x, 2), (ShapeDtype((2, "n")),))


def test_top_k_breaks_ties_by_position_and_handles_the_smallest_int():
    x = np.array([np.iinfo(np.int64).min, 7, 7, np.iinfo(np.int64).min, 7], np.int64)
    values, indices = qp.top_k(x, 5)
    np.testing.assert_array_equal(indices, [1, 2, 4, 0, 3])
    np.testing.assert_array_equal(values, x[[1, 2, 4, 0, 3]])
