"""float16 lowering: Cloud AI 100 runs in fp16, so `lower(..., dtype="float16")` runs the `float16`
pass first: every float32 value, constant and dtype parameter of the IR (function bodies included)
becomes float16, and the IR dumps show the result like any other pass's.

float32 constants are clipped into float16's finite range first (so a large mask value such as
-1e30 becomes -65504 rather than -inf), while -inf and +inf stay infinite. Constants whose data is
not in memory (a checkpoint's memory map, a weight still to convert) are converted only when saved."""

from __future__ import annotations

import numpy as np

from qtrace.ir import Graph, ShapeDtype, Value
from qtrace.passes import register_pass
from qtrace.passes.rewrite import on_every_graph
from qtrace.weights import convert, is_deferred, lazy_cast

_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)


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
            data = lazy_cast(value.const, _F16) if is_deferred(value.const) else convert(value.const, _F16)
            graph.set_constant_data(value, data)
            changed += 1
    for node in graph.nodes:
        if node.params.get("dtype") == _F32:
            graph.set_param(node, "dtype", _F16)
            changed += 1
        changed += sum(_retype(graph, out) for out in node.outputs)
    return changed


convert_to_float16 = register_pass("float16")(on_every_graph(convert_graph_to_float16))
