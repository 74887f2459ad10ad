"""Matrix multiplication (batched, broadcasting, numpy's 1-D rules)."""

from __future__ import annotations

from typing import Any

import numpy as np

from qtrace import dtypes
from qtrace.errors import DTypeError, ShapeError
from qtrace.ir import ShapeDtype

from .common import Array, broadcast_shapes, primitive, promote


def _matmul_rule(a: ShapeDtype, b: ShapeDtype) -> ShapeDtype:
    if a.dtype != b.dtype:
        raise DTypeError(f"operands must have the same dtype, got {a} @ {b}")
    if dtypes.is_bool(a.dtype):
        raise DTypeError(f"bool operands are not supported: {a} @ {b}")
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"operands must have at least one dimension: {a} @ {b}")
    a_shape = a.shape if a.ndim > 1 else (1,) + a.shape
    b_shape = b.shape if b.ndim > 1 else b.shape + (1,)
    if a_shape[-1] != b_shape[-2]:
        raise ShapeError(f"contracting dims differ: {a} @ {b}")
    try:
        batch = broadcast_shapes(a_shape[:-2], b_shape[:-2])
    except ShapeError:
        raise ShapeError(f"batch dims do not broadcast: {a} @ {b}") from None
    shape = batch + (a_shape[-2],) * (a.ndim > 1) + (b_shape[-1],) * (b.ndim > 1)
    return ShapeDtype(shape, a.dtype)


matmul_p = primitive("matmul", _matmul_rule, np.matmul, doc="numpy matmul: batched, broadcasting.")


def matmul(a: Any, b: Any) -> Array:
    """`a @ b` with numpy's rules (batch dims broadcast; 1-D operands are vectors)."""
    a_, b_ = promote(a, b, op="matmul")
    return matmul_p.bind(a_, b_)
