"""Ordering and running sums along an axis: top_k and cumsum (what an on-device sampler needs).

Both keep the dtype of their operand (top_k's indices are int64) and lower to one ONNX operator
each (TopK, CumSum) with the same tie and accumulation rules as the references here:
- top_k returns the k largest values in descending order; equal values keep their index order
  (the lower index first), which is ONNX TopK's documented tie-break;
- cumsum adds in index order, in the operand's dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qtrace import dtypes
from qtrace.errors import DTypeError, ShapeError, user_location
from qtrace.ir import ShapeDtype

from .common import Array, as_array, normalize_axis, primitive


def _numeric(x: ShapeDtype, what: str) -> None:
    if not (dtypes.is_float(x.dtype) or dtypes.is_integer(x.dtype)):
        raise DTypeError(f"{what} needs a float or integer array, got {x}")


def _top_k_rule(x: ShapeDtype, *, k: int, axis: int) -> list[ShapeDtype]:
    _numeric(x, "top_k")
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"axis {axis} is out of range for {x}")
    if k < 1 or (isinstance(x.shape[axis], int) and k > x.shape[axis]):
        raise ShapeError(f"top_k: k={k} must be between 1 and dim {axis} of {x}")
    shape = x.shape[:axis] + (k,) + x.shape[axis + 1:]
    return [ShapeDtype(shape, x.dtype), ShapeDtype(shape, np.int64)]


def _descending_order(x: np.ndarray, axis: int) -> np.ndarray:
    # A stable sort of an order-reversing key keeps equal values in index order. ~v = -v - 1
    # reverses integers without overflow; floats are negated.
    key = ~x if x.dtype.kind in "iu" else -x
    return np.argsort(key, axis=axis, kind="stable")


def _top_k_impl(x: np.ndarray, *, k: int, axis: int) -> list[np.ndarray]:
    order = np.take(_descending_order(x, axis), np.arange(k), axis=axis)
    return [np.take_along_axis(x, order, axis=axis), order.astype(np.int64)]


top_k_p = primitive("top_k", _top_k_rule, _top_k_impl, multiple_results=True,
                    doc="The k largest values along `axis`, descending (ties: lower index first), and their indices.")


def top_k(x: Any, k: int, axis: int = -1) -> tuple[Array, Array]:
    """(values, indices): the `k` largest entries along `axis` in descending order, equal values in
    index order; indices are int64. `k` is a static int (ONNX TopK; the compiler needs it fixed)."""
    x = as_array(x)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ShapeError(f"top_k: k must be a static int, got {k!r}", location=user_location())
    values, indices = top_k_p.bind(x, k=int(k), axis=normalize_axis(axis, x.ndim))
    return values, indices


def _cumsum_rule(x: ShapeDtype, *, axis: int) -> ShapeDtype:
    _numeric(x, "cumsum")
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"axis {axis} is out of range for {x}")
    return x


cumsum_p = primitive("cumsum", _cumsum_rule, lambda x, *, axis: np.cumsum(x, axis=axis, dtype=x.dtype),
                     doc="Running sum along `axis`, in index order and in the operand's dtype.")


def cumsum(x: Any, axis: int = -1) -> Array:
    """numpy `cumsum(x, axis)` keeping x's dtype (numpy would widen small integers)."""
    x = as_array(x)
    if x.ndim == 0:
        raise ShapeError(f"cumsum needs an array of rank >= 1, got {ShapeDtype.of(x)}", location=user_location())
    return cumsum_p.bind(x, axis=normalize_axis(axis, x.ndim))
