"""qtrace: trace numpy-style model functions into an IR, optimize it, lower it to ONNX for
Qualcomm Cloud AI 100.

    import qtrace
    graph = qtrace.trace(fn, (qtrace.ShapeDtype(("batch_size", "seq_len"), "int64"),))
    lowered = qtrace.lower(fn, example_args)   # -> onnx model + compiler side files
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import (CheckError, ConcretizationError, DTypeError, FileError, LoweringError, NonFiniteWeightsWarning,
                     NumericsError, QtraceError, RunError, ShapeError, TraceError,
                     UnsupportedError, UsageError)

__version__ = "0.1.0"

# The rest loads on first use (PEP 562): `import qtrace` costs only the exception types, so the
# `qtrace` command checks its flags, and sets itself up, before it pays for numpy, networkx and onnx.
_LAZY = {"trace": "tracing", "function": "tracing", "scope": "core", "Primitive": "core", "Tracer": "core",
         "Dim": "dims", "Graph": "ir", "ShapeDtype": "ir"}
_SUBMODULES = ("core", "dims", "dtypes", "ir", "tracing", "pytree", "weights", "printer", "passes", "lowering",
               "examples", "cli")


def __getattr__(name: str) -> Any:
    if name in _LAZY or name == "primitives":
        # qtrace.primitives teaches traced values numpy's operators: it loads before anything traces.
        primitives = importlib.import_module(".primitives", __name__)
        if name == "primitives":
            return primitives
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"primitives"} | set(_SUBMODULES))


def lower(*args: Any, **kwargs: Any) -> Any:
    """Trace, optimize and lower a function to ONNX; see `qtrace.lowering.lower`."""
    from .lowering import lower as _lower  # it loads qtrace.primitives too

    return _lower(*args, **kwargs)


__all__ = ["trace", "lower", "function", "scope", "ShapeDtype", "Graph", "Dim", "Primitive", "Tracer",
           "QtraceError", "ShapeError", "DTypeError", "ConcretizationError", "UnsupportedError", "TraceError",
           "LoweringError", "CheckError", "FileError", "NonFiniteWeightsWarning", "UsageError",
           "NumericsError", "RunError", "primitives"]
