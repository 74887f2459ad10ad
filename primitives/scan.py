"""Running sums along an axis: cumsum (an on-device sampler's top-p needs it). It keeps its
operand's dtype and lowers to one ONNX CumSum, adding in index order like the reference here."""

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
