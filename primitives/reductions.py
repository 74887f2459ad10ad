"""Reductions over axes: sum, mean, max, min (with keepdims), argmax, and var and std written with them."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from qtrace import dtypes
from qtrace.errors import DTypeError, ShapeError, UnsupportedError, user_location
from qtrace.ir import ShapeDtype

from .common import Array, as_array, normalize_axes, normalize_axis, primitive


def _reduced_shape(x: ShapeDtype, axes: tuple[int, ...], keepdims: bool) -> tuple:
    return tuple(1 if i in axes else d for i, d in enumerate(x.shape) if keepdims or i not in axes)


def _sum_dtype(dtype: np.dtype) -> np.dtype:
    # numpy sums bool and small integers in the default integer type (int64 here).
    return np.dtype(np.int64) if dtypes.is_bool(dtype) or dtypes.is_integer(dtype) else dtype


def _mean_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if not dtypes.is_float(dtype) else dtype


def _same_dtype(dtype: np.dtype) -> np.dtype:
    return dtype


def _reduce_rule(result_dtype: Callable[[np.dtype], np.dtype], nonempty: bool) -> Callable[..., ShapeDtype]:
    def rule(x: ShapeDtype, *, axes: tuple[int, ...], keepdims: bool) -> ShapeDtype:
        for a in axes:
            if not 0 <= a < x.ndim:
                raise ShapeError(f"axis {a} is out of range for {x}")
        if nonempty and any(isinstance(x.shape[a], int) and x.shape[a] == 0 for a in axes):
            raise ShapeError(f"cannot reduce an empty axis of {x} (no identity)")
        return ShapeDtype(_reduced_shape(x, axes, keepdims), result_dtype(x.dtype))

    return rule


def _mean_impl(x: np.ndarray, *, axis: tuple[int, ...], keepdims: bool) -> np.ndarray:
    return np.asarray(np.mean(x, axis=axis, keepdims=keepdims), dtype=_mean_dtype(x.dtype))


_REDUCTIONS = {  # name: (numpy reference, result dtype, needs a non-empty axis)
    "reduce_sum": (np.sum, _sum_dtype, False),
    "reduce_mean": (_mean_impl, _mean_dtype, True),
    "reduce_max": (np.max, _same_dtype, True),
    "reduce_min": (np.min, _same_dtype, True),
}
REDUCTION_PRIMITIVES = {
    name: primitive(name, _reduce_rule(result_dtype, nonempty),
                    lambda x, *, axes, keepdims, _f=impl: np.asarray(_f(x, axis=axes, keepdims=keepdims)),
                    doc=f"{name[7:]} over `axes`")
    for name, (impl, result_dtype, nonempty) in _REDUCTIONS.items()
}


def _reduction(name: str) -> Callable[..., Array]:
    prim = REDUCTION_PRIMITIVES[name]

    def reduce(x: Any, axis: int | tuple[int, ...] | None = None, dtype: Any = None, out: Any = None,
               keepdims: bool = False, **unsupported: Any) -> Array:
        if out is not None or unsupported:
            raise UnsupportedError(f"unsupported arguments {['out'] * (out is not None) + list(unsupported)}",
                                   op=name[7:], location=user_location())
        x = as_array(x)
        if dtype is not None:
            from .elementwise import cast

            x = cast(x, dtype)
        return prim.bind(x, axes=normalize_axes(axis, x.ndim, op=name[7:]), keepdims=bool(keepdims))

    reduce.__name__ = name[7:]
    reduce.__doc__ = f"numpy `{name[7:]}(x, axis=None, keepdims=False)`."
    return reduce


sum, mean, max, min = (_reduction(n) for n in _REDUCTIONS)
amax, amin = max, min


def var(x: Any, axis: int | tuple[int, ...] | None = None, dtype: Any = None, out: Any = None, ddof: int = 0,
        keepdims: bool = False, **unsupported: Any) -> Array:
    """numpy `var`: mean((x - mean(x))**2) over `axis`, times n / (n - ddof). Written with mean, subtract
    and multiply (no primitive of its own), so the fuse pass sees a LayerNorm written with it."""
    if out is not None or unsupported:
        raise UnsupportedError(f"unsupported arguments {['out'] * (out is not None) + list(unsupported)}",
                               op="var", location=user_location())
    x = as_array(x)
    if dtype is not None:
        from .elementwise import cast

        x = cast(x, dtype)
    axes = normalize_axes(axis, x.ndim, op="var")
    centered = x - mean(x, axis=axes, keepdims=True)
    result = mean(centered * centered, axis=axes, keepdims=keepdims)
    if ddof:
        count = 1
        for a in axes:
            if not isinstance(x.shape[a], int):
                raise UnsupportedError(f"var with ddof={ddof} over the symbolic dim {x.shape[a]} of {x.shape}: "
                                       "the correction n / (n - ddof) needs a concrete n", op="var",
                                       location=user_location())
            count *= x.shape[a]
        if count - ddof <= 0:
            raise ShapeError(f"var with ddof={ddof} over {count} elements divides by {count - ddof}",
                             location=user_location())
        result = result * (count / (count - ddof))
    return result


def std(x: Any, axis: int | tuple[int, ...] | None = None, dtype: Any = None, out: Any = None, ddof: int = 0,
        keepdims: bool = False, **unsupported: Any) -> Array:
    """numpy `std`: sqrt(var(x, axis, ddof))."""
    from .elementwise import sqrt

    return sqrt(var(x, axis, dtype, out, ddof, keepdims, **unsupported))


def _argmax_rule(x: ShapeDtype, *, axis: int, keepdims: bool) -> ShapeDtype:
    if dtypes.is_bool(x.dtype):
        raise DTypeError(f"argmax of a bool array is not supported: {x}")
    return ShapeDtype(_reduced_shape(x, (axis,), keepdims), np.int64)


argmax_p = primitive("argmax", _argmax_rule,
                     lambda x, *, axis, keepdims: np.argmax(x, axis=axis, keepdims=keepdims).astype(np.int64),
                     doc="index of the first maximum along `axis`")


def argmax(x: Any, axis: int | None = None, out: Any = None, *, keepdims: bool = False) -> Array:
    """Index (int64) of the first maximum along `axis` (None: of the flattened array)."""
    x = as_array(x)
    if axis is None:
        from .shape_ops import reshape

        flat = argmax_p.bind(reshape(x, (-1,)), axis=0, keepdims=False)
        return reshape(flat, (1,) * x.ndim) if keepdims else flat  # numpy keeps every dim, as 1
    return argmax_p.bind(x, axis=normalize_axis(axis, x.ndim, op="argmax"), keepdims=bool(keepdims))

