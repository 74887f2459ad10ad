"""float16 lowering: Cloud AI 100 runs in fp16, so `lower(..., dtype="float16")` turns every float32
value, constant and dtype parameter of the IR into float16 before lowering.

float32 constants are clipped into float16's finite range first (so a large mask value such as
-1e30 becomes -65504 rather than -inf), while -inf and +inf stay infinite."""

from __future__ import annotations

import numpy as np

from qtrace.ir import Graph, ShapeDtype, Value

_F32, _F16 = np.dtype(np.float32), np.dtype(np.float16)
_F16_MAX = float(np.finfo(np.float16).max)


def to_float16_array(array: np.ndarray) -> np.ndarray:
    finite = np.isfinite(array)
    clipped = np.where(finite, np.clip(array, -_F16_MAX, _F16_MAX), array)
    return clipped.astype(np.float16)


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
                value.const = to_float16_array(value.const)
                _retype(value)
        for node in g.nodes:
            if node.params.get("dtype") == _F32:
                node.params["dtype"] = _F16
            for out in node.outputs:
                _retype(out)
    return graph
