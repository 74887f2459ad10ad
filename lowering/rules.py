"""One lowering rule per primitive: IR node -> ONNX nodes.

A rule is `rule(ctx, node, *input_names) -> output name(s)`. Direct one-to-one mappings are table
rows; the rest are small functions. Shapes and dtypes are never stamped by hand here: they come
from the IR values the primitive's shape rule produced.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from qtrace import dtypes
from qtrace.dims import Dim
from qtrace.errors import LoweringError
from qtrace.ir import Node

from .context import INT64_MAX, INT64_MIN, LoweringContext, onnx_dtype
from .custom_ops import CUSTOM_OP_DOMAINS

Rule = Callable[..., Any]
RULES: dict[str, Rule] = {}


def lowering(*primitive_names: str) -> Callable[[Rule], Rule]:
    def register(rule: Rule) -> Rule:
        for name in primitive_names:
            RULES[name] = rule
        return rule

    return register


# -- dtypes ONNX does not accept -------------------------------------------------------------------------
# Where an ONNX operator's type constraint is narrower than the primitive's dtype rule, lowering says so
# at the user's line instead of emitting a model the checker rejects.
_NUMBERS = {"int32", "int64", "float16", "float32", "float64", "bfloat16"}
_ONNX_INPUT_DTYPES: dict[str, tuple[str, set[str]]] = {
    "neg": ("Neg", _NUMBERS | {"int8", "int16"}),
    "pow": ("Pow", _NUMBERS),
    "matmul": ("MatMul", _NUMBERS),
    "reduce_max": ("ReduceMax", _NUMBERS | {"int8", "uint8"}),
    "reduce_min": ("ReduceMin", _NUMBERS | {"int8", "uint8"}),
}


def check_dtypes(node: Node) -> None:
    """Raise a LoweringError when the node's ONNX operator does not accept its operands' dtype."""
    entry = _ONNX_INPUT_DTYPES.get(node.op)
    if entry is None:
        return
    op_type, allowed = entry
    dtype = node.inputs[0].dtype
    if dtype.name not in allowed:
        raise LoweringError(f"ONNX {op_type} does not accept {dtype.name} operands ({node.inputs[0].aval}); "
                            f"cast to one of {', '.join(sorted(allowed))} first", op=node.op, location=node.location)


# -- direct mappings ------------------------------------------------------------------------------------
_DIRECT = {
    "neg": "Neg", "abs": "Abs", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "reciprocal": "Reciprocal",
    "tanh": "Tanh", "sigmoid": "Sigmoid", "erf": "Erf", "sin": "Sin", "cos": "Cos", "logical_not": "Not",
    "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max", "minimum": "Min",
    "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual",
    "logical_and": "And", "logical_or": "Or", "logical_xor": "Xor", "where": "Where", "matmul": "MatMul",
}


def _direct(op_type: str) -> Rule:
    def rule(ctx: LoweringContext, node: Node, *inputs: str) -> str:
        return ctx.op(op_type, *inputs)

    return rule


for _prim, _op_type in _DIRECT.items():
    RULES[_prim] = _direct(_op_type)


@lowering("ne")
def lower_ne(ctx: LoweringContext, node: Node, x: str, y: str) -> str:
    return ctx.op("Not", ctx.op("Equal", x, y))


@lowering("remainder")
def lower_remainder(ctx: LoweringContext, node: Node, x: str, y: str) -> str:
    return ctx.op("Mod", x, y, fmod=0)  # integer Mod takes the divisor's sign, as numpy's %


@lowering("floor_divide")
def lower_floor_divide(ctx: LoweringContext, node: Node, x: str, y: str) -> str:
    # (x - x % y) is a multiple of y, so the division is exact whichever way Div rounds
    return ctx.op("Div", ctx.op("Sub", x, ctx.op("Mod", x, y, fmod=0)), y)


@lowering("rsqrt")
def lower_rsqrt(ctx: LoweringContext, node: Node, x: str) -> str:
    return ctx.op("Reciprocal", ctx.op("Sqrt", x))


@lowering("cast")
def lower_cast(ctx: LoweringContext, node: Node, x: str) -> str:
    return ctx.op("Cast", x, to=onnx_dtype(node.params["dtype"]))


# -- reductions ---------------------------------------------------------------------------------------
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_mean": "ReduceMean", "reduce_max": "ReduceMax",
           "reduce_min": "ReduceMin"}


@lowering(*_REDUCE)
def lower_reduce(ctx: LoweringContext, node: Node, x: str) -> str:
    out_dtype = node.outputs[0].dtype
    if node.inputs[0].dtype != out_dtype:  # numpy accumulates ints in int64, mean of ints is float
        x = ctx.op("Cast", x, to=onnx_dtype(out_dtype))
    axes, keepdims = node.params["axes"], int(node.params["keepdims"])
    if not axes:
        return ctx.op("Identity", x)
    op_type = _REDUCE[node.op]
    # ReduceSum takes axes as an input since opset 13, the others since opset 18.
    if op_type == "ReduceSum" or ctx.opset >= 18:
        return ctx.op(op_type, x, ctx.ints(axes), keepdims=keepdims)
    return ctx.op(op_type, x, axes=list(axes), keepdims=keepdims)


@lowering("argmax")
def lower_argmax(ctx: LoweringContext, node: Node, x: str) -> str:
    return ctx.op("ArgMax", x, axis=node.params["axis"], keepdims=int(node.params["keepdims"]))


@lowering("top_k")
def lower_top_k(ctx: LoweringContext, node: Node, x: str) -> list[str]:
    # ONNX's TopK has no bfloat16 before opset 24: select in float32 (exact) and give the values back.
    bfloat16 = node.inputs[0].dtype == dtypes.bfloat16
    if bfloat16:
        x = ctx.op("Cast", x, to=onnx_dtype(np.float32))
    values, indices = ctx.op("TopK", x, ctx.ints([node.params["k"]]), axis=node.params["axis"], largest=1, sorted=1,
                             n_outputs=2)
    if bfloat16:
        values = ctx.op("Cast", values, to=onnx_dtype(dtypes.bfloat16))
    return [values, indices]


@lowering("cumsum")
def lower_cumsum(ctx: LoweringContext, node: Node, x: str) -> str:
    return ctx.op("CumSum", x, ctx.scalar(node.params["axis"], np.int64))


# -- shapes -------------------------------------------------------------------------------------------


@lowering("reshape")
def lower_reshape(ctx: LoweringContext, node: Node, x: str) -> str:
    """Reshape to constants where possible: 0 copies an input dim at the same position, one -1 absorbs
    the single dim that is neither; only otherwise is the shape computed with Shape ops."""
    source, target = node.inputs[0].shape, node.params["shape"]
    if any(isinstance(d, int) and d == 0 for d in target):  # a literal 0 means "size 0", not "copy"
        return ctx.op("Reshape", x, ctx.shape(target), allowzero=1)
    spec: list[int | None] = []
    for i, d in enumerate(target):
        if isinstance(d, int):
            spec.append(d)
        elif i < len(source) and source[i] == d:
            spec.append(0)
        else:
            spec.append(None)
    unknown = [i for i, d in enumerate(spec) if d is None]
    if len(unknown) <= 1:
        return ctx.op("Reshape", x, ctx.ints([-1 if d is None else d for d in spec]))
    return ctx.op("Reshape", x, ctx.shape(target))


@lowering("transpose")
def lower_transpose(ctx: LoweringContext, node: Node, x: str) -> str:
    return ctx.op("Transpose", x, perm=list(node.params["perm"]))


@lowering("broadcast_to")
def lower_broadcast_to(ctx: LoweringContext, node: Node, x: str) -> str:
    """Expand broadcasts its input against the shape operand, so a target dim the input already has
    can be given as 1: symbolic dims then need no Shape ops."""
    source, target = node.inputs[0].shape, node.params["shape"]
    offset = len(target) - len(source)
    dims = [1 if i >= offset and source[i - offset] == d else d for i, d in enumerate(target)]
    return ctx.op("Expand", x, ctx.shape(dims))


@lowering("squeeze")
def lower_squeeze(ctx: LoweringContext, node: Node, x: str) -> str:
    return ctx.op("Squeeze", x, ctx.ints(node.params["axes"]))


@lowering("expand_dims")
def lower_expand_dims(ctx: LoweringContext, node: Node, x: str) -> str:
    return ctx.op("Unsqueeze", x, ctx.ints(node.params["axes"]))


@lowering("concatenate")
def lower_concatenate(ctx: LoweringContext, node: Node, *xs: str) -> str:
    return ctx.op("Concat", *xs, axis=node.params["axis"])


@lowering("split")
def lower_split(ctx: LoweringContext, node: Node, x: str) -> list[str]:
    sizes = node.params["sizes"]
    outs = ctx.op("Split", x, ctx.shape(sizes), axis=node.params["axis"], n_outputs=len(sizes))
    return outs if isinstance(outs, list) else [outs]


@lowering("slice")
def lower_slice(ctx: LoweringContext, node: Node, x: str) -> str:
    starts, ends, axes, steps = [], [], [], []
    for axis, (start, stop, step) in enumerate(node.params["slices"]):
        if (start, stop, step) == (None, None, 1):
            continue
        dim = node.inputs[0].shape[axis]
        if isinstance(dim, int):
            # Python's bounds resolved here: ONNX clamps a start before the first element to 0 when
            # stepping backwards, where Python selects nothing (x[-3::-1] on 2 elements is empty).
            start, stop, step = _python_slice(dim, start, stop, step)
        starts.append(start if start is not None else (0 if step > 0 else INT64_MAX))
        ends.append(stop if stop is not None else (INT64_MAX if step > 0 else INT64_MIN))
        axes.append(axis)
        steps.append(step)
    return ctx.op("Slice", x, ctx.ints(starts), ctx.ints(ends), ctx.ints(axes), ctx.ints(steps))


def _python_slice(dim: int, start: int | None, stop: int | None, step: int) -> tuple[int | None, int | None, int]:
    """(start, stop, step) selecting what Python's slice selects on a static dim, in ONNX's terms:
    in-range non-negative bounds, None for an open end, an empty selection as 0:0."""
    selected = range(*slice(start, stop, step).indices(dim))
    if not selected:
        return 0, 0, 1
    end = selected.stop if selected.stop >= 0 else None  # stepping back past index 0
    return selected.start, end, step


@lowering("take")
def lower_take(ctx: LoweringContext, node: Node, x: str, indices: str) -> str:
    return ctx.op("Gather", x, indices, axis=node.params["axis"])


def _stacked_indices(ctx: LoweringContext, node: Node, arrays: list[str], avals: list[Any],
                     shape: tuple) -> str:
    """Index arrays broadcast to `shape` and stacked on a new last axis, as GatherND/ScatterND want."""
    columns = []
    for name, aval in zip(arrays, avals):
        if aval.dtype != np.int64:
            name = ctx.op("Cast", name, to=onnx_dtype(np.int64))
        if tuple(aval.shape) != tuple(shape):
            offset = len(shape) - len(aval.shape)
            dims = [1 if i >= offset and aval.shape[i - offset] == d else d for i, d in enumerate(shape)]
            name = ctx.op("Expand", name, ctx.shape(dims))
        columns.append(ctx.op("Unsqueeze", name, ctx.ints([len(shape)])))
    return columns[0] if len(columns) == 1 else ctx.op("Concat", *columns, axis=-1)


def _wrap_negative(ctx: LoweringContext, index: str, dim: Any) -> str:
    """numpy's negative indices, made explicit (ScatterND does not promise to accept them)."""
    zero = ctx.scalar(0, np.int64)
    size = ctx.op("Reshape", ctx.dim(dim), ctx.ints([])) if isinstance(dim, Dim) else ctx.scalar(dim, np.int64)
    return ctx.op("Where", ctx.op("Less", index, zero), ctx.op("Add", index, size), index)


@lowering("gather")
def lower_gather(ctx: LoweringContext, node: Node, x: str, *indices: str) -> str:
    axis, count, batched = node.params["axis"], len(indices), bool(node.params.get("batch_dims"))
    data = node.inputs[0]
    # The output's index dims (a batched gather's start at 0: its leading axes index themselves).
    batch_shape = node.outputs[0].shape[0 if batched else axis:len(node.outputs[0].shape) - (data.ndim - axis - count)]
    if batched:
        stacked = _stacked_indices(ctx, node, list(indices), [v.aval for v in node.inputs[1:]], batch_shape)
        return ctx.op("GatherND", x, stacked, batch_dims=axis)
    if axis:  # bring the indexed axes to the front, gather, put the batch dims back at `axis`
        perm = list(range(axis, axis + count)) + list(range(axis)) + list(range(axis + count, data.ndim))
        x = ctx.op("Transpose", x, perm=perm)
    stacked = _stacked_indices(ctx, node, list(indices), [v.aval for v in node.inputs[1:]], batch_shape)
    out = ctx.op("GatherND", x, stacked)
    if axis:
        nb = len(batch_shape)
        perm = list(range(nb, nb + axis)) + list(range(nb)) + list(range(nb + axis, nb + axis + data.ndim - axis - count))
        out = ctx.op("Transpose", out, perm=perm)
    return out


@lowering("index_put")
def lower_index_put(ctx: LoweringContext, node: Node, data: str, updates: str, *indices: str) -> str:
    """ScatterND with an explicit index grid over the indexed region."""
    from qtrace.primitives.shape_ops import _index_shape

    spec = node.params["spec"]
    value = node.inputs[0]
    index_avals = [v.aval for v in node.inputs[2:]]
    region = _index_shape(value.aval, spec, [a.shape for a in index_avals])
    columns, position = [], 0
    advanced_rank = len(region) - sum(1 for item in spec if item[0] == "slice")
    for axis, item in enumerate(spec):
        if item[0] == "slice":
            start, stop, step = item[1:]
            dim = value.shape[axis]
            if isinstance(dim, int):
                grid = ctx.ints(range(*slice(start, stop, step).indices(dim)))
            else:
                def resolve(bound: int | None, open_end: Any) -> Any:
                    return open_end if bound is None else (bound if bound >= 0 else dim + bound)

                # Python's open ends: 0..dim going forward, dim-1 down to -1 (exclusive) going back
                first = resolve(start, 0 if step > 0 else dim - 1)
                last = resolve(stop, dim if step > 0 else -1)
                grid = ctx.op("Range", ctx.scalar_dim(first), ctx.scalar_dim(last), ctx.scalar(step, np.int64))
            along = [-1 if i == position else 1 for i in range(len(region))]
            columns.append((ctx.op("Reshape", grid, ctx.ints(along)), None))
            position += 1
        else:
            name, aval = indices[item[1]], index_avals[item[1]]
            if aval.dtype != np.int64:
                name = ctx.op("Cast", name, to=onnx_dtype(np.int64))
            name = _wrap_negative(ctx, name, value.shape[axis])
            lead = position + advanced_rank - aval.ndim
            trail = len(region) - position - advanced_rank
            name = ctx.op("Unsqueeze", name, ctx.ints(list(range(lead)) + list(range(lead + aval.ndim, lead + aval.ndim + trail)))) \
                if lead or trail else name
            columns.append((name, aval))
            if item[1] == len(index_avals) - 1:  # the advanced block ends with the last index array
                position += advanced_rank
    full = []
    for name, _ in columns:
        expanded = ctx.op("Expand", name, ctx.shape(region))
        full.append(ctx.op("Unsqueeze", expanded, ctx.ints([len(region)])))
    grid = full[0] if len(full) == 1 else ctx.op("Concat", *full, axis=-1)
    if tuple(node.inputs[1].shape) != tuple(region):
        updates = ctx.op("Expand", updates, ctx.shape(region))
    return ctx.op("ScatterND", data, grid, updates)


# -- creation -----------------------------------------------------------------------------------------


@lowering("full")
def lower_full(ctx: LoweringContext, node: Node) -> str:
    dtype = node.params["dtype"]
    value = np.asarray(node.params["fill_value"], dtype=dtype).reshape(1)
    from onnx import numpy_helper

    return ctx.op("ConstantOfShape", ctx.shape(node.params["shape"]), value=numpy_helper.from_array(value))


@lowering("arange")
def lower_arange(ctx: LoweringContext, node: Node) -> str:
    start, stop, step, dtype = (node.params[k] for k in ("start", "stop", "step", "dtype"))
    if not isinstance(start, Dim) and not isinstance(stop, Dim):
        return ctx.const(np.arange(start, stop, step, dtype=dtype), hint="arange")
    # Range accepts int16/32/64, float32 and float64: count in a wider type and cast the others.
    wide = dtype if dtype.name in ("int16", "int32", "int64", "float32", "float64") else \
        np.dtype(np.float32 if dtypes.is_float(dtype) else np.int64)
    values = ctx.op("Range", ctx.scalar_dim(start, wide), ctx.scalar_dim(stop, wide), ctx.scalar(step, wide))
    return values if wide == dtype else ctx.op("Cast", values, to=onnx_dtype(dtype))


# -- nn -----------------------------------------------------------------------------------------------


@lowering("softmax")
def lower_softmax(ctx: LoweringContext, node: Node, x: str) -> str:
    return ctx.op("Softmax", x, axis=node.params["axis"])


@lowering("silu")
def lower_silu(ctx: LoweringContext, node: Node, x: str) -> str:
    return ctx.op("Mul", x, ctx.op("Sigmoid", x))


@lowering("gelu")
def lower_gelu(ctx: LoweringContext, node: Node, x: str) -> str:
    approximate = node.params["approximate"]
    if ctx.opset >= 20:
        return ctx.op("Gelu", x, approximate=approximate)
    dtype = node.inputs[0].dtype
    half, one = ctx.scalar(0.5, dtype), ctx.scalar(1.0, dtype)
    if approximate == "tanh":
        cube = ctx.op("Mul", ctx.op("Mul", x, x), x)
        inner = ctx.op("Add", x, ctx.op("Mul", cube, ctx.scalar(0.044715, dtype)))
        gate = ctx.op("Tanh", ctx.op("Mul", inner, ctx.scalar(math.sqrt(2.0 / math.pi), dtype)))
    else:
        gate = ctx.op("Erf", ctx.op("Mul", x, ctx.scalar(1.0 / math.sqrt(2.0), dtype)))
    return ctx.op("Mul", ctx.op("Mul", x, half), ctx.op("Add", gate, one))


@lowering("rms_norm")
def lower_rms_norm(ctx: LoweringContext, node: Node, x: str, weight: str) -> str:
    return custom_op(ctx, "CustomRMSNorm", x, weight, epsilon=float(node.params["eps"]))


@lowering("layer_norm")
def lower_layer_norm(ctx: LoweringContext, node: Node, x: str, weight: str, *bias: str) -> str:
    # Statistics in float32 (stash_type 1, the default) whatever the input dtype, as the reference computes them.
    return ctx.op("LayerNormalization", x, weight, *bias, axis=-1, epsilon=float(node.params["eps"]))


# -- Cloud AI 100 KV-cache ops --------------------------------------------------------------------------


def custom_op(ctx: LoweringContext, op_type: str, *inputs: str, **attrs: Any) -> str:
    ctx.custom_ops.add(op_type)
    return ctx.op(op_type, *inputs, domain=CUSTOM_OP_DOMAINS[op_type], **attrs)


def _suffix(node: Node) -> str:
    return "" if node.inputs[0].ndim == 4 else "3D"


@lowering("ctx_scatter")
def lower_ctx_scatter(ctx: LoweringContext, node: Node, data: str, position_ids: str, updates: str) -> str:
    op_type = "CtxScatter" + _suffix(node)
    if op_type == "CtxScatter3D" and node.inputs[0].dtype == np.int32:
        op_type = "CtxScatter3DInt"  # the compiler's CtxScatter3D is for float caches
    return custom_op(ctx, op_type, data, position_ids, updates)


@lowering("ctx_scatter_cb")
def lower_ctx_scatter_cb(ctx: LoweringContext, node: Node, data: str, batch_index: str, position_ids: str,
                         updates: str) -> str:
    return custom_op(ctx, "CtxScatterCB" + _suffix(node), data, batch_index, position_ids, updates)


def _comp_ctx_len(ctx: LoweringContext, node: Node) -> list[str]:
    """The 4-D gathers take comp_ctx_len (the number of rows read, K) as an int64 scalar input."""
    if _suffix(node):
        return []
    return [ctx.scalar_dim(node.outputs[0].shape[2])]


@lowering("ctx_gather")
def lower_ctx_gather(ctx: LoweringContext, node: Node, data: str, ctx_indices: str) -> str:
    if node.params.get("blocked"):
        return custom_op(ctx, "CtxGatherBlockedKV", data, ctx_indices)
    return custom_op(ctx, "CtxGather" + _suffix(node), data, ctx_indices, *_comp_ctx_len(ctx, node))


@lowering("ctx_gather_cb")
def lower_ctx_gather_cb(ctx: LoweringContext, node: Node, data: str, batch_index: str, ctx_indices: str) -> str:
    if node.params.get("blocked"):
        return custom_op(ctx, "CtxGatherBlockedKVCB", data, batch_index, ctx_indices)
    return custom_op(ctx, "CtxGatherCB" + _suffix(node), data, batch_index, ctx_indices, *_comp_ctx_len(ctx, node))


# -- function calls -----------------------------------------------------------------------------------


@lowering("call")
def lower_call(ctx: LoweringContext, node: Node, *inputs: str) -> list[str]:
    function = node.params["function"]
    ctx.functions_called.add(function.name)
    outs = ctx.op(function.name, *inputs, domain=ctx.local_domain, n_outputs=len(node.outputs))
    return outs if isinstance(outs, list) else [outs]
