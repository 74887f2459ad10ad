"""Lowering, primitive by primitive (docs/architecture.md, "Lowering"): a table of small functions, each traced with
symbolic-dim inputs, lowered to ONNX, saved and checked by onnx's full checker, and run on
onnxruntime at two concrete sizes against the eager numpy function.

The table is data, in the style of jax2onnx's test cases: a name, the function, one `Arg` per array
argument (shape with symbolic names such as ("B", 4), dtype, how to fill it) and the concrete sizes
to run at. Each case runs at opset 17, both without passes (so the lowering rule of every traced
primitive is what runs) and with the default pass pipeline (whatever it does, it must not change the
answer); the cases whose lowering depends on the opset (reductions: axes become an input at 18;
GELU: a native Gelu at 20) run again at the newest supported opset, and a test keeps that list
exactly the cases whose ONNX changes. `test_every_primitive_has_a_case` keeps the table complete.

The helpers at the top are shared with the other test_lowering_*.py files.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import pytest
from onnx import helper

import qtrace
import qtrace.primitives as qp
from qtrace.dims import Dim
from qtrace.lowering.api import SUPPORTED_OPSETS
from qtrace.primitives import PRIMITIVES

INT32_MAX = 2147483647
Sizes = dict[str, int]


# -- input specs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arg:
    """One array argument: a shape (ints and symbolic names), a dtype and how to fill it.

    `make(rng, shape, sizes)` returns the concrete array for the given symbolic sizes.
    """

    shape: tuple[Any, ...]
    dtype: str
    make: Callable[[np.random.Generator, tuple[int, ...], Sizes], np.ndarray]

    @property
    def spec(self) -> qtrace.ShapeDtype:
        return qtrace.ShapeDtype(self.shape, self.dtype)

    def concrete_shape(self, sizes: Sizes) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def array(self, rng: np.random.Generator, sizes: Sizes) -> np.ndarray:
        shape = self.concrete_shape(sizes)
        result = np.asarray(self.make(rng, shape, sizes)).astype(self.dtype)
        assert result.shape == shape, (result.shape, self)
        return result


def floats(*shape: Any, low: float = -2.0, high: float = 2.0, dtype: str = "float32") -> Arg:
    return Arg(shape, dtype, lambda rng, s, _: rng.uniform(low, high, s).astype(dtype))


def ints(*shape: Any, low: int | str = -5, high: int | str = 5, dtype: str = "int64") -> Arg:
    """Integers in [low, high); a bound may be the name of a symbolic dim (its size at run time)."""

    def make(rng: np.random.Generator, s: tuple[int, ...], sizes: Sizes) -> np.ndarray:
        lo = sizes[low] if isinstance(low, str) else low
        hi = sizes[high] if isinstance(high, str) else high
        return rng.integers(lo, hi, s).astype(dtype)

    return Arg(shape, dtype, make)


def bools(*shape: Any) -> Arg:
    return Arg(shape, "bool", lambda rng, s, _: rng.random(s) < 0.5)


def custom(*shape: Any, dtype: str, make: Callable[[np.random.Generator, tuple[int, ...], Sizes], np.ndarray]) -> Arg:
    return Arg(shape, dtype, make)


def distinct_positions(ctx: str | int) -> Callable[[np.random.Generator, tuple[int, ...], Sizes], np.ndarray]:
    """Per batch row, S distinct cache positions in [0, ctx) (scatters with duplicates are unspecified)."""

    def make(rng: np.random.Generator, s: tuple[int, ...], sizes: Sizes) -> np.ndarray:
        size = sizes[ctx] if isinstance(ctx, str) else ctx
        return np.stack([rng.permutation(size)[:s[1]] for _ in range(s[0])]).reshape(s)

    return make


def distinct_slots(slots: str | int) -> Callable[[np.random.Generator, tuple[int, ...], Sizes], np.ndarray]:
    """A [B, 1] batch_index of distinct cache slots in [0, slots), in random order."""

    def make(rng: np.random.Generator, s: tuple[int, ...], sizes: Sizes) -> np.ndarray:
        size = sizes[slots] if isinstance(slots, str) else slots
        return rng.permutation(size)[:s[0]].reshape(s)

    return make


# -- checks every lowered model must pass --------------------------------------------------------------


def save_and_check(lowered: Any, directory: str | os.PathLike, name: str = "model.onnx") -> str:
    """Save the model and run onnx's full checker (strict shape inference included) on the file."""
    path = os.path.join(os.fspath(directory), name)
    lowered.save(path)
    onnx.checker.check_model(path, full_check=True)
    return path


def input_symbols(graph: qtrace.Graph) -> set[str]:
    return {n for v in graph.inputs for d in v.shape if isinstance(d, Dim) for n in d.names}


def assert_shape_inference_agrees(model: onnx.ModelProto, graph: qtrace.Graph) -> None:
    """onnx's strict shape inference, run on the model with its declared output shapes removed, finds
    the rank and elem type of every output and no dim that contradicts qtrace's shape."""
    stripped = copy.deepcopy(model)
    for out in stripped.graph.output:
        out.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(stripped, check_type=True, strict_mode=True, data_prop=True)
    symbols = input_symbols(graph)
    for out, value in zip(inferred.graph.output, graph.outputs):
        tensor_type = out.type.tensor_type
        assert tensor_type.elem_type == helper.np_dtype_to_tensor_dtype(value.dtype), out.name
        assert tensor_type.HasField("shape"), f"onnx inferred no shape for output {out.name}"
        dims = tensor_type.shape.dim
        assert len(dims) == len(value.shape), f"output {out.name}: onnx rank {len(dims)}, qtrace {value.aval}"
        for axis, (dim, expected) in enumerate(zip(dims, value.shape)):
            if dim.HasField("dim_value"):
                assert dim.dim_value == expected, f"output {out.name} axis {axis}: onnx {dim.dim_value}, qtrace {expected}"
            elif dim.HasField("dim_param") and dim.dim_param in symbols:
                assert str(expected) == dim.dim_param, (
                    f"output {out.name} axis {axis}: onnx {dim.dim_param}, qtrace {expected}")


def assert_matches(got: np.ndarray, expected: np.ndarray, what: str = "output", rtol: float = 1e-5,
                   atol: float = 1e-6) -> None:
    """float32 within rtol relative (atol only absorbs values that are ~0); everything else exact."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, reference {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {got.shape}, reference {expected.shape}"
    if expected.dtype.kind == "f":
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, expected, err_msg=what)


def all_nodes(model: onnx.ModelProto, local_domain: str = "qtrace.local") -> list[onnx.NodeProto]:
    """The main graph's nodes and those of the qtrace.local functions (not the custom-op bodies)."""
    nodes = list(model.graph.node)
    for function in model.functions:
        if function.domain == local_domain:
            nodes += list(function.node)
    return nodes


def line_of(fn: Callable[..., Any], marker: str) -> int:
    """The line, in fn's file, of the one line of fn's source containing `marker`."""
    lines, first = inspect.getsourcelines(fn)
    hits = [first + i for i, text in enumerate(lines) if marker in text]
    assert len(hits) == 1, f"marker {marker!r} appears {len(hits)} times in {fn.__name__}"
    return hits[0]


def flat(tree: Any) -> list[np.ndarray]:
    from qtrace import pytree

    return [np.asarray(leaf) for leaf in pytree.flatten(tree)[0]]


def run_both(lowered: Any, fn: Callable[..., Any], args: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(onnxruntime outputs, eager numpy outputs) for the same arguments, flattened."""
    return flat(lowered.run(*args)), flat(fn(*args))


# ======================================================================================================
# The case table
# ======================================================================================================


@dataclass(frozen=True)
class Case:
    name: str
    fn: Callable[..., Any]
    args: tuple[Arg, ...]
    sizes: tuple[Sizes, ...]


CASES: list[Case] = []
B = ({"B": 2}, {"B": 5})
BS = ({"B": 2, "S": 3}, {"B": 3, "S": 6})


def case(name: str, fn: Callable[..., Any], *args: Arg, sizes: tuple[Sizes, ...] = B) -> None:
    assert name not in {c.name for c in CASES}, name
    CASES.append(Case(name, fn, args, sizes))


_weights = np.random.default_rng(1234)
W_8x4 = _weights.standard_normal((8, 4)).astype(np.float32)
W_EMBED = _weights.standard_normal((10, 4)).astype(np.float32)
W_NORM = _weights.uniform(0.5, 1.5, 8).astype(np.float32)
B_NORM = _weights.uniform(-0.5, 0.5, 8).astype(np.float32)


def small_floats(*shape: Any) -> Arg:
    """float32 integers in [-2, 2]: comparisons see ties, casts see zeros."""
    return Arg(shape, "float32", lambda rng, s, _: rng.integers(-2, 3, s).astype(np.float32))


def positive(*shape: Any) -> Arg:
    return floats(*shape, low=0.25, high=4.0)


# -- elementwise: unary ----------------------------------------------------------------------------------
case("exp", np.exp, floats("B", 3, 4))
case("log", np.log, positive("B", 3, 4))
case("sqrt", np.sqrt, positive("B", 3, 4))
case("rsqrt", qp.rsqrt, positive("B", 3, 4))
case("reciprocal", np.reciprocal, positive("B", 3, 4))
case("tanh", np.tanh, floats("B", 3, 4))
case("sigmoid", qp.sigmoid, floats("B", 3, 4, low=-6, high=6))
case("erf", qp.erf, floats("B", 3, 4))
case("sin", np.sin, floats("B", 3, 4))
case("cos", np.cos, floats("B", 3, 4))
case("neg_float32", lambda x: -x, floats("B", 3, 4))
case("neg_int64", lambda x: -x, ints("B", 3, 4))
case("abs_float32", np.abs, floats("B", 3, 4))
case("abs_int32", np.abs, ints("B", 3, 4, dtype="int32"))
case("logical_not", np.logical_not, bools("B", 3, 4))

# -- elementwise: binary, with broadcasting ------------------------------------------------------------
case("add_broadcast", lambda x, y: x + y, floats("B", 3, 4), floats(3, 4))
case("add_int64", lambda x, y: x + y, ints("B", 1, 4), ints(3, 1))
case("sub_broadcast", lambda x, y: x - y, floats("B", 1, 4), floats(3, 1))
case("sub_int32", lambda x, y: x - y, ints("B", 4, dtype="int32"), ints(4, dtype="int32"))
case("mul_by_python_scalar", lambda x: x * 2.5, floats("B", 3))
case("mul_int64", lambda x, y: x * y, ints("B", 3), ints("B", 3))
case("div", lambda x, y: x / y, floats("B", 3, 4), floats("B", 1, 4, low=0.5, high=2.0))
case("pow", np.power, positive("B", 3), floats("B", 3))
case("pow_python_scalar", lambda x: x ** 3, floats("B", 3))
case("pow_int64", np.power, ints("B", 4, low=-3, high=4), ints("B", 4, low=0, high=4))
case("maximum", np.maximum, small_floats("B", 4), small_floats(4))
case("floor_divide_int64", lambda x, y: x // y, ints("B", 4, low=-12, high=12),
     Arg((4,), "int64", lambda rng, s, _: rng.integers(1, 5, s) * rng.choice([-1, 1], s)))
case("remainder_int32", np.remainder, ints("B", 4, low=-12, high=12, dtype="int32"),
     ints(4, low=2, high=5, dtype="int32"))
case("minimum_int64", np.minimum, ints("B", 4), ints("B", 1))
for _name, _op in [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
                   ("gt", np.greater), ("ge", np.greater_equal)]:
    case(f"{_name}_float32", _op, small_floats("B", 4), small_floats(4))
    case(f"{_name}_int64", _op, ints("B", 4, low=-2, high=3), ints("B", 4, low=-2, high=3))
case("eq_bool", np.equal, bools("B", 4), bools("B", 4))
case("ne_bool", np.not_equal, bools("B", 4), bools("B", 4))
case("logical_and", lambda x, y: x & y, bools("B", 4), bools(4))
case("logical_or", np.logical_or, bools("B", 4), bools("B", 4))
case("logical_xor", np.logical_xor, bools("B", 4), bools("B", 4))
case("where", np.where, bools("B", 1, 4), floats("B", 3, 4), floats(4))
case("where_int64", np.where, bools("B", 4), ints("B", 4), ints("B", 4))

# -- cast ---------------------------------------------------------------------------------------------
case("cast_float32_to_int32_truncates", lambda x: x.astype(np.int32), floats("B", 5, low=-5, high=5))
case("cast_int64_to_float32", lambda x: x.astype(np.float32), ints("B", 5, low=-1000, high=1000))
case("cast_bool_to_float32", lambda x: x.astype(np.float32), bools("B", 5))
case("cast_float32_to_bool", lambda x: x.astype(bool), small_floats("B", 5))
case("cast_int64_to_int32", lambda x: x.astype(np.int32), ints("B", 5, low=-1000, high=1000))
case("cast_float32_to_float16", lambda x: x.astype(np.float16), floats("B", 5, low=-100, high=100))

# -- reductions (their ONNX form changes at opset 18) ----------------------------------------------------
case("sum_last_axis", lambda x: x.sum(-1), floats("B", 3, 4))
case("sum_axes_keepdims", lambda x: np.sum(x, axis=(0, 2), keepdims=True), floats("B", 3, 4))
case("sum_all", lambda x: np.sum(x), floats("B", 3))
case("sum_int32_accumulates_in_int64", lambda x: x.sum(1), ints("B", 4, dtype="int32"))
case("sum_bool_counts", lambda x: x.sum(-1), bools("B", 5))
case("sum_no_axes_is_identity", lambda x: np.sum(x, axis=()), floats("B", 3))
case("mean_last_axis", lambda x: x.mean(-1), floats("B", 3, 4))
case("mean_axes_keepdims", lambda x: np.mean(x, axis=(1, 2), keepdims=True), floats("B", 3, 4))
case("max_axis", lambda x: x.max(1), floats("B", 3, 4))
case("max_int64_keepdims", lambda x: np.max(x, axis=0, keepdims=True), ints("B", 3))
case("min_axis", lambda x: np.min(x, axis=-1), floats("B", 3, 4))
case("min_all", lambda x: np.min(x), floats("B", 3))
case("argmax_axis", lambda x: np.argmax(x, axis=1), floats("B", 5))
case("argmax_ties_pick_first", lambda x: np.argmax(x, axis=-1, keepdims=True), ints("B", 6, low=0, high=3))
case("argmax_flat", lambda x: np.argmax(x), floats("B", 3))
case("top_k_last_axis", lambda x: qp.top_k(x, 3), floats("B", 7))
case("top_k_ties_pick_lower_index", lambda x: qp.top_k(x, 4, axis=1), ints("B", 6, 2, low=0, high=3))
case("top_k_float16_axis_0", lambda x: qp.top_k(x, 2, axis=0), floats(5, "B", dtype="float16"))
case("top_k_of_the_whole_axis", lambda x: qp.top_k(x, 4), ints("B", 4, low=-9, high=9, dtype="int32"))

# -- running sums (CumSum in index order) ---------------------------------------------------------------
case("cumsum_float32", lambda x: qp.cumsum(x, axis=1), small_floats("B", 5))
case("cumsum_int32_axis_0", lambda x: qp.cumsum(x, axis=0), ints("B", 4, dtype="int32"))

# -- shapes -------------------------------------------------------------------------------------------
case("reshape_static", lambda x: x.reshape(6, 4), floats(2, 3, 4), sizes=({},))
case("reshape_split_last_dim", lambda x: x.reshape(x.shape[0], x.shape[1], 2, 4), floats("B", "S", 8), sizes=BS)
case("reshape_merge_symbolic", lambda x: x.reshape(-1, 8), floats("B", "S", 8), sizes=BS)
case("reshape_flatten_tail", lambda x: x.reshape(x.shape[0], -1), floats("B", "S", 8), sizes=BS)
case("reshape_to_zero_size", lambda x: x.reshape(x.shape[0], 0, 3), floats("B", 3, 0))
case("reshape_swap_symbolic", lambda x: x.reshape(x.shape[1], x.shape[0], 2), floats("B", "S", 2), sizes=BS)
case("transpose_reverse", lambda x: x.T, floats("B", 3, 4))
case("transpose_perm", lambda x: np.transpose(x, (1, 0, 2)), floats("B", 3, 4))
case("moveaxis", lambda x: np.moveaxis(x, 0, -1), floats("B", 3, 4))
case("broadcast_to_symbolic", lambda x: np.broadcast_to(x, (x.shape[0], 3, 4)), floats("B", 1, 4))
case("broadcast_to_new_leading_dims", lambda x: np.broadcast_to(x, (2, 3, 4)), floats(3, 1), sizes=({},))
case("broadcast_to_shape_of_other_input", lambda x, y: np.broadcast_to(x, y.shape), floats(4), floats("B", 4))
case("squeeze_axes", lambda x: np.squeeze(x, axis=(1, 3)), floats("B", 1, 4, 1))
case("squeeze_all_unit_dims", lambda x: x.squeeze(), floats("B", 1, 4))
case("expand_dims", lambda x: np.expand_dims(x, (0, 2)), floats("B", 4))
case("expand_dims_by_none", lambda x: x[:, None], floats("B", 4))
case("concatenate_symbolic_axis", lambda x, y: np.concatenate([x, y], axis=1), floats("B", "S", 4),
     floats("B", "T", 4), sizes=({"B": 2, "S": 3, "T": 1}, {"B": 1, "S": 2, "T": 5}))
case("concatenate_int64", lambda x, y: np.concatenate([x, y], axis=0), ints("B", 3), ints(2, 3))
case("stack", lambda x, y: np.stack([x, y], axis=1), floats("B", 4), floats("B", 4))
case("split_sections", lambda x: tuple(np.split(x, 2, axis=2)), floats("B", 3, 4))
case("split_at_index_of_symbolic_dim", lambda x: tuple(np.split(x, [1], axis=1)), floats("B", "S", 4), sizes=BS)
case("slice_range", lambda x: x[:, 1:3], floats("B", 5))
case("slice_step", lambda x: x[:, ::2], floats("B", 5))
case("slice_reverse", lambda x: x[..., ::-1], floats("B", 5))
case("slice_last_of_symbolic", lambda x: x[:, -1], floats("B", "S", 4), sizes=BS)
case("slice_inner_of_symbolic", lambda x: x[:, 1:-1], floats("B", "S", 4), sizes=BS)
case("take_embedding", lambda ids: qp.take(W_EMBED, ids, axis=0), ints("B", "S", low=0, high=10), sizes=BS)
case("take_negative_indices", lambda ids: qp.take(W_EMBED, ids, axis=0), ints("B", low=-10, high=10))
case("take_axis_1", lambda x, ids: np.take(x, ids, axis=1), floats("B", 6, 3), ints(2, low=0, high=6))
case("gather_two_index_arrays", lambda x, i, j: x[i, j], floats(5, 6, 3), ints("B", low=-5, high=5),
     ints("B", low=0, high=6))
case("gather_after_a_slice", lambda x, i, j: x[:, i, j], floats("B", 5, 6), ints(2, 3, low=0, high=5),
     ints(3, low=-6, high=6))


def _distinct(high: int) -> Callable[[np.random.Generator, tuple[int, ...], Sizes], np.ndarray]:
    return lambda rng, s, _: rng.permutation(high)[:int(np.prod(s))].reshape(s)


case("index_put_int_index", lambda x, v: qp.index_put(x, (slice(None), 1), v), floats("B", 3, 4), floats("B", 4))
case("index_put_scalar_into_slice", lambda x: qp.index_put(x, (slice(None), slice(1, 3)), 0.0), floats("B", 4))
case("index_put_index_array", lambda x, i, v: qp.index_put(x, (slice(None), i), v), floats("B", 6, 2),
     custom(3, dtype="int64", make=_distinct(6)), floats("B", 3, 2))
case("index_put_negative_int_of_symbolic_dim", lambda x, v: qp.index_put(x, (slice(None), -2), v),
     floats("B", "S"), floats("B"), sizes=BS)
case("index_put_slice_of_symbolic_dim", lambda x, v: qp.index_put(x, (slice(None), slice(1, None)), v),
     floats("B", "S", 2), floats(2), sizes=BS)


def _setitem(x: Any, v: Any) -> Any:
    y = x * 1.0  # a fresh value, so the eager run does not write into the caller's array
    y[1] = v
    y[:, 0] = 0.5
    return y


case("index_put_by_setitem", _setitem, floats(3, "B"), floats("B"))

# -- creation -----------------------------------------------------------------------------------------
case("full_symbolic_shape", lambda x: qp.full(x.shape, 2.5, np.float32), floats("B", 3))
case("full_int64", lambda x: qp.full((x.shape[0], 2), 7, np.int64), floats("B", 3))
case("zeros_like", lambda x: np.zeros_like(x) + x, ints("B", 3))
case("arange_symbolic", lambda x: qp.arange(x.shape[1]), floats("B", "S"), sizes=BS)
case("arange_symbolic_start_stop_step", lambda x: qp.arange(1, 2 * x.shape[1] + 1, 2), floats("B", "S"), sizes=BS)
case("arange_float32", lambda x: qp.arange(x.shape[0], dtype=np.float32) * 0.5, floats("B"))
case("arange_static", lambda x: x + qp.arange(4), ints("B", 4))
case("arange_float16_symbolic", lambda x: qp.arange(x.shape[0], dtype=np.float16), floats("B"))
case("arange_int8_symbolic", lambda x: qp.arange(x.shape[0], dtype=np.int8), floats("B"))

# -- matmul -------------------------------------------------------------------------------------------
case("matmul_by_weight", lambda x: x @ W_8x4, floats("B", "S", 8), sizes=BS)
case("matmul_batched", np.matmul, floats("B", 3, 4), floats("B", 4, 5))
case("matmul_broadcast_batch", lambda x, y: x @ y, floats("B", 2, 3, 4), floats(2, 4, 5))
case("matmul_vector_matrix", lambda v, m: v @ m, floats(4), floats(4, "B"))
case("matmul_matrix_vector", lambda m, v: m @ v, floats("B", 3, 4), floats(4))
case("matmul_vector_vector", lambda u, v: u @ v, floats(4), floats(4), sizes=({},))
case("matmul_int64", lambda x, y: x @ y, ints("B", 3), ints(3, 2))

# -- nn -----------------------------------------------------------------------------------------------
case("softmax_last_axis", qp.softmax, floats("B", 3, 5, low=-10, high=10))
case("softmax_axis_1", lambda x: qp.softmax(x, axis=1), floats("B", 3, 5))
case("silu", qp.silu, floats("B", 7, low=-6, high=6))
case("gelu_erf", qp.gelu, floats("B", 7, low=-4, high=4))
case("gelu_tanh", lambda x: qp.gelu(x, approximate="tanh"), floats("B", 7, low=-4, high=4))
case("rms_norm", lambda x: qp.rms_norm(x, W_NORM, eps=1e-5), floats("B", "S", 8), sizes=BS)
case("layer_norm_with_bias", lambda x: qp.layer_norm(x, W_NORM, B_NORM, eps=1e-5), floats("B", "S", 8, low=-1, high=3),
     sizes=BS)
case("layer_norm_without_bias", lambda x, w: qp.layer_norm(x, w, eps=0.25), floats("B", 8), floats(8))

# -- Cloud AI 100 KV-cache ops (conventions are tested in depth in test_lowering_ctx.py) -----------------
KV = ({"B": 2, "S": 3, "C": 8}, {"B": 3, "S": 1, "C": 5})
KV_CB = ({"N": 4, "B": 2, "S": 3, "C": 8}, {"N": 5, "B": 5, "S": 2, "C": 6})
GATHER = ({"B": 2, "K": 3, "C": 8}, {"B": 3, "K": 6, "C": 5})
GATHER_CB = ({"N": 4, "B": 2, "K": 3, "C": 8}, {"N": 3, "B": 3, "K": 6, "C": 5})

case("ctx_scatter", qp.ctx_scatter, floats("B", 2, "C", 4),
     custom("B", "S", dtype="int64", make=distinct_positions("C")), floats("B", 2, "S", 4), sizes=KV)
case("ctx_scatter_int32_positions_int_data", qp.ctx_scatter, ints("B", 2, "C", 4, dtype="int32"),
     custom("B", "S", dtype="int32", make=distinct_positions("C")), ints("B", 2, "S", 4, dtype="int32"), sizes=KV)
case("ctx_scatter_3d", qp.ctx_scatter, floats("B", "C", 4),
     custom("B", "S", dtype="int64", make=distinct_positions("C")), floats("B", "S", 4), sizes=KV)
case("ctx_scatter_cb", qp.ctx_scatter_cb, floats("N", 2, "C", 4),
     custom("B", 1, dtype="int64", make=distinct_slots("N")),
     custom("B", "S", dtype="int64", make=distinct_positions("C")), floats("B", 2, "S", 4), sizes=KV_CB)
case("ctx_scatter_cb_3d", qp.ctx_scatter_cb, floats("N", "C", 4),
     custom("B", 1, dtype="int32", make=distinct_slots("N")),
     custom("B", "S", dtype="int32", make=distinct_positions("C")), floats("B", "S", 4), sizes=KV_CB)
case("ctx_gather", qp.ctx_gather, floats("B", 2, "C", 4), ints("B", 1, "K", low=0, high="C"), sizes=GATHER)
case("ctx_gather_indices_per_head", qp.ctx_gather, floats("B", 2, "C", 4), ints(1, 2, "K", low=0, high="C",
                                                                               dtype="int32"), sizes=GATHER)
case("ctx_gather_3d", qp.ctx_gather, floats("B", "C", 4), ints("B", "K", low=0, high="C"), sizes=GATHER)
case("ctx_gather_cb", qp.ctx_gather_cb, floats("N", 2, "C", 4), custom("B", 1, dtype="int64", make=distinct_slots("N")),
     ints("B", 2, "K", low=0, high="C"), sizes=GATHER_CB)
case("ctx_gather_cb_3d", qp.ctx_gather_cb, floats("N", "C", 4), custom("B", 1, dtype="int64", make=distinct_slots("N")),
     ints("B", "K", low=0, high="C"), sizes=GATHER_CB)


# -- @qtrace.function (the `call` primitive) -------------------------------------------------------------
@qtrace.function
def _block(x: Any, w: Any) -> Any:
    return np.tanh(x @ w) + x


case("call_function_twice", lambda x, w1, w2: _block(_block(x, w1), w2), floats("B", 4), floats(4, 4), floats(4, 4))


# ======================================================================================================
# Tests generated from the table
# ======================================================================================================
OPSET = 17  # qtrace's default: every case
NEWEST_OPSET = max(SUPPORTED_OPSETS)
# The cases whose ONNX differs at NEWEST_OPSET (kept exact by test_opset_dependent_cases_are_declared):
# reductions (axes become an input at 18), GELU (native from 20), and rms_norm, whose CustomRMSNorm body
# uses ReduceMean.
OPSET_DEPENDENT = {"mean_last_axis", "mean_axes_keepdims", "max_axis", "max_int64_keepdims", "min_axis", "min_all",
                   "gelu_erf", "gelu_tanh", "rms_norm"}
PIPELINES = {"no_passes": (), "default_passes": None}


@functools.lru_cache(maxsize=None)
def lowered_case(name: str, opset: int, pipeline: str) -> Any:
    c = CASE_BY_NAME[name]
    return qtrace.lower(c.fn, tuple(a.spec for a in c.args), opset=opset, passes=PIPELINES[pipeline])


CASE_BY_NAME = {c.name: c for c in CASES}
CASE_IDS = list(CASE_BY_NAME)
CASE_OPSETS = [(name, OPSET) for name in CASE_IDS] + [(name, NEWEST_OPSET) for name in sorted(OPSET_DEPENDENT)]


def case_inputs(c: Case, sizes: Sizes, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [a.array(rng, sizes) for a in c.args]


@pytest.mark.parametrize("pipeline", list(PIPELINES))
@pytest.mark.parametrize("name,opset", CASE_OPSETS)
def test_onnxruntime_matches_numpy(name: str, opset: int, pipeline: str) -> None:
    c = CASE_BY_NAME[name]
    lowered = lowered_case(name, opset, pipeline)
    for seed, sizes in enumerate(c.sizes):
        args = case_inputs(c, sizes, seed)
        got, expected = run_both(lowered, c.fn, args)
        assert len(got) == len(expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_matches(g, e, f"{name} output {i} at {sizes}")


@pytest.mark.parametrize("name,opset", CASE_OPSETS)
def test_saved_model_passes_full_check(name: str, opset: int, tmp_path: Any) -> None:
    save_and_check(lowered_case(name, opset, "no_passes"), tmp_path)


@pytest.mark.parametrize("name,opset", CASE_OPSETS)
def test_shape_inference_agrees_with_qtrace(name: str, opset: int) -> None:
    lowered = lowered_case(name, opset, "no_passes")
    assert_shape_inference_agrees(lowered.model, lowered.graph)


def test_every_primitive_has_a_case() -> None:
    traced: set[str] = set()
    for c in CASES:
        graph = qtrace.trace(c.fn, tuple(a.spec for a in c.args))
        for g in [graph] + [f.body for f in graph.functions.values()]:
            traced.update(node.op for node in g.nodes)
    assert set(PRIMITIVES) - traced == set()
    assert "call" in traced


def onnx_structure(model: onnx.ModelProto) -> list[Any]:
    """What a lowering emits, without names: each node's op, domain and attributes, function by function."""
    def nodes(node_list: Any) -> list[Any]:
        return [(n.op_type, n.domain, [a.SerializeToString() for a in n.attribute]) for n in node_list]

    return nodes(model.graph.node) + [(f.domain, f.name, nodes(f.node)) for f in model.functions]


def test_opset_dependent_cases_are_declared() -> None:
    """OPSET_DEPENDENT is exactly the cases whose ONNX differs between opset 17 and the newest opset."""
    differing = set()
    for name in CASE_IDS:
        c = CASE_BY_NAME[name]
        for pipeline in PIPELINES:
            newest = qtrace.lower(c.fn, tuple(a.spec for a in c.args), opset=NEWEST_OPSET, passes=PIPELINES[pipeline])
            if onnx_structure(lowered_case(name, OPSET, pipeline).model) != onnx_structure(newest.model):
                differing.add(name)
    assert differing == OPSET_DEPENDENT


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("opset", list(SUPPORTED_OPSETS))
def test_gelu_is_one_native_gelu_node_from_opset_20(opset: int, approximate: str) -> None:
    lowered = qtrace.lower(lambda x: qp.gelu(x, approximate=approximate), (floats("B", 7).spec,), opset=opset,
                           passes=())
    op_types = [n.op_type for n in lowered.model.graph.node]
    if opset >= 20:
        (node,) = lowered.model.graph.node
        assert node.op_type == "Gelu" and helper.get_attribute_value(node.attribute[0]) == approximate.encode()
    else:
        assert "Gelu" not in op_types and ("Tanh" if approximate == "tanh" else "Erf") in op_types
