"""Selection by value: top_k (the k largest entries along an axis and where they are).

Mixture-of-experts routers pick each token's experts with it; ONNX has it as one `TopK` node."""

from __future__ import annotations

from typing import Any

import numpy as np

from qtrace import dtypes
from qtrace.errors import DTypeError, ShapeError
from qtrace.ir import ShapeDtype

from .common import Array, as_array, normalize_axis, primitive


def _top_k_rule(x: ShapeDtype, *, k: int, axis: int) -> list[ShapeDtype]:
    if dtypes.is_bool(x.dtype):
        raise DTypeError(f"top_k of a bool array is not supported: {x}")
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"axis {axis} is out of range for {x}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ShapeError(f"k must be a static int >= 1, got {k!r}")
    dim = x.shape[axis]
    if isinstance(dim, int) and k > dim:
        raise ShapeError(f"k = {k} exceeds dim {axis} of {x}")
    if not isinstance(dim, int) and k > 1:
        # as for x[:k], k entries of a symbolic dim exist only when it is large enough
        raise ShapeError(f"k = {k} entries of symbolic dim {dim} exist only when {dim} >= {k}; make the dim static")
    shape = x.shape[:axis] + (k,) + x.shape[axis + 1:]
    return [ShapeDtype(shape, x.dtype), ShapeDtype(shape, np.int64)]


def _top_k_impl(x: np.ndarray, *, k: int, axis: int) -> list[np.ndarray]:
    # A stable ascending sort of the reversed axis, read backwards, is descending with ties in
    # ascending index order (ONNX TopK's tie rule); np.argsort(-x) would overflow the smallest int.
    n = x.shape[axis]
    descending = n - 1 - np.flip(np.argsort(np.flip(x, axis), axis=axis, kind="stable"), axis)
    indices = np.take(descending, np.arange(k), axis=axis).astype(np.int64)
    return [np.take_along_axis(x, indices, axis), indices]


top_k_p = primitive("top_k", _top_k_rule, _top_k_impl, multiple_results=True,
                    doc="The k largest entries along `axis`, largest first (ties: lower index first), "
                        "and their int64 indices.")


def top_k(x: Any, k: int, axis: int = -1) -> tuple[Array, Array]:
    """(values, indices): the `k` largest entries of `x` along `axis`, in descending order, and
    their positions (int64). Equal entries come in the order of their positions, as ONNX TopK
    orders them. `k` is a static int."""
    x = as_array(x)
    values, indices = top_k_p.bind(x, k=k, axis=normalize_axis(axis, x.ndim))
    return values, indices
