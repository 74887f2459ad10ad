"""Neural-network primitives the accelerator runs as single ops: softmax, silu, gelu, rms_norm,
layer_norm.

Fusion rewrites the written-out forms of these (e.g. `x * sigmoid(x)`) into these primitives."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qtrace import dtypes
from qtrace.errors import DTypeError, ShapeError
from qtrace.ir import ShapeDtype

from .common import Array, as_array, normalize_axis, primitive, promote, require_dtype
from .elementwise import UNARY_PRIMITIVES


def _float_rule(x: ShapeDtype, **_: Any) -> ShapeDtype:
    require_dtype(x, dtypes.is_float, "a floating-point array")
    return x


def _softmax_impl(x: np.ndarray, *, axis: int) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype)


def _softmax_rule(x: ShapeDtype, *, axis: int) -> ShapeDtype:
    _float_rule(x)
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"axis {axis} is out of range for {x}")
    return x


softmax_p = primitive("softmax", _softmax_rule, _softmax_impl, doc="exp(x - max) / sum(exp(x - max)) along `axis`.")


def softmax(x: Any, axis: int = -1) -> Array:
    """Softmax along `axis` (numerically stable: the max is subtracted first)."""
    x = as_array(x)
    return softmax_p.bind(x, axis=normalize_axis(axis, x.ndim, op="softmax"))


def _silu_impl(x: np.ndarray) -> np.ndarray:
    return (x * UNARY_PRIMITIVES["sigmoid"].impl(x)).astype(x.dtype)


silu_p = primitive("silu", _float_rule, _silu_impl, doc="x * sigmoid(x) (also called swish).")


def silu(x: Any) -> Array:
    """x * sigmoid(x)."""
    return silu_p.bind(as_array(x))


def _gelu_impl(x: np.ndarray, *, approximate: str) -> np.ndarray:
    wide = x.astype(np.float64)
    if approximate == "tanh":
        inner = math.sqrt(2.0 / math.pi) * (wide + 0.044715 * wide**3)
        out = 0.5 * wide * (1.0 + np.tanh(inner))
    else:
        out = 0.5 * wide * (1.0 + UNARY_PRIMITIVES["erf"].impl(wide / math.sqrt(2.0)))
    return out.astype(x.dtype)


def _gelu_rule(x: ShapeDtype, *, approximate: str) -> ShapeDtype:
    if approximate not in ("none", "tanh"):
        raise ShapeError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _float_rule(x)


gelu_p = primitive("gelu", _gelu_rule, _gelu_impl,
                   doc="0.5 x (1 + erf(x / sqrt 2)), or the tanh approximation.")


def gelu(x: Any, approximate: str | bool = "none") -> Array:
    """GELU; `approximate="tanh"` (or True) for the tanh form."""
    mode = "tanh" if approximate is True or approximate == "tanh" else "none" if approximate in (False, "none") else approximate
    return gelu_p.bind(as_array(x), approximate=mode)


def _rms_norm_impl(x: np.ndarray, weight: np.ndarray, *, eps: float) -> np.ndarray:
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    return (weight * (x / np.sqrt(mean_square + np.asarray(eps, x.dtype)))).astype(x.dtype)


def _rms_norm_rule(x: ShapeDtype, weight: ShapeDtype, *, eps: float) -> ShapeDtype:
    _float_rule(x)
    if weight.dtype != x.dtype:
        raise DTypeError(f"weight {weight} must have the dtype of the input {x}")
    if x.ndim == 0 or weight.shape != x.shape[-1:]:
        raise ShapeError(f"weight {weight} must be 1-D with the size of the last dim of {x}")
    if not isinstance(eps, float) or eps < 0:
        raise ShapeError(f"eps must be a non-negative float, got {eps!r}")
    return x


rms_norm_p = primitive("rms_norm", _rms_norm_rule, _rms_norm_impl,
                       doc="weight * x / sqrt(mean(x**2, -1) + eps) (CustomRMSNorm on Cloud AI 100).")


def rms_norm(x: Any, weight: Any, eps: float = 1e-6) -> Array:
    """RMS normalization over the last dim, scaled by `weight`."""
    x_, weight_ = promote(x, weight, op="rms_norm")
    return rms_norm_p.bind(x_, weight_, eps=float(eps))


def _layer_norm_impl(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, *, eps: float) -> np.ndarray:
    # Statistics in float64: at least as exact as ONNX LayerNormalization's float32 (stash_type 1) and torch's.
    wide = x.astype(np.float64)
    centered = wide - np.mean(wide, axis=-1, keepdims=True)
    variance = np.mean(centered * centered, axis=-1, keepdims=True)
    normed = (centered / np.sqrt(variance + np.asarray(eps, wide.dtype))).astype(x.dtype)
    out = normed * weight
    return (out if bias is None else out + bias).astype(x.dtype)


def _layer_norm_rule(x: ShapeDtype, weight: ShapeDtype, bias: ShapeDtype | None = None, *, eps: float) -> ShapeDtype:
    _float_rule(x)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if param.dtype != x.dtype:
            raise DTypeError(f"{name} {param} must have the dtype of the input {x}")
        if x.ndim == 0 or param.shape != x.shape[-1:]:
            raise ShapeError(f"{name} {param} must be 1-D with the size of the last dim of {x}")
    if not isinstance(eps, float) or not eps >= 0:
        raise ShapeError(f"eps must be a non-negative float, got {eps!r}")
    return x


layer_norm_p = primitive("layer_norm", _layer_norm_rule, _layer_norm_impl,
                         doc="(x - mean) / sqrt(var + eps) * weight (+ bias) over the last dim "
                             "(ONNX LayerNormalization).")


def layer_norm(x: Any, weight: Any, bias: Any = None, eps: float = 1e-5) -> Array:
    """Layer normalization over the last dim: (x - mean(x)) / sqrt(var(x) + eps) * weight + bias, with
    the biased variance (as torch.nn.LayerNorm); `bias` may be None."""
    operands = promote(x, weight) if bias is None else promote(x, weight, bias)
    return layer_norm_p.bind(*operands, eps=float(eps))
