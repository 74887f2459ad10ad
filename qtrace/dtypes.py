"""The dtypes qtrace traces, their short names in IR dumps, and numpy's promotion rules.

Promotion follows numpy 2 (NEP 50): a Python scalar is "weak", so `f16_array * 0.5` stays float16
and `i32_array + 1` stays int32. The eager reference and the traced graph therefore agree on dtypes.
"""

from __future__ import annotations

import numpy as np

from .errors import DTypeError, user_location

try:  # bfloat16 is not a numpy dtype; ml_dtypes (a dependency of onnx) provides it.
    from ml_dtypes import bfloat16 as _bfloat16

    bfloat16 = np.dtype(_bfloat16)
except ImportError:  # pragma: no cover - onnx pulls ml_dtypes in
    bfloat16 = None

_SHORT_NAMES = {
    np.dtype("float64"): "f64",
    np.dtype("float32"): "f32",
    np.dtype("float16"): "f16",
    np.dtype("int64"): "i64",
    np.dtype("int32"): "i32",
    np.dtype("int16"): "i16",
    np.dtype("int8"): "i8",
    np.dtype("uint8"): "u8",
    np.dtype("bool"): "bool",
}
if bfloat16 is not None:
    _SHORT_NAMES[bfloat16] = "bf16"

SUPPORTED_DTYPES = frozenset(_SHORT_NAMES)


def canonical_dtype(dtype: object) -> np.dtype:
    """A user's dtype spelling (`"float32"`, `np.float16`, `"bfloat16"`) as a supported np.dtype."""
    if isinstance(dtype, str) and dtype == "bfloat16" and bfloat16 is not None:
        return bfloat16
    try:
        result = np.dtype(dtype)  # type: ignore[call-overload]
    except TypeError:
        raise DTypeError(f"not a dtype: {dtype!r}", location=user_location()) from None
    if result not in SUPPORTED_DTYPES:
        names = ", ".join(sorted(str(d) for d in SUPPORTED_DTYPES))
        raise DTypeError(f"dtype {result} is not supported; qtrace supports {names}", location=user_location())
    return result


def from_short_name(name: str) -> np.dtype:
    """`f32`, `i64`, `bf16`, ... (the IR dump's spelling) or a numpy dtype name, as a supported dtype."""
    for dtype, short in _SHORT_NAMES.items():
        if short == name:
            return dtype
    return canonical_dtype(name)


def short_name(dtype: np.dtype) -> str:
    return _SHORT_NAMES.get(np.dtype(dtype), str(dtype))


def is_float(dtype: np.dtype) -> bool:
    return np.dtype(dtype).kind == "f" or (bfloat16 is not None and np.dtype(dtype) == bfloat16)


def machine_epsilon(dtype: np.dtype) -> float:
    """The gap between 1 and the next representable number of a float dtype (bfloat16: 2**-7)."""
    if bfloat16 is not None and np.dtype(dtype) == bfloat16:
        return 2.0**-7
    return float(np.finfo(dtype).eps)


def is_integer(dtype: np.dtype) -> bool:
    return np.dtype(dtype).kind in "iu"


def is_bool(dtype: np.dtype) -> bool:
    return np.dtype(dtype) == np.bool_


def result_type(*operands: object) -> np.dtype:
    """numpy's result dtype for operands that are dtypes (strong) or Python scalars (weak)."""
    strong = [op for op in operands if isinstance(op, np.dtype)]
    weak = [op for op in operands if not isinstance(op, np.dtype)]
    if bfloat16 is not None and bfloat16 in strong and weak:
        # ml_dtypes' bfloat16 ignores NEP 50 (bf16 * 0.5 is float64): a weak Python scalar keeps a
        # bfloat16 result bfloat16, as it keeps a float16 one float16.
        result = result_type(*strong)
        if result == bfloat16 and all(isinstance(op, (bool, int, float)) for op in weak):
            return result
        operands = (result, *weak)
    try:
        return canonical_dtype(np.result_type(*operands))
    except (TypeError, OverflowError) as exc:
        raise DTypeError(f"cannot combine {', '.join(map(_describe, operands))}: {exc}",
                         location=user_location()) from None


def _describe(operand: object) -> str:
    return short_name(operand) if isinstance(operand, np.dtype) else repr(operand)
