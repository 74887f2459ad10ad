"""qtrace: trace numpy-style model functions into an IR, optimize it, lower it to ONNX for
Qualcomm Cloud AI 100.

    import qtrace
    graph = qtrace.trace(fn, (qtrace.ShapeDtype(("batch_size", "seq_len"), "int64"),))
    lowered = qtrace.lower(fn, example_args)   # -> onnx model + compiler side files
"""

from __future__ import annotations

from typing import Any

from . import primitives  # noqa: F401  (fills the Tracer operator tables)
from .core import Primitive, Tracer, scope
from .dims import Dim
from .errors import (CheckError, ConcretizationError, DTypeError, FileError, LoweringError, NonFiniteWeightsWarning,
                     NumericsError, QtraceError, RunError, ShapeError, TraceError,
                     UnsupportedError, UsageError)
from .ir import Graph, ShapeDtype
from .tracing import function, trace

__version__ = "0.1.0"


def lower(*args: Any, **kwargs: Any) -> Any:
    """Trace, optimize and lower a function to ONNX; see `qtrace.lowering.lower`."""
    from .lowering import lower as _lower

    return _lower(*args, **kwargs)


__all__ = ["trace", "lower", "function", "scope", "ShapeDtype", "Graph", "Dim", "Primitive", "Tracer",
           "QtraceError", "ShapeError", "DTypeError", "ConcretizationError", "UnsupportedError", "TraceError",
           "LoweringError", "CheckError", "FileError", "NonFiniteWeightsWarning", "UsageError",
           "NumericsError", "RunError", "primitives"]
