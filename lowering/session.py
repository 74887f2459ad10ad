"""The onnxruntime sessions qtrace itself opens (`Lowered.run` / `verify`, generation, the CLI).

onnxruntime's graph optimizer `MatmulTransposeFusion` (extended level) folds a Transpose into the
MatMul that reads it (com.microsoft FusedMatMul) and gets two of qtrace's patterns wrong
(onnxruntime 1.32, CPU):
- a Transpose of the last two axes followed by a MatMul with a 1-D right operand computes wrong values;
- a float16 Transpose(perm=[1, 0, 2]) followed by a MatMul with a constant crashes the process.
Both run correctly with that one optimizer disabled; every other optimization stays on.
tests/test_reliability.py runs both cases through qtrace's sessions.

Idle threads sleep instead of spin-waiting: onnxruntime's default spin burns a core per pool thread
between the small runs qtrace makes (checks, token-by-token generation).
"""

from __future__ import annotations

import os
from typing import Any

# Optimizers that compute wrong values or crash on models qtrace emits (see the module docstring).
DISABLED_OPTIMIZERS = ("MatmulTransposeFusion",)


def inference_session(model: bytes | str | os.PathLike, *, log_severity_level: int = 3,
                      threads: int | None = None) -> Any:
    """An onnxruntime CPU session for a serialized model or a model file, with the optimizers in
    DISABLED_OPTIMIZERS turned off and no spin-waiting; `threads` caps the thread pools."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = log_severity_level
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))
