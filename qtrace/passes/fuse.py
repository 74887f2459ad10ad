"""fuse: rewrite written-out forms into the primitives the accelerator runs as one op.

Each fusion is a rule of the shared engine (rewrite.py): `@FUSIONS.rule(pattern, ...)` over a
builder that returns the replacement value, or None when a constraint the pattern cannot express
fails (a builder checks before it builds, so declining leaves the graph as it was). Where patterns
overlap the larger one is tried first; `priority=` overrides that. Adding a fusion is a few lines
(docs/architecture.md, "Adding a fusion").

Priorities: LayerNorm's patterns overlap RMSNorm's ((x - mean) normalized by its own root mean square
is a LayerNorm) and declare a higher priority; RMSNorm also declines a centred input outright, so a
LayerNorm that cannot be fused (its centred value used elsewhere) does not become an RMSNorm either.

A fusion must compute the same function as the written-out form, up to float rounding: constants a
pattern expects (the 1 in 1 / (1 + exp(-x)), GELU's 0.5, 1/sqrt(2), 0.044715) must be those numbers
rounded to the constant's dtype, within one unit in the last place, never "close".
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..core import PRIMITIVES
from ..errors import QtraceError
from ..ir import Graph, Node, Value
from ..weights import is_deferred
from .manager import register_pass
from .pattern import Match, Pat, Var
from .rewrite import RuleSet, on_every_graph, rewrite

FUSIONS = RuleSet()

# LayerNorm over RMSNorm: (x - mean) normalized by its own root mean square is a LayerNorm, which the
# RMSNorm patterns would otherwise fuse into an rms_norm of the centred value.
RMS_NORM_PRIORITY, LAYER_NORM_PRIORITY = 0, 1


# -- constraints ----------------------------------------------------------------------------------------


def scalar_constant(value: Value) -> bool:
    return value.is_constant and value.const.size == 1 and not is_deferred(value.const)


def constant_equal(number: float) -> Callable[[Value], bool]:
    """A scalar constant that is `number` up to rounding in its own dtype (one unit in the last place:
    a constant computed in float32 arithmetic may differ from the correctly rounded one by that)."""

    def check(value: Value) -> bool:
        if not scalar_constant(value):
            return False
        have = value.const.reshape(-1)[0]
        if value.dtype.kind != "f":
            return bool(have == number)
        want = np.asarray(number, dtype=value.dtype)
        return abs(float(have) - float(want)) <= float(np.spacing(np.abs(want)))

    return check


def last_axis(axes: tuple[int, ...], node: Node) -> bool:
    return tuple(axes) == (node.inputs[0].ndim - 1,)


def float32_dtype(dtype: np.dtype, node: Node) -> bool:
    return np.dtype(dtype) == np.float32


def _apply(graph: Graph, root: Node, primitive: str, *inputs: Value, **params) -> Value:
    return graph.apply(PRIMITIVES[primitive], *inputs, location=root.location, scope=root.scope, **params)[0]


def _cast_to(graph: Graph, root: Node, value: Value, dtype: np.dtype) -> Value:
    return value if value.dtype == dtype else _apply(graph, root, "cast", value, dtype=np.dtype(dtype))


# -- RMSNorm --------------------------------------------------------------------------------------------
# x * rsqrt(mean(x*x, -1) + eps) * w and its spellings: x / sqrt(...), x * reciprocal(sqrt(...)),
# pow(x, 2) for the square, the weight on either side, and an upcast to float32 around it.


def _normalized(x: Pat, variance: Pat) -> list[Pat]:
    """x / sqrt(variance) spelled x * rsqrt(v), x / sqrt(v), x * reciprocal(sqrt(v)) or x * (1 / sqrt(v))."""
    return [Pat("mul", x, Pat("rsqrt", variance)), Pat("div", x, Pat("sqrt", variance)),
            Pat("mul", x, Pat("reciprocal", Pat("sqrt", variance))),
            Pat("mul", x, Pat("div", Var("one", constant_equal(1.0)), Pat("sqrt", variance)))]


def _squares(x: Pat) -> list[Pat]:
    return [Pat("mul", x, x), Pat("pow", x, Var("two", constant_equal(2.0)))]


def _rms_patterns(x: Pat, x_in_norm: Pat) -> list[Pat]:
    eps, w = Var("eps", scalar_constant), Var("w")
    patterns = []
    for square in _squares(x):
        variance = Pat("add", Pat("reduce_mean", square, axes=last_axis, keepdims=True), eps)
        for normed in _normalized(x_in_norm, variance):
            patterns.append(Pat("mul", normed, w))
            patterns.append(Pat("mul", Pat("cast", normed, name="downcast"), w))
    return patterns


_x = Var("x")
_upcast = Pat("cast", Var("h"), dtype=float32_dtype, name="upcast")


@FUSIONS.rule(*_rms_patterns(_x, _x), *_rms_patterns(_upcast, _upcast), priority=RMS_NORM_PRIORITY)
def fuse_rms_norm(graph: Graph, root: Node, m: Match) -> Value | None:
    # Normalize in the dtype the written-out form computes its statistics in (float32 when it upcasts
    # float16, whose squares overflow past 256), or in the output's dtype when that is wider.
    x = m["upcast"].outputs[0] if "upcast" in m else m["x"]
    weight = m["w"]
    if weight.ndim != 1 or weight.shape[0] != x.shape[-1] or x.shape != root.outputs[0].shape \
            or _is_centered(m["h"] if "upcast" in m else m["x"]):
        return None
    out_dtype = root.outputs[0].dtype
    dtype = np.promote_types(x.dtype, out_dtype)
    eps = float(m["eps"].const.reshape(-1)[0])
    normed = _apply(graph, root, "rms_norm", _cast_to(graph, root, x, dtype), _cast_to(graph, root, weight, dtype),
                    eps=eps)
    return _cast_to(graph, root, normed, out_dtype)


# -- LayerNorm ------------------------------------------------------------------------------------------
# (x - mean(x)) / sqrt(var + eps) with var = mean((x - mean(x))**2), all over the last axis: the
# normalization and the square in the spellings RMSNorm accepts, the centred value computed once, or
# only its mean, or neither (np.var computes its own). It fuses with a weight of ones; a following
# "* w" and "+ b" then fold into it (fuse_layer_norm_scale, fuse_layer_norm_shift).


def _mean(x: Pat, name: str | None = None) -> Pat:
    return Pat("reduce_mean", x, axes=last_axis, keepdims=True, name=name)


def _layer_norm_patterns() -> list[Pat]:
    x, eps = Var("x"), Var("eps", scalar_constant)
    patterns = []
    for sharing in ("centred value", "mean", "nothing"):
        mean = _mean(x)
        centered = Pat("sub", x, mean)
        in_variance = {"centred value": centered, "mean": Pat("sub", x, mean),
                       "nothing": Pat("sub", x, _mean(x))}[sharing]
        for square in _squares(in_variance):
            patterns += _normalized(centered, Pat("add", _mean(square), eps))
    return patterns


def _is_centered(value: Value) -> bool:
    """Is `value` x - mean(x) over the last axis (x minus its own mean)?"""
    node = value.producer
    if node is None or node.op != "sub":
        return False
    mean = node.inputs[1].producer
    return mean is not None and mean.op == "reduce_mean" and mean.inputs[0] is node.inputs[0] and \
        mean.params["keepdims"] and last_axis(mean.params["axes"], mean)


def _is_ones(value: Value) -> bool:
    if value.is_constant:
        return not is_deferred(value.const) and bool(np.all(value.const == 1))
    node = value.producer
    return node is not None and node.op == "full" and node.params["fill_value"] == 1


def _norm_param(value: Value, x: Value) -> bool:
    """A weight or bias that LayerNormalization takes: 1-D, the size of x's last dim, x's dtype."""
    return value.shape == x.shape[-1:] and value.dtype == x.dtype


@FUSIONS.rule(*_layer_norm_patterns(), priority=LAYER_NORM_PRIORITY)
def fuse_layer_norm(graph: Graph, root: Node, m: Match) -> Value | None:
    x = m["x"]
    if x.ndim == 0 or not np.issubdtype(x.dtype, np.floating) or x.aval != root.outputs[0].aval:
        return None
    ones = _apply(graph, root, "full", shape=x.shape[-1:], fill_value=1.0, dtype=x.dtype)
    return _apply(graph, root, "layer_norm", x, ones, eps=float(m["eps"].const.reshape(-1)[0]))


@FUSIONS.rule(Pat("mul", Pat("layer_norm", Var("x"), Var("ones", _is_ones), name="norm"), Var("w")),
              priority=LAYER_NORM_PRIORITY)
def fuse_layer_norm_scale(graph: Graph, root: Node, m: Match) -> Value | None:
    if not _norm_param(m["w"], m["x"]):
        return None
    return _apply(graph, root, "layer_norm", m["x"], m["w"], eps=m["norm"].params["eps"])


@FUSIONS.rule(Pat("add", Pat("layer_norm", Var("x"), Var("w"), name="norm"), Var("b")), priority=LAYER_NORM_PRIORITY)
def fuse_layer_norm_shift(graph: Graph, root: Node, m: Match) -> Value | None:
    if not _norm_param(m["b"], m["x"]):
        return None
    return _apply(graph, root, "layer_norm", m["x"], m["w"], m["b"], eps=m["norm"].params["eps"])


# -- softmax, silu, gelu --------------------------------------------------------------------------------
_sx = Var("x")
_shifted = Pat("exp", Pat("sub", _sx, Pat("reduce_max", _sx, name="max", keepdims=True)), name="exp")


@FUSIONS.rule(Pat("div", _shifted, Pat("reduce_sum", _shifted, name="sum", keepdims=True)))
def fuse_softmax(graph: Graph, root: Node, m: Match) -> Value | None:
    axes = m["max"].params["axes"]
    if len(axes) != 1 or m["sum"].params["axes"] != axes:
        return None
    return _apply(graph, root, "softmax", m["x"], axis=axes[0])


def _sigmoid_patterns() -> list[Pat]:
    # The two 1s are usually two constants, one value once CSE has merged them: a pattern for each.
    x, one, other_one = Var("x"), Var("one", constant_equal(1.0)), Var("one_", constant_equal(1.0))
    return [Pat("div", one, Pat("add", second, Pat("exp", Pat("neg", x)))) for second in (other_one, one)]


@FUSIONS.rule(*_sigmoid_patterns())
def fuse_sigmoid(graph: Graph, root: Node, m: Match) -> Value | None:
    return _apply(graph, root, "sigmoid", m["x"])


_silu_x = Var("x")


@FUSIONS.rule(Pat("mul", _silu_x, Pat("sigmoid", _silu_x)))
def fuse_silu(graph: Graph, root: Node, m: Match) -> Value | None:
    return _apply(graph, root, "silu", m["x"])


def _gelu_patterns() -> list[Pat]:
    x = Var("x")
    half, one = Var("half", constant_equal(0.5)), Var("one", constant_equal(1.0))
    erf_arg = [Pat("mul", x, Var("k", constant_equal(1 / math.sqrt(2)))),
               Pat("div", x, Var("k", constant_equal(math.sqrt(2))))]
    cube = [Pat("pow", x, Var("three", constant_equal(3.0))), Pat("mul", Pat("mul", x, x), x)]
    tanh_arg = [Pat("mul", Var("k", constant_equal(math.sqrt(2 / math.pi))),
                    Pat("add", x, Pat("mul", Var("c", constant_equal(0.044715)), c))) for c in cube]
    gates = [Pat("erf", a, name="erf") for a in erf_arg] + [Pat("tanh", a, name="tanh") for a in tanh_arg]
    patterns = []
    for gate in gates:
        one_plus = Pat("add", gate, one)
        patterns += [Pat("mul", Pat("mul", x, half), one_plus), Pat("mul", x, Pat("mul", half, one_plus)),
                     Pat("mul", Pat("mul", x, one_plus), half)]
    return patterns


@FUSIONS.rule(*_gelu_patterns())
def fuse_gelu(graph: Graph, root: Node, m: Match) -> Value | None:
    return _apply(graph, root, "gelu", m["x"], approximate="tanh" if "tanh" in m else "none")


# -- KV-cache writes and reads written with numpy indexing ----------------------------------------------
# cache[arange(B)[:, None, None], arange(H)[None, :, None], position_ids[:, None, :]] = updates
# is ctx_scatter(cache, position_ids, updates); the same index grid read with gather is ctx_gather.


def _index_grid_axis(value: Value, length, axis: int, ndim: int) -> bool:
    """Is `value` arange(length) laid along `axis` of an ndim-rank index grid (size 1 elsewhere)?"""
    if value.ndim != ndim or value.shape[axis] != length or any(
            d != 1 for i, d in enumerate(value.shape) if i != axis):
        return False
    if value.is_constant:
        return isinstance(length, int) and np.array_equal(value.const.reshape(-1), np.arange(length))
    source = value
    while source.producer is not None and source.producer.op in ("reshape", "expand_dims", "cast"):
        source = source.producer.inputs[0]
    node = source.producer
    if node is None or node.op != "arange":
        return source.is_constant and isinstance(length, int) and np.array_equal(
            source.const.reshape(-1), np.arange(length))
    return node.params["start"] == 0 and node.params["step"] == 1 and node.params["stop"] == length


def _positions_layout_ok(index: Value, batch, heads: bool) -> bool:
    """Is the index position_ids [B, S] laid out as [B, 1, S] (4-D cache) or [B, S] (3-D cache)?"""
    if not heads:
        return index.ndim == 2 and index.shape[0] == batch
    return index.ndim == 3 and index.shape[0] == batch and index.shape[1] == 1


def _positions_2d(graph: Graph, root: Node, index: Value, heads: bool) -> Value:
    """position_ids [B, S] from an index that passed `_positions_layout_ok`."""
    if not heads:
        return index
    producer = index.producer
    if producer is not None and producer.op in ("expand_dims", "reshape") and producer.inputs[0].ndim == 2 \
            and producer.inputs[0].shape == (index.shape[0], index.shape[2]):
        return producer.inputs[0]
    return _apply(graph, root, "squeeze", index, axes=(1,))


_ARRAY_SLOT = lambda k: ("array", k)  # noqa: E731
_FULL_SLICE = ("slice", None, None, 1)


@FUSIONS.rule(
        Pat("index_put", Var("data"), Var("updates"), Var("i0"), Var("i1"), Var("i2"),
            spec=(_ARRAY_SLOT(0), _ARRAY_SLOT(1), _ARRAY_SLOT(2), _FULL_SLICE)),
        Pat("index_put", Var("data"), Var("updates"), Var("i0"), Var("i1"),
            spec=(_ARRAY_SLOT(0), _ARRAY_SLOT(1), _FULL_SLICE)))
def fuse_ctx_scatter(graph: Graph, root: Node, m: Match) -> Value | None:
    data, updates = m["data"], m["updates"]
    heads = data.ndim == 4
    batch = data.shape[0]
    if not _index_grid_axis(m["i0"], batch, 0, 3 if heads else 2):
        return None
    if heads and not _index_grid_axis(m["i1"], data.shape[1], 1, 3):
        return None
    index = m["i2"] if heads else m["i1"]
    if not _positions_layout_ok(index, batch, heads):
        return None
    seq = index.shape[-1]
    expected = (batch, data.shape[1], seq, data.shape[3]) if heads else (batch, seq, data.shape[2])
    if updates.shape != expected:
        return None
    return _apply(graph, root, "ctx_scatter", data, _positions_2d(graph, root, index, heads), updates)


@FUSIONS.rule(
        Pat("gather", Var("data"), Var("i0"), Var("i1"), Var("i2"), axis=0),
        Pat("gather", Var("data"), Var("i0"), Var("i1"), axis=0))
def fuse_ctx_gather(graph: Graph, root: Node, m: Match) -> Value | None:
    data = m["data"]
    heads = data.ndim == 4
    if heads != ("i2" in m):
        return None
    # Only KV caches (graph inputs or what a cache write produced) become cache reads.
    if not (data.producer is None or data.producer.op in ("ctx_scatter", "ctx_scatter_cb")):
        return None
    if not _index_grid_axis(m["i0"], data.shape[0], 0, 3 if heads else 2):
        return None
    if heads and not _index_grid_axis(m["i1"], data.shape[1], 1, 3):
        return None
    index = m["i2"] if heads else m["i1"]
    lead = (data.shape[0], data.shape[1]) if heads else (data.shape[0],)
    if index.ndim != len(lead) + 1 or any(d != 1 and d != want for d, want in zip(index.shape, lead)):
        return None
    try:
        (aval,) = PRIMITIVES["ctx_gather"].abstract_eval([data.aval, index.aval], {"comp_ctx_len": None})
    except QtraceError:
        return None
    if aval != root.outputs[0].aval:
        return None
    return _apply(graph, root, "ctx_gather", data, index, comp_ctx_len=None)


# After the cache read above (which takes such gathers whole): x[arange(B)[:, None], i] reads each
# row of x at its own indices, a batched gather whose row numbers are never built (GatherND batch_dims).
@FUSIONS.rule("gather", priority=-1)
def gather_rows_in_batches(graph: Graph, root: Node, m: Match) -> Value | None:
    data, indices = root.inputs[0], root.inputs[1:]
    if root.params["axis"] != 0 or root.params.get("batch_dims"):
        return None
    ndim = max(v.ndim for v in indices)
    batch_dims = 0
    while batch_dims < len(indices) - 1 and _index_grid_axis(indices[batch_dims], data.shape[batch_dims],
                                                             batch_dims, ndim):
        batch_dims += 1
    if not batch_dims:
        return None
    rest = indices[batch_dims:]
    try:
        (aval,) = root.primitive.abstract_eval([data.aval] + [v.aval for v in rest],
                                               {"axis": batch_dims, "batch_dims": batch_dims})
    except QtraceError:
        return None
    if aval != root.outputs[0].aval:  # the row numbers did more than index (they widened the result)
        return None
    return _apply(graph, root, "gather", data, *rest, axis=batch_dims, batch_dims=batch_dims)


# -- the pass -------------------------------------------------------------------------------------------


def fuse_graph(graph: Graph):
    return rewrite(graph, FUSIONS)


fuse = register_pass("fuse")(on_every_graph(fuse_graph))

__all__ = ["FUSIONS", "LAYER_NORM_PRIORITY", "RMS_NORM_PRIORITY", "constant_equal", "scalar_constant", "fuse"]
