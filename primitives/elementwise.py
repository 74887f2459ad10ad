"""Elementwise primitives: unary math, binary arithmetic with broadcasting, comparisons, logical
ops, `where` and `cast`. Each is one table row: name, numpy reference, which dtypes it accepts."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from qtrace import dtypes
from qtrace.core import COMMUTATIVE, ELEMENTWISE
from qtrace.errors import DTypeError, UnsupportedError, user_location
from qtrace.ir import ShapeDtype

from .common import Array, as_array, broadcast_shapes, dtype_of, primitive, promote, require_dtype

# -- cast ---------------------------------------------------------------------------------------------


def _cast_rule(x: ShapeDtype, *, dtype: np.dtype) -> ShapeDtype:
    return ShapeDtype(x.shape, dtype)


cast_p = primitive("cast", _cast_rule, lambda x, *, dtype: x.astype(dtype), traits=(ELEMENTWISE,),
                   doc="Convert to another dtype (numpy `astype` semantics: float to int truncates).")


def cast(x: Any, dtype: Any) -> Array:
    """`x.astype(dtype)`."""
    dtype = dtypes.canonical_dtype(dtype)
    x = as_array(x)
    return cast_p.bind(x, dtype=dtype)


# -- unary --------------------------------------------------------------------------------------------
_FLOAT, _NUMERIC, _BOOL, _INTEGER = "float", "numeric", "bool", "integer"
_KIND_CHECKS: dict[str, tuple[Callable[[np.dtype], bool], str]] = {
    _INTEGER: (lambda d: np.dtype(d).kind in "iu", "an integer array"),
    _FLOAT: (dtypes.is_float, "a floating-point array"),
    _NUMERIC: (lambda d: not dtypes.is_bool(d), "a numeric (non-bool) array"),
    _BOOL: (dtypes.is_bool, "a bool array"),
}


def _unary_rule(kind: str) -> Callable[[ShapeDtype], ShapeDtype]:
    allowed, what = _KIND_CHECKS[kind]

    def rule(x: ShapeDtype) -> ShapeDtype:
        require_dtype(x, allowed, what)
        return x

    return rule


def _quiet(fn: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Run a reference without numpy's overflow warnings (exp(-x) may overflow to inf by design)."""

    def run(*args: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return fn(*args)

    return run


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64)).astype(x.dtype)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    one = np.ones((), x.dtype)
    return (one / (one + np.exp(-x))).astype(x.dtype)


def _rsqrt(x: np.ndarray) -> np.ndarray:
    return (np.ones((), x.dtype) / np.sqrt(x)).astype(x.dtype)


def _reciprocal(x: np.ndarray) -> np.ndarray:
    return (np.ones((), x.dtype) / x).astype(x.dtype)


_UNARY = {  # name: (numpy reference, accepted dtypes, doc)
    "neg": (np.negative, _NUMERIC, "-x"),
    "abs": (np.abs, _NUMERIC, "|x|"),
    "exp": (np.exp, _FLOAT, "e**x"),
    "log": (np.log, _FLOAT, "natural logarithm"),
    "sqrt": (np.sqrt, _FLOAT, "square root"),
    "rsqrt": (_rsqrt, _FLOAT, "1 / sqrt(x)"),
    "reciprocal": (_reciprocal, _FLOAT, "1 / x"),
    "tanh": (np.tanh, _FLOAT, "hyperbolic tangent"),
    "sigmoid": (_sigmoid, _FLOAT, "1 / (1 + exp(-x))"),
    "erf": (_erf, _FLOAT, "the error function"),
    "sin": (np.sin, _FLOAT, "sine"),
    "cos": (np.cos, _FLOAT, "cosine"),
    "logical_not": (np.logical_not, _BOOL, "not x"),
}
UNARY_PRIMITIVES = {
    name: primitive(name, _unary_rule(kind), _quiet(impl), doc=doc, traits=(ELEMENTWISE,))
    for name, (impl, kind, doc) in _UNARY.items()
}


def _unary_function(name: str) -> Callable[[Any], Array]:
    prim = UNARY_PRIMITIVES[name]

    def apply(x: Any) -> Array:
        return prim.bind(as_array(x))

    apply.__name__ = name
    apply.__doc__ = f"Elementwise {prim.__doc__}."
    return apply


negative, abs, exp, log, sqrt, rsqrt, reciprocal, tanh, sigmoid, erf, sin, cos, logical_not = (
    _unary_function(n) for n in _UNARY)
absolute = abs


def positive(x: Any) -> Array:
    """+x (no operation)."""
    return as_array(x)


def square(x: Any) -> Array:
    """x * x."""
    return multiply(x, x)


# -- binary -------------------------------------------------------------------------------------------


def _binary_rule(kind: str, result: str | None = None) -> Callable[[ShapeDtype, ShapeDtype], ShapeDtype]:
    allowed, what = _KIND_CHECKS[kind]

    def rule(x: ShapeDtype, y: ShapeDtype) -> ShapeDtype:
        if x.dtype != y.dtype:
            raise DTypeError(f"operands must have the same dtype, got {x} and {y}")
        require_dtype(x, allowed, what)
        shape = broadcast_shapes(x.shape, y.shape)
        return ShapeDtype(shape, np.bool_ if result == _BOOL else x.dtype)

    return rule


_BINARY = {  # name: (numpy reference, accepted dtypes, result kind, doc)
    "add": (np.add, _NUMERIC, None, "x + y"),
    "sub": (np.subtract, _NUMERIC, None, "x - y"),
    "mul": (np.multiply, _NUMERIC, None, "x * y"),
    "div": (np.divide, _FLOAT, None, "x / y (true division)"),
    "pow": (np.power, _NUMERIC, None, "x ** y"),
    "maximum": (np.maximum, _NUMERIC, None, "elementwise maximum"),
    "minimum": (np.minimum, _NUMERIC, None, "elementwise minimum"),
    "eq": (np.equal, _NUMERIC + "|bool", _BOOL, "x == y"),
    "ne": (np.not_equal, _NUMERIC + "|bool", _BOOL, "x != y"),
    "lt": (np.less, _NUMERIC, _BOOL, "x < y"),
    "le": (np.less_equal, _NUMERIC, _BOOL, "x <= y"),
    "gt": (np.greater, _NUMERIC, _BOOL, "x > y"),
    "ge": (np.greater_equal, _NUMERIC, _BOOL, "x >= y"),
    "logical_and": (np.logical_and, _BOOL, _BOOL, "x and y"),
    "logical_or": (np.logical_or, _BOOL, _BOOL, "x or y"),
    "logical_xor": (np.logical_xor, _BOOL, _BOOL, "x xor y"),
    # Integers only: numpy's float floor division and remainder round differently from any ONNX op.
    "floor_divide": (np.floor_divide, _INTEGER, None, "x // y (integers; rounds toward -inf)"),
    "remainder": (np.remainder, _INTEGER, None, "x % y (integers; the sign of y)"),
}
_KIND_CHECKS[_NUMERIC + "|bool"] = (lambda d: True, "an array")
_COMMUTATIVE = {"add", "mul", "maximum", "minimum", "eq", "ne", "logical_and", "logical_or", "logical_xor"}
BINARY_PRIMITIVES = {
    name: primitive(name, _binary_rule(kind, result), _quiet(impl), doc=doc,
                    traits=(ELEMENTWISE, COMMUTATIVE) if name in _COMMUTATIVE else (ELEMENTWISE,))
    for name, (impl, kind, result, doc) in _BINARY.items()
}


def _binary_function(name: str, float_result: bool = False) -> Callable[[Any, Any], Array]:
    prim = BINARY_PRIMITIVES[name]

    def apply(x: Any, y: Any) -> Array:
        x_, y_ = promote(x, y, op=name)
        if float_result and not dtypes.is_float(x_.dtype):  # numpy: int / int is float64
            x_, y_ = promote(x_, y_, to=np.dtype(np.float64), op=name)
        return prim.bind(x_, y_)

    apply.__name__ = name
    apply.__doc__ = f"Elementwise {prim.__doc__}, with numpy broadcasting and dtype promotion."
    return apply


add, subtract, multiply, power, maximum, minimum = (
    _binary_function(n) for n in ("add", "sub", "mul", "pow", "maximum", "minimum"))
divide = _binary_function("div", float_result=True)
equal, not_equal, less, less_equal, greater, greater_equal = (
    _binary_function(n) for n in ("eq", "ne", "lt", "le", "gt", "ge"))
logical_and, logical_or, logical_xor = (_binary_function(n) for n in ("logical_and", "logical_or", "logical_xor"))
true_divide = divide


def _bool_only(name: str, logical: Callable[[Any, Any], Array]) -> Callable[[Any, Any], Array]:
    """`&`, `|`, `^` are logical on bool arrays; bitwise integer ops are not supported."""

    def apply(x: Any, y: Any) -> Array:
        if not all(dtypes.is_bool(np.result_type(dtype_of(operand))) for operand in (x, y)):
            raise UnsupportedError(f"bitwise {name} on non-bool arrays is not supported (operands "
                                   f"{as_array(x).dtype}, {as_array(y).dtype})", location=user_location())
        return logical(x, y)

    return apply


def invert(x: Any) -> Array:
    """`~x` on a bool array (logical not)."""
    if not dtypes.is_bool(as_array(x).dtype):
        raise UnsupportedError(f"bitwise invert on {as_array(x).dtype} is not supported", location=user_location())
    return logical_not(x)


floor_divide, remainder = _binary_function("floor_divide"), _binary_function("remainder")
mod = remainder


# -- where ----------------------------------------------------------------------------------------------


def _where_rule(condition: ShapeDtype, x: ShapeDtype, y: ShapeDtype) -> ShapeDtype:
    if not dtypes.is_bool(condition.dtype):
        raise DTypeError(f"condition must be bool, got {condition}")
    if x.dtype != y.dtype:
        raise DTypeError(f"branches must have the same dtype, got {x} and {y}")
    return ShapeDtype(broadcast_shapes(condition.shape, x.shape, y.shape), x.dtype)


where_p = primitive("where", _where_rule, np.where, doc="condition ? x : y, broadcasting all three.",
                    traits=(ELEMENTWISE,))


def where(condition: Any, x: Any, y: Any) -> Array:
    """`np.where(condition, x, y)` (the three-argument form)."""
    condition = as_array(condition)
    if not dtypes.is_bool(condition.dtype):
        condition = not_equal(condition, 0)
    x_, y_ = promote(x, y, op="where")
    return where_p.bind(condition, x_, y_)


def clip(x: Any, a_min: Any = None, a_max: Any = None) -> Array:
    """Limit values to [a_min, a_max] (either may be None)."""
    result = as_array(x)
    if a_min is not None:
        result = maximum(result, a_min)
    if a_max is not None:
        result = minimum(result, a_max)
    return result
