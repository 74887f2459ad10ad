"""float16 lowering: Cloud AI 100 runs in fp16, so `lower(..., dtype="float16")` turns every float32
value, constant and dtype parameter of the IR into float16 before lowering.

float32 constants are clipped into float16's finite range first (so a large mask value such as
-1e30 becomes -65504 rather than -inf), while -inf and +inf stay infinite. Constants whose data is
not in memory (a checkpoint's memory map, a weight still to convert) are converted only when saved."""

from __future__ import annotations

import numpy as np

from qtrace.ir import Graph, ShapeDtype, Value
from qtrace.weights import convert, is_deferred, lazy_cast

_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)


def _retype(value: Value) -> None:
    if value.dtype == _F32:
        value.aval = ShapeDtype(value.shape, _F16)


def convert_to_float16(graph: Graph) -> Graph:
    """In place: float32 becomes float16 in the graph and in every function body."""
    for g in [graph] + [f.body for f in graph.functions.values()]:
        for value in g.inputs:
            _retype(value)
        for value in g.constants:
            if value.dtype == _F32:
                value.const = lazy_cast(value.const, _F16) if is_deferred(value.const) else \
                    convert(value.const, _F16)
                _retype(value)
        for node in g.nodes:
            if node.params.get("dtype") == _F32:
                node.params["dtype"] = _F16
            for out in node.outputs:
                _retype(out)
    return graph
