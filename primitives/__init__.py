"""Every qtrace operation, under its numpy name where numpy has one.

A model imports what it needs from here (`from qtrace.primitives import arange, ctx_scatter,
rms_norm`). Called on numpy arrays, each runs its numpy reference; called while tracing, each
records a primitive. Importing this package also teaches traced values numpy's operators and
protocols.
"""

from qtrace.errors import register_library_dir as _register_library_dir

_register_library_dir(__file__)

from . import numpy_api as _numpy_api
from .common import INT32_MAX, PRIMITIVES
from .creation import arange, full, full_like, ones, ones_like, zeros, zeros_like
from .elementwise import (abs, absolute, add, cast, clip, cos, divide, equal, erf, exp, floor_divide, greater,
                          greater_equal, remainder,
                          less, less_equal, log, logical_and, logical_not, logical_or, logical_xor, maximum,
                          minimum, multiply, negative, not_equal, positive, power, reciprocal, rsqrt, sigmoid,
                          sin, sqrt, square, subtract, tanh, true_divide, where)
from .kv_cache import (ctx_gather, ctx_gather_blocked_kv, ctx_gather_blocked_kv_cb, ctx_gather_cb, ctx_scatter,
                       ctx_scatter_cb)
from .linalg import matmul
from .nn import gelu, layer_norm, rms_norm, silu, softmax
from .reductions import amax, amin, argmax, max, mean, min, std, sum, var
from .scan import cumsum
from .sorting import top_k
from .shape_ops import (broadcast_to, concatenate, expand_dims, flatten, gather, getitem, index_put, moveaxis,
                        repeat, reshape, slice, split, squeeze, stack, swapaxes, take, transpose)

_numpy_api.install()

astype = cast

__all__ = [name for name in dir() if not name.startswith("_")]
