"""What every primitive family shares: operands, dtype promotion, broadcasting, axes, and the
one helper that turns a (name, shape rule, numpy reference) triple into a `Primitive`."""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import numpy as np

from qtrace import dtypes
from qtrace.core import PRIMITIVES, Primitive, Tracer, register_primitive  # noqa: F401  (the registry `primitive` fills)
from qtrace.dims import Dim, DimLike, shape_str
from qtrace.errors import DTypeError, QtraceError, ShapeError, user_location
from qtrace.ir import ShapeDtype
from qtrace.weights import ConvertedWeight

Array = Union[np.ndarray, Tracer]
INT32_MAX = 2147483647

def primitive(name: str, shape_rule: Callable[..., Any], impl: Callable[..., Any], *,
              multiple_results: bool = False, doc: str = "", traits: tuple[str, ...] = ()) -> Primitive:
    """Define and register a primitive (once: a second definition with the same name is a bug)."""
    return register_primitive(Primitive(name, shape_rule, impl, multiple_results=multiple_results, doc=doc,
                                        traits=traits))


def is_python_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float)) and not isinstance(x, np.generic)


def as_array(x: Any) -> Array:
    """An operand as a traced value or numpy array (lists and scalars become numpy arrays)."""
    if isinstance(x, (Tracer, np.ndarray, ConvertedWeight)):  # a weight to convert stays unread
        return x
    if isinstance(x, Dim):
        raise ShapeError(f"symbolic dim {x} cannot be used as a value; use qtrace.primitives.arange or "
                         "full to build arrays from symbolic sizes", location=user_location())
    if isinstance(x, int) and not isinstance(x, bool) and not -2**63 <= x < 2**63:
        return scalar_array(x, np.dtype(np.int64))  # numpy would make an object array
    array = np.asarray(x)
    if array.dtype == object:
        raise DTypeError(f"{type(x).__name__} {x!r:.60} is not an array or a number", location=user_location())
    return array


def scalar_array(value: Any, dtype: np.dtype, op: str | None = None) -> np.ndarray:
    """A Python scalar as a 0-d array of `dtype`; a value that does not fit is a DTypeError (numpy
    raises OverflowError)."""
    try:
        return np.asarray(value, dtype=dtype)
    except OverflowError:
        info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
        bounds = f" ({info.min}..{info.max})" if info is not None else ""
        raise DTypeError(f"the Python int {value} does not fit {np.dtype(dtype).name}{bounds}", op=op,
                         location=user_location()) from None


def dtype_of(x: Any) -> Any:
    """A dtype for promotion: the array's dtype, or the Python scalar itself (a weak type)."""
    return x if is_python_scalar(x) else as_array(x).dtype


def promote(*operands: Any, to: np.dtype | None = None, op: str | None = None) -> list[Array]:
    """Bring operands to their common numpy dtype (Python scalars are weak, as in numpy 2); `op`
    names the operation in errors."""
    try:
        target = to if to is not None else dtypes.result_type(*[dtype_of(x) for x in operands])
        return [convert(x, target) for x in operands]
    except QtraceError as exc:
        raise exc.with_context(op, None) from None


def convert(x: Any, dtype: np.dtype) -> Array:
    from .elementwise import cast

    if is_python_scalar(x):
        return scalar_array(x, dtype)
    x = as_array(x)
    return x if x.dtype == dtype else cast(x, dtype)


def broadcast_shapes(*shapes: tuple[DimLike, ...]) -> tuple[DimLike, ...]:
    """numpy broadcasting over ints and symbolic dims (a symbolic dim only matches itself or 1)."""
    ndim = max((len(s) for s in shapes), default=0)
    result: list[DimLike] = []
    for axis in range(ndim):
        dims = [s[axis - ndim + len(s)] for s in shapes if axis - ndim + len(s) >= 0]
        out: DimLike = 1
        for d in dims:
            if isinstance(d, int) and d == 1:
                continue
            if isinstance(out, int) and out == 1:
                out = d
            elif d != out:
                raise ShapeError(f"shapes {' and '.join('[' + shape_str(s) + ']' for s in shapes)} do not "
                                 f"broadcast: dim {d} against {out}")
        result.append(out)
    return tuple(result)


def normalize_axis(axis: int, ndim: int, what: str = "axis", *, op: str | None = None) -> int:
    """A non-negative axis; `op` names the operation in the error."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ShapeError(f"{what} must be an int, got {type(axis).__name__} {axis!r}", op=op,
                         location=user_location())
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ShapeError(f"{what} {axis} is out of range for an array of rank {ndim}", op=op,
                         location=user_location())
    return axis % ndim


def normalize_axes(axis: int | Sequence[int] | None, ndim: int, *, op: str | None = None) -> tuple[int, ...]:
    """Reduction axes as a sorted tuple; None means all."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axes: tuple = (axis,)
    elif isinstance(axis, (tuple, list)):
        axes = tuple(axis)
    else:
        raise ShapeError(f"axis must be an int or a tuple of ints, got {type(axis).__name__} {axis!r}", op=op,
                         location=user_location())
    normalized = tuple(sorted(normalize_axis(a, ndim, op=op) for a in axes))
    if len(set(normalized)) != len(normalized):
        raise ShapeError(f"repeated axis in {axis}", op=op, location=user_location())
    return normalized


def require_dtype(aval: ShapeDtype, allowed: Callable[[np.dtype], bool], what: str) -> None:
    if not allowed(aval.dtype):
        raise DTypeError(f"expects {what}, got {aval}")


def require_integer(aval: ShapeDtype, name: str) -> None:
    if not dtypes.is_integer(aval.dtype):
        raise DTypeError(f"{name} must be an integer array (int32 or int64), got {aval}")


def fmt(*avals: ShapeDtype) -> str:
    return ", ".join(map(str, avals))
