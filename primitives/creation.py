"""Array creation with sizes that may be symbolic: arange, full and numpy's zeros/ones/*_like.

numpy's own creation functions cannot see a symbolic size, so models import these instead
(`arange(cache.shape[2])` when that dim is `ctx_len`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from qtrace import dtypes
from qtrace.core import Tracer
from qtrace.dims import Dim, DimLike, canonical_dim, exact_divide
from qtrace.errors import ShapeError
from qtrace.ir import ShapeDtype

from .common import Array, as_array, primitive, scalar_array


def _arange_length(start: DimLike, stop: DimLike, step: int) -> DimLike:
    if not isinstance(start, Dim) and not isinstance(stop, Dim):
        return len(range(start, stop, step)) if isinstance(step, int) else int(np.ceil((stop - start) / step))
    length = exact_divide(stop - start, step)
    if length is None:
        raise ShapeError(f"arange({start}, {stop}, {step}): the length is not a polynomial in the symbolic dims")
    return length


def _arange_rule(*, start: DimLike, stop: DimLike, step: int, dtype: np.dtype) -> ShapeDtype:
    if step == 0:
        raise ShapeError("arange step cannot be zero")
    length = _arange_length(start, stop, step)
    return ShapeDtype((length if isinstance(length, Dim) else max(length, 0),), dtype)


arange_p = primitive("arange", _arange_rule,
                     lambda *, start, stop, step, dtype: np.arange(start, stop, step, dtype=dtype),
                     doc="Evenly spaced values in [start, stop); bounds may be symbolic dims.")


def arange(start: Any, stop: Any = None, step: Any = 1, dtype: Any = None) -> Array:
    """`np.arange`, where start/stop may be symbolic dims (step must be a static number)."""
    if stop is None:
        start, stop = 0, start
    bounds = [canonical_dim(b) if isinstance(b, (Dim, str)) else b for b in (start, stop)]
    if dtype is None:
        is_int = all(isinstance(b, (int, np.integer, Dim)) for b in (*bounds, step))
        dtype = np.int64 if is_int else np.float64
    return arange_p.bind(start=bounds[0], stop=bounds[1], step=step, dtype=dtypes.canonical_dtype(dtype))


def _full_rule(*, shape: tuple[DimLike, ...], fill_value: Any, dtype: np.dtype) -> ShapeDtype:
    return ShapeDtype(shape, dtype)


full_p = primitive("full", _full_rule,
                   lambda *, shape, fill_value, dtype: np.full(shape, fill_value, dtype=dtype),
                   doc="An array of `shape` filled with the static scalar `fill_value`.")


def full(shape: Sequence[Any] | Any, fill_value: Any, dtype: Any = None) -> Array:
    """`np.full`; dims may be symbolic. A traced 0-d fill value is broadcast to the shape."""
    shape = (shape,) if isinstance(shape, (int, np.integer, str, Dim)) else tuple(shape)
    shape = tuple(canonical_dim(d) for d in shape)
    if isinstance(fill_value, (Tracer, np.ndarray)):
        from .elementwise import cast
        from .shape_ops import broadcast_to

        value = as_array(fill_value)
        value = cast(value, dtype) if dtype is not None and value.dtype != np.dtype(dtype) else value
        return broadcast_to(value, shape)
    dtype = dtypes.canonical_dtype(dtype if dtype is not None else np.asarray(fill_value).dtype)
    return full_p.bind(shape=shape, fill_value=scalar_array(fill_value, dtype, op="full").item(), dtype=dtype)


def zeros(shape: Any, dtype: Any = np.float64) -> Array:
    return full(shape, 0, dtype)


def ones(shape: Any, dtype: Any = np.float64) -> Array:
    return full(shape, 1, dtype)


def full_like(x: Any, fill_value: Any, dtype: Any = None, shape: Any = None) -> Array:
    x = as_array(x)
    return full(x.shape if shape is None else shape, fill_value, x.dtype if dtype is None else dtype)


def zeros_like(x: Any, dtype: Any = None, shape: Any = None) -> Array:
    return full_like(x, 0, dtype, shape)


def ones_like(x: Any, dtype: Any = None, shape: Any = None) -> Array:
    return full_like(x, 1, dtype, shape)
