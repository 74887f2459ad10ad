"""How numpy reaches qtrace: the Tracer operator table and the `__array_ufunc__` /
`__array_function__` tables, so `x + y`, `np.exp(x)` and `np.concatenate([x, y])` on traced values
record qtrace primitives."""

from __future__ import annotations

from typing import Any

import numpy as np

from qtrace.core import NUMPY_FUNCTIONS, NUMPY_UFUNCS, register_tracer_op

from . import creation, elementwise as ew, linalg, reductions as red, shape_ops as sh

def _astype(x: Any, dtype: Any, copy: bool = True) -> Any:
    return ew.cast(x, dtype)

def _reshape_method(x: Any, *shape: Any, order: str = "C") -> Any:
    return sh.reshape(x, *shape, order=order)

def _transpose_method(x: Any, *axes: Any) -> Any:
    return sh.transpose(x, *axes)

def _np_reshape(a: Any, shape: Any = None, order: str = "C", *, newshape: Any = None, copy: Any = None) -> Any:
    return sh.reshape(a, shape if shape is not None else newshape, order=order)

def _np_transpose(a: Any, axes: Any = None) -> Any:
    return sh.transpose(a, axes)

def _np_where(condition: Any, x: Any = None, y: Any = None) -> Any:
    if x is None or y is None:
        from qtrace.errors import UnsupportedError, user_location

        raise UnsupportedError("one-argument np.where (nonzero) gives a data-dependent shape",
                               location=user_location())
    return ew.where(condition, x, y)

_TRACER_OPS = {
    "add": ew.add, "subtract": ew.subtract, "multiply": ew.multiply, "divide": ew.divide,
    "floor_divide": ew.floor_divide, "mod": ew.mod, "power": ew.power, "matmul": linalg.matmul,
    "logical_and_or_bitwise": ew._bool_only("and", ew.logical_and),
    "logical_or_or_bitwise": ew._bool_only("or", ew.logical_or),
    "logical_xor_or_bitwise": ew._bool_only("xor", ew.logical_xor),
    "less": ew.less, "less_equal": ew.less_equal, "greater": ew.greater, "greater_equal": ew.greater_equal,
    "equal": ew.equal, "not_equal": ew.not_equal, "negative": ew.negative, "positive": ew.positive,
    "abs": ew.abs, "invert": ew.invert,
    "reshape": _reshape_method, "transpose": _transpose_method, "astype": _astype,
    "sum": red.sum, "mean": red.mean, "var": red.var, "std": red.std, "max": red.max, "min": red.min,
    "argmax": red.argmax,
    "copy": sh.copy, "squeeze": sh.squeeze, "swapaxes": sh.swapaxes, "flatten": sh.flatten,
    "__getitem__": sh.getitem, "__setitem__": sh.setitem, "take": sh.take, "clip": ew.clip,
}

_UFUNCS = {
    np.add: ew.add, np.subtract: ew.subtract, np.multiply: ew.multiply, np.divide: ew.divide,
    np.floor_divide: ew.floor_divide, np.remainder: ew.remainder,
    np.power: ew.power, np.maximum: ew.maximum, np.minimum: ew.minimum, np.negative: ew.negative,
    np.positive: ew.positive, np.exp: ew.exp, np.log: ew.log, np.sqrt: ew.sqrt, np.reciprocal: ew.reciprocal,
    np.tanh: ew.tanh, np.sin: ew.sin, np.cos: ew.cos, np.absolute: ew.abs, np.square: ew.square,
    np.equal: ew.equal, np.not_equal: ew.not_equal, np.less: ew.less, np.less_equal: ew.less_equal,
    np.greater: ew.greater, np.greater_equal: ew.greater_equal, np.logical_and: ew.logical_and,
    np.logical_or: ew.logical_or, np.logical_not: ew.logical_not, np.logical_xor: ew.logical_xor,
    np.matmul: linalg.matmul,
}

_FUNCTIONS = {
    np.concatenate: sh.concatenate, np.stack: sh.stack, np.where: _np_where, np.reshape: _np_reshape,
    np.transpose: _np_transpose, np.swapaxes: sh.swapaxes, np.moveaxis: sh.moveaxis,
    np.expand_dims: sh.expand_dims, np.squeeze: sh.squeeze, np.broadcast_to: sh.broadcast_to,
    np.split: sh.split, np.array_split: sh.array_split, np.take: sh.take, np.repeat: sh.repeat,
    np.sum: red.sum, np.mean: red.mean, np.var: red.var, np.std: red.std, np.max: red.max, np.min: red.min,
    np.amax: red.max,
    np.amin: red.min, np.argmax: red.argmax, np.clip: ew.clip, np.matmul: linalg.matmul, np.copy: sh.copy,
    np.zeros_like: creation.zeros_like, np.ones_like: creation.ones_like, np.full_like: creation.full_like,
    np.astype: _astype,
}

def install() -> None:
    for name, fn in _TRACER_OPS.items():
        register_tracer_op(name, fn)
    NUMPY_UFUNCS.update(_UFUNCS)
    NUMPY_FUNCTIONS.update(_FUNCTIONS)
