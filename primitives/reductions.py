"""Reductions over axes: sum, mean, max, min (with keepdims) and argmax."""

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


def var(x: Any, axis: int | tuple[int, ...] | None = None, dtype: Any = None, out: Any = None, ddof: int = 0,
        keepdims: bool = False, **unsupported: Any) -> Array:
    """numpy `var`: the mean of squared deviations from the mean, over (size - ddof) elements.

    Written out as mean and square (no primitive of its own); ddof needs static sizes on the axes."""
    from .elementwise import cast, multiply, subtract

    if out is not None or unsupported:
        raise UnsupportedError(f"unsupported arguments {['out'] * (out is not None) + list(unsupported)}",
                               op="var", location=user_location())
    x = as_array(x)
    if dtype is not None:
        x = cast(x, dtype)
    elif not dtypes.is_float(x.dtype):
        x = cast(x, np.float64)  # numpy: the variance of integers is float64
    axes = normalize_axes(axis, x.ndim, op="var")
    deviation = subtract(x, mean(x, axes, keepdims=True))
    result = mean(multiply(deviation, deviation), axes, keepdims=keepdims)
    if ddof == 0:
        return result
    count = 1
    for a in axes:
        if not isinstance(x.shape[a], int):
            raise UnsupportedError(f"ddof={ddof} over symbolic dim {x.shape[a]} of {ShapeDtype.of(x)}: the "
                                   "correction n / (n - ddof) needs a static size", op="var", location=user_location())
        count *= x.shape[a]
    if count - ddof <= 0:
        raise ShapeError(f"ddof={ddof} leaves {count - ddof} degrees of freedom over axes {axes} of "
                         f"{ShapeDtype.of(x)}", op="var", location=user_location())
    return multiply(result, count / (count - ddof))


def std(x: Any, axis: int | tuple[int, ...] | None = None, dtype: Any = None, out: Any = None, ddof: int = 0,
        keepdims: bool = False, **unsupported: Any) -> Array:
    """numpy `std`: the square root of `var`."""
    from .elementwise import sqrt

    if out is not None or unsupported:  # named as std, not var, in the error
        raise UnsupportedError(f"unsupported arguments {['out'] * (out is not None) + list(unsupported)}",
                               op="std", location=user_location())
    return sqrt(var(x, axis, dtype, ddof=ddof, keepdims=keepdims))
