"""float16 lowering: Cloud AI 100 runs in fp16, so `lower(..., dtype="float16")` runs the `float16`
pass first: every float32 value, constant and dtype parameter of the IR (function bodies included)
becomes float16, and the IR dumps show the result like any other pass's.

float32 constants are clipped into float16's finite range first (so a large mask value such as
-1e30 becomes -65504 rather than -inf), while -inf and +inf stay infinite."""

from __future__ import annotations

import numpy as np

from qtrace.ir import Graph, ShapeDtype, Value
from qtrace.passes import register_pass
from qtrace.passes.rewrite import on_every_graph

_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)
_F16_MAX = float(np.finfo(np.float16).max)


def to_float16_array(array: np.ndarray) -> np.ndarray:
    finite = np.isfinite(array)
    clipped = np.where(finite, np.clip(array, -_F16_MAX, _F16_MAX), array)
    return clipped.astype(np.float16)


def _retype(graph: Graph, value: Value) -> int:
    if value.dtype != _F32:
        return 0
    graph.set_type(value, ShapeDtype(value.shape, _F16))
    return 1


def convert_graph_to_float16(graph: Graph) -> int:
    """In place: float32 becomes float16 in one graph; returns how many values and params changed."""
    changed = sum(_retype(graph, value) for value in graph.inputs)
    for value in graph.constants:
        if value.dtype == _F32:
            graph.set_constant_data(value, to_float16_array(value.const))
            changed += 1
    for node in graph.nodes:
        if node.params.get("dtype") == _F32:
            graph.set_param(node, "dtype", _F16)
            changed += 1
        changed += sum(_retype(graph, out) for out in node.outputs)
    return changed


convert_to_float16 = register_pass("float16")(on_every_graph(convert_graph_to_float16))
