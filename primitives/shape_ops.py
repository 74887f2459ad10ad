"""Shape and indexing primitives: reshape, transpose, broadcast_to, squeeze, expand_dims,
concatenate, split, slice, take, gather and index_put, plus numpy indexing (`x[...]`, `x[...] = v`)
expressed with them."""

from __future__ import annotations

import builtins
import functools
import operator
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from qtrace import dtypes
from qtrace.core import Tracer, current_trace
from qtrace.dims import Dim, DimLike, canonical_dim, dim_product, exact_divide, shape_str
from qtrace.errors import DTypeError, ShapeError, UnsupportedError, user_location
from qtrace.ir import ShapeDtype

from .common import Array, as_array, broadcast_shapes, normalize_axis, primitive, promote, require_integer

# -- numpy views ----------------------------------------------------------------------------------------
# numpy returns views for basic indexing, reshape, transpose, squeeze, expand_dims and broadcast_to: an
# assignment into the base changes the view and the other way round. qtrace values never alias, so
# the trace notes which values numpy would alias (only for calls from the user's code: repeat or
# flatten use reshape inside, but numpy gives copies for them), and tracing refuses an assignment
# whose effect through a view would be read afterwards (qtrace.tracing.check_view_writes).

_DISPATCH_FILES = (os.path.join("qtrace", "core.py"), "numpy_api.py", "functools.py", "<__array_function__ internals>")
_PRIMITIVES_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_NUMPY_DIR = os.path.dirname(os.path.abspath(np.__file__)) + os.sep


def _called_by_user(frame: Any) -> bool:
    """Whether a call comes from outside qtrace.primitives (skipping numpy's and qtrace's dispatch)."""
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_NUMPY_DIR) or filename.endswith(_DISPATCH_FILES):
            frame = frame.f_back
            continue
        return not os.path.abspath(filename).startswith(_PRIMITIVES_DIR)
    return True


def note_view(result: Any, base: Any, region: Any = None) -> None:
    """Record that numpy would give `result` as a view of `base` (region: per-axis slices of the base)."""
    trace = current_trace()
    if trace is None or not isinstance(result, Tracer) or not isinstance(base, Tracer) or result is base:
        return
    if _called_by_user(sys._getframe(2)):
        trace.views[result.value] = (base.value, region, user_location())


def _view(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A function numpy answers with a view of its first argument (the whole of it)."""

    @functools.wraps(fn)
    def view(x: Any, *args: Any, **kwargs: Any) -> Any:
        result = fn(x, *args, **kwargs)
        trace = current_trace()
        if trace is not None and isinstance(result, Tracer) and isinstance(x, Tracer) and result is not x \
                and _called_by_user(sys._getframe(1)):
            trace.views[result.value] = (x.value, None, user_location())
        return result

    return view


# -- reshape ------------------------------------------------------------------------------------------


def _reshape_rule(x: ShapeDtype, *, shape: tuple[DimLike, ...]) -> ShapeDtype:
    if dim_product(shape) != dim_product(x.shape):
        raise ShapeError(f"cannot reshape {x} to [{shape_str(shape)}]: sizes differ")
    return ShapeDtype(shape, x.dtype)


reshape_p = primitive("reshape", _reshape_rule, lambda x, *, shape: x.reshape(shape),
                      doc="Same elements in row-major order, new shape.")


def _resolve_shape(x: Array, shape: Sequence[Any]) -> tuple[DimLike, ...]:
    dims: list[Any] = []
    unknown = None
    for i, d in enumerate(shape):
        if isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d == -1:
            if unknown is not None:
                raise ShapeError(f"reshape of {ShapeDtype.of(x)}: only one -1 is allowed in {tuple(shape)}")
            unknown = i
            dims.append(1)
        else:
            dims.append(canonical_dim(d))
    if unknown is not None:
        inferred = exact_divide(dim_product(x.shape), dim_product(dims))
        if inferred is None:
            raise ShapeError(f"reshape of {ShapeDtype.of(x)} to {tuple(map(str, shape))}: the -1 dim is not a "
                             "whole number of elements")
        dims[unknown] = inferred
    return tuple(dims)


@_view
def reshape(x: Any, *shape: Any, order: str = "C") -> Array:
    """`x.reshape(shape)`; dims may be symbolic and one may be -1."""
    if order != "C":
        raise UnsupportedError(f"order {order!r} is not supported (only 'C')", op="reshape",
                               location=user_location())
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    x = as_array(x)
    try:
        resolved = _resolve_shape(x, shape)
    except ShapeError as exc:
        raise exc.with_context("reshape", user_location()) from None
    return reshape_p.bind(x, shape=resolved)


def flatten(x: Any) -> Array:
    return reshape(x, (-1,))


# -- transpose ----------------------------------------------------------------------------------------


def _transpose_rule(x: ShapeDtype, *, perm: tuple[int, ...]) -> ShapeDtype:
    if sorted(perm) != list(range(x.ndim)):
        raise ShapeError(f"perm {perm} is not a permutation of the axes of {x}")
    return ShapeDtype(tuple(x.shape[p] for p in perm), x.dtype)


transpose_p = primitive("transpose", _transpose_rule, lambda x, *, perm: np.transpose(x, perm),
                        doc="Permute axes: out.shape[i] = x.shape[perm[i]].")


@_view
def transpose(x: Any, *axes: Any) -> Array:
    """`np.transpose(x, axes)` (reverse the axes when none are given)."""
    if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))):
        axes = tuple(axes[0]) if axes[0] is not None else ()
    x = as_array(x)
    perm = tuple(normalize_axis(a, x.ndim, op="transpose") for a in axes) if axes else tuple(reversed(range(x.ndim)))
    return transpose_p.bind(x, perm=perm)


@_view
def swapaxes(x: Any, axis1: int, axis2: int) -> Array:
    x = as_array(x)
    perm = list(range(x.ndim))
    a, b = normalize_axis(axis1, x.ndim, op="swapaxes"), normalize_axis(axis2, x.ndim, op="swapaxes")
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(x, perm)


@_view
def moveaxis(x: Any, source: int, destination: int) -> Array:
    x = as_array(x)
    perm = list(range(x.ndim))
    perm.insert(normalize_axis(destination, x.ndim, op="moveaxis"), perm.pop(normalize_axis(source, x.ndim, op="moveaxis")))
    return transpose(x, perm)


# -- broadcast_to, squeeze, expand_dims ---------------------------------------------------------------


def _broadcast_to_rule(x: ShapeDtype, *, shape: tuple[DimLike, ...]) -> ShapeDtype:
    try:
        fits = len(shape) >= x.ndim and broadcast_shapes(x.shape, shape) == tuple(shape)
    except ShapeError:
        fits = False
    if not fits:
        raise ShapeError(f"cannot broadcast {x} to [{shape_str(shape)}]")
    return ShapeDtype(shape, x.dtype)


broadcast_to_p = primitive("broadcast_to", _broadcast_to_rule,
                           lambda x, *, shape: np.broadcast_to(x, shape).copy(),
                           doc="Repeat size-1 (and missing leading) dims to `shape`.")


@_view
def broadcast_to(x: Any, shape: Sequence[Any]) -> Array:
    """`np.broadcast_to(x, shape)`; dims may be symbolic."""
    shape = (shape,) if isinstance(shape, (int, str, Dim)) else shape
    return broadcast_to_p.bind(as_array(x), shape=tuple(canonical_dim(d) for d in shape))


def _squeeze_rule(x: ShapeDtype, *, axes: tuple[int, ...]) -> ShapeDtype:
    for a in axes:
        if not 0 <= a < x.ndim or x.shape[a] != 1:
            raise ShapeError(f"cannot squeeze axis {a} of {x}: its size is not 1")
    return ShapeDtype(tuple(d for i, d in enumerate(x.shape) if i not in axes), x.dtype)


squeeze_p = primitive("squeeze", _squeeze_rule, lambda x, *, axes: np.squeeze(x, axis=axes),
                      doc="Remove the size-1 dims `axes`.")


@_view
def squeeze(x: Any, axis: int | Sequence[int] | None = None) -> Array:
    x = as_array(x)
    if axis is None:
        axes = tuple(i for i, d in enumerate(x.shape) if isinstance(d, int) and d == 1)
    else:
        requested = (axis,) if isinstance(axis, (int, np.integer)) else axis
        axes = tuple(sorted({normalize_axis(a, x.ndim, op="squeeze") for a in requested}))
    return squeeze_p.bind(x, axes=axes) if axes else x


def _expand_dims_rule(x: ShapeDtype, *, axes: tuple[int, ...]) -> ShapeDtype:
    shape = list(x.shape)
    for a in axes:  # sorted ascending: positions in the output
        shape.insert(a, 1)
    return ShapeDtype(tuple(shape), x.dtype)


expand_dims_p = primitive("expand_dims", _expand_dims_rule, lambda x, *, axes: np.expand_dims(x, axes),
                          doc="Insert size-1 dims at output positions `axes`.")


@_view
def expand_dims(x: Any, axis: int | Sequence[int]) -> Array:
    x = as_array(x)
    axis = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out_ndim = x.ndim + len(axis)
    axes = tuple(sorted(normalize_axis(a, out_ndim, op="expand_dims") for a in axis))
    if len(set(axes)) != len(axes):
        raise ShapeError(f"expand_dims: repeated axis in {axis}", location=user_location())
    return expand_dims_p.bind(x, axes=axes)


# -- concatenate, stack, split ------------------------------------------------------------------------


def _concatenate_rule(*xs: ShapeDtype, axis: int) -> ShapeDtype:
    first = xs[0]
    for x in xs[1:]:
        if x.dtype != first.dtype:
            raise DTypeError(f"operands must have the same dtype: {', '.join(map(str, xs))}")
        if x.ndim != first.ndim or any(a != b for i, (a, b) in enumerate(zip(x.shape, first.shape)) if i != axis):
            raise ShapeError(f"shapes differ off axis {axis}: {', '.join(map(str, xs))}")
    total: DimLike = 0
    for x in xs:
        total = total + x.shape[axis]
    return ShapeDtype(first.shape[:axis] + (total,) + first.shape[axis + 1:], first.dtype)


concatenate_p = primitive("concatenate", _concatenate_rule,
                          lambda *xs, axis: np.concatenate(xs, axis=axis),
                          doc="Join arrays along `axis`.")


def concatenate(arrays: Sequence[Any], axis: int = 0, out: Any = None, dtype: Any = None) -> Array:
    arrays = list(arrays)
    if not arrays:
        raise ShapeError("concatenate needs at least one array", location=user_location())
    target = None if dtype is None else dtypes.canonical_dtype(dtype)
    ops = promote(*arrays, to=target, op="concatenate")
    ndim = ops[0].ndim
    if ndim == 0:
        raise ShapeError("zero-dimensional arrays cannot be concatenated", location=user_location())
    return concatenate_p.bind(*ops, axis=normalize_axis(axis, ndim, op="concatenate"))


def stack(arrays: Sequence[Any], axis: int = 0) -> Array:
    arrays = [as_array(a) for a in arrays]
    if not arrays:
        raise ShapeError("stack needs at least one array", location=user_location())
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ShapeError(f"arrays must have one shape, got {', '.join(str(ShapeDtype.of(a)) for a in arrays)}",
                         op="stack", location=user_location())
    axis = normalize_axis(axis, arrays[0].ndim + 1, op="stack")
    return concatenate([expand_dims(a, axis) for a in arrays], axis=axis)


def _split_rule(x: ShapeDtype, *, sizes: tuple[DimLike, ...], axis: int) -> list[ShapeDtype]:
    total: DimLike = 0
    for s in sizes:
        total = total + s
    if total != x.shape[axis]:
        raise ShapeError(f"sizes {tuple(map(str, sizes))} do not add up to dim {axis} of {x}")
    return [ShapeDtype(x.shape[:axis] + (s,) + x.shape[axis + 1:], x.dtype) for s in sizes]


def _split_impl(x: np.ndarray, *, sizes: tuple[int, ...], axis: int) -> list[np.ndarray]:
    bounds = np.cumsum(sizes)[:-1]
    return [part.copy() for part in np.split(x, bounds, axis=axis)]


split_p = primitive("split", _split_rule, _split_impl, multiple_results=True,
                    doc="Cut along `axis` into pieces of the given sizes.")


def split(x: Any, indices_or_sections: int | Sequence[int], axis: int = 0) -> list[Array]:
    """`np.split`: a number of equal sections or a list of cut indices."""
    x = as_array(x)
    axis = normalize_axis(axis, x.ndim, op="split")
    dim = x.shape[axis]
    if isinstance(indices_or_sections, (int, np.integer)):
        size = exact_divide(dim, int(indices_or_sections))
        if size is None:
            raise ShapeError(f"split: dim {axis} of {ShapeDtype.of(x)} does not divide into "
                             f"{indices_or_sections} equal sections", location=user_location())
        sizes: tuple[DimLike, ...] = (size,) * int(indices_or_sections)
    else:
        cuts = [0] + [int(i) for i in indices_or_sections]
        if any(b < a for a, b in zip(cuts, cuts[1:])):
            raise ShapeError(f"split indices must be increasing, got {list(indices_or_sections)}",
                             location=user_location())
        sizes = tuple(b - a for a, b in zip(cuts, cuts[1:])) + (dim - cuts[-1],)
    return list(split_p.bind(x, sizes=sizes, axis=axis))


def array_split(x: Any, indices_or_sections: Any, axis: int = 0) -> list[Array]:
    return split(x, indices_or_sections, axis)


# -- slice --------------------------------------------------------------------------------------------
# A slice is stored per axis as (start, stop, step) in Python's convention (None = open end,
# negative = from the end), so a symbolic dim never has to become an int.


def _slice_length(dim: DimLike, start: int | None, stop: int | None, step: int) -> DimLike:
    if isinstance(dim, int):
        return len(range(*builtins.slice(start, stop, step).indices(dim)))
    if step == -1 and start is None and stop is None:  # a reversal keeps the length
        return dim
    if step != 1:
        raise ShapeError(f"a strided slice ({start}:{stop}:{step}) of symbolic dim {dim} has no polynomial size")

    def position(index: int | None, default: DimLike) -> DimLike:
        if index is None:
            return default
        return index if index >= 0 else dim + index

    length = position(stop, dim) - position(start, 0)
    if isinstance(length, int) and length > 1:
        # e.g. x[:5] on a dim n: min(n, 5) rows, which no single size describes for every n (symbolic
        # dims are at least 1, as in JAX, so x[-1:] and x[:, -1] are exact)
        raise ShapeError(f"slice {start}:{stop} of symbolic dim {dim} has {length} elements only when {dim} is "
                         f"large enough; slice relative to the dim (x[:n-1], x[1:]) or make the dim static")
    return length


def _slice_rule(x: ShapeDtype, *, slices: tuple[tuple[int | None, int | None, int], ...]) -> ShapeDtype:
    if len(slices) != x.ndim:
        raise ShapeError(f"{len(slices)} slices for {x}")
    shape = []
    for dim, (start, stop, step) in zip(x.shape, slices):
        if step == 0:
            raise ShapeError("slice step cannot be zero")
        shape.append(_slice_length(dim, start, stop, step))
    return ShapeDtype(tuple(shape), x.dtype)


slice_p = primitive("slice", _slice_rule,
                    lambda x, *, slices: x[tuple(builtins.slice(*s) for s in slices)].copy(),
                    doc="Basic slicing: per axis (start, stop, step) in Python's convention.")


def slice(x: Any, slices: Sequence[builtins.slice | None]) -> Array:  # noqa: A001 - numpy-style name
    x = as_array(x)
    full = [(s.start, s.stop, 1 if s.step is None else s.step) if s is not None else (None, None, 1)
            for s in slices] + [(None, None, 1)] * (x.ndim - len(slices))
    full = [tuple(_static_index(v) if v is not None else None for v in f) for f in full]  # before comparing
    if all(f == (None, None, 1) for f in full):
        return x
    return slice_p.bind(x, slices=tuple(full))


def _static_index(value: Any) -> int:
    if isinstance(value, Tracer):
        raise UnsupportedError("a slice bound must be a static int; a traced slice bound gives a data-dependent "
                               "shape (use take / gather with index arrays instead)", location=user_location())
    try:
        return operator.index(value)
    except TypeError:
        raise ShapeError(f"slice bounds must be ints, got {value!r}", location=user_location()) from None


# -- take and gather (advanced indexing) --------------------------------------------------------------


def _take_rule(x: ShapeDtype, indices: ShapeDtype, *, axis: int) -> ShapeDtype:
    require_integer(indices, "indices")
    if not 0 <= axis < x.ndim:
        raise ShapeError(f"axis {axis} is out of range for {x}")
    return ShapeDtype(x.shape[:axis] + indices.shape + x.shape[axis + 1:], x.dtype)


take_p = primitive("take", _take_rule, lambda x, indices, *, axis: np.take(x, indices, axis=axis),
                   doc="Pick entries along `axis` (an embedding lookup); negative indices count from the end.")


def take(a: Any, indices: Any, axis: int | None = None, out: Any = None, mode: Any = None) -> Array:
    """`np.take(a, indices, axis)`."""
    a, indices = as_array(a), as_array(indices)
    if axis is None:
        a, axis = reshape(a, (-1,)), 0
    axis = normalize_axis(axis, a.ndim, op="take")
    _check_constant_indices(indices, a, axis, "take")
    return take_p.bind(a, indices, axis=axis)


def _check_constant_indices(indices: Any, x: Any, axis: int, op: str) -> None:
    """Constant (numpy) indices past a static dim fail here, as numpy fails, not when the model runs."""
    dim = x.shape[axis] if axis < x.ndim else None
    if isinstance(indices, np.ndarray) and isinstance(dim, int) and indices.size and dtypes.is_integer(indices.dtype):
        low, high = int(indices.min()), int(indices.max())
        if low < -dim or high >= dim:
            bad = high if high >= dim else low
            raise ShapeError(f"index {bad} is out of bounds for axis {axis} of {ShapeDtype.of(x)}", op=op,
                             location=user_location())


def _row_number_shapes(x: Any, batch_dims: int, ndim: int) -> list[tuple]:
    """Shapes of the implicit index arrays of a batched gather: arange(x.shape[i]) along axis i."""
    return [tuple(x.shape[i] if j == i else 1 for j in range(ndim)) for i in range(batch_dims)]


def _gather_rule(x: ShapeDtype, *indices: ShapeDtype, axis: int, batch_dims: int = 0) -> ShapeDtype:
    for idx in indices:
        require_integer(idx, "index arrays")
    if not 0 <= axis or axis + len(indices) > x.ndim:
        raise ShapeError(f"{len(indices)} index arrays from axis {axis} are too many for {x}")
    if not batch_dims:
        batch = broadcast_shapes(*(i.shape for i in indices))
        return ShapeDtype(x.shape[:axis] + batch + x.shape[axis + len(indices):], x.dtype)
    if batch_dims != axis:
        raise ShapeError(f"a batched gather indexes from axis {batch_dims} (its batch_dims), not {axis}")
    ndim = max([batch_dims] + [i.ndim for i in indices])
    batch = broadcast_shapes(*_row_number_shapes(x, batch_dims, ndim), *(i.shape for i in indices))
    return ShapeDtype(batch + x.shape[axis + len(indices):], x.dtype)


def _gather_impl(x: np.ndarray, *indices: np.ndarray, axis: int, batch_dims: int = 0) -> np.ndarray:
    if not batch_dims:
        return x[(builtins.slice(None),) * axis + tuple(indices)]
    ndim = max([batch_dims] + [np.ndim(i) for i in indices])
    rows = [np.arange(x.shape[i]).reshape(shape) for i, shape in enumerate(_row_number_shapes(x, batch_dims, ndim))]
    return x[tuple(rows) + tuple(indices)]


gather_p = primitive("gather", _gather_rule, _gather_impl,
                     doc="numpy advanced indexing by index arrays on consecutive axes from `axis`; with "
                         "batch_dims=k (= axis), the first k axes are indexed by their own row numbers "
                         "(x[arange(B)[:, None], i] is gather(x, i, axis=1, batch_dims=1)).")


def gather(x: Any, indices: Sequence[Any], axis: int = 0) -> Array:
    """`x[:, ..., i0, i1, ...]` with index arrays i0, i1 (broadcast together) on axes axis, axis+1, ..."""
    x = as_array(x)
    axis = normalize_axis(axis, x.ndim, op="gather")
    arrays = [as_array(i) for i in indices]
    for k, index in enumerate(arrays):
        _check_constant_indices(index, x, axis + k, "gather")
    return gather_p.bind(x, *arrays, axis=axis)


# -- numpy indexing -----------------------------------------------------------------------------------


def _is_index_array(item: Any) -> bool:
    return isinstance(item, (Tracer, np.ndarray, list))


def _expand_key(x: Array, key: Any) -> list[Any]:
    """The index as one item per position, Ellipsis expanded."""
    key = list(key) if isinstance(key, tuple) else [key]
    consumed = builtins.sum(1 for k in key if k is not None and k is not Ellipsis)
    if consumed > x.ndim:
        raise ShapeError(f"too many indices ({consumed}) for {ShapeDtype.of(x)}", location=user_location())
    if builtins.sum(1 for k in key if k is Ellipsis) > 1:
        raise ShapeError("an index can only have one Ellipsis", location=user_location())
    if Ellipsis in [k for k in key if not _is_index_array(k)]:
        i = next(i for i, k in enumerate(key) if not _is_index_array(k) and k is Ellipsis)
        key[i:i + 1] = [builtins.slice(None)] * (x.ndim - consumed)
    else:
        key += [builtins.slice(None)] * (x.ndim - consumed)
    for item in key:
        if _is_index_array(item):
            dtype = as_array(item).dtype
            if dtypes.is_bool(dtype):
                raise UnsupportedError("boolean-mask indexing gives a data-dependent shape; use where()",
                                       location=user_location())
            if not dtypes.is_integer(dtype):
                raise DTypeError(f"index arrays must be integers, got {dtype}", location=user_location())
        elif not (item is None or isinstance(item, (builtins.slice, int, np.integer))):
            raise UnsupportedError(f"index item {item!r} is not supported", location=user_location())
    return key


def _advanced_span(key: list[Any]) -> tuple[int, int] | None:
    """(first, last+1) positions (among array-consuming items) of the advanced indices, or None."""
    positions = [i for i, k in enumerate([k for k in key if k is not None]) if _is_index_array(k)]
    if not positions:
        return None
    if positions != list(range(positions[0], positions[-1] + 1)):
        raise UnsupportedError("index arrays separated by slices are not supported (numpy moves their dims "
                               "to the front); index them in two steps", location=user_location())
    return positions[0], positions[-1] + 1


def getitem(x: Any, key: Any) -> Array:
    """numpy indexing: ints, slices (with steps), None, Ellipsis and integer index arrays."""
    x = as_array(x)
    key = _expand_key(x, key)
    has_arrays = builtins.any(_is_index_array(k) for k in key)
    # Ints next to index arrays are advanced indices too (numpy broadcasts them with the arrays).
    if has_arrays:
        key = [np.asarray(k, dtype=np.int64) if isinstance(k, (int, np.integer)) else k for k in key]
    slices = [k if isinstance(k, builtins.slice) else
              (builtins.slice(k, k + 1 if k != -1 else None) if isinstance(k, (int, np.integer)) else builtins.slice(None))
              for k in key if k is not None]
    for axis, k in enumerate(k for k in key if k is not None):
        if isinstance(k, (int, np.integer)) and isinstance(x.shape[axis], int) and not -x.shape[axis] <= k < x.shape[axis]:
            raise ShapeError(f"index {k} is out of bounds for axis {axis} of {ShapeDtype.of(x)}",
                             location=user_location())
    result = slice(x, slices)
    int_axes = [axis for axis, k in enumerate(k for k in key if k is not None) if isinstance(k, (int, np.integer))]
    result = squeeze(result, int_axes) if int_axes else result
    span = _advanced_span([k for k in key if not isinstance(k, (int, np.integer))])
    if span is not None:
        arrays = [k for k in key if _is_index_array(k)]
        result = take(result, arrays[0], axis=span[0]) if len(arrays) == 1 else gather(result, arrays, axis=span[0])
    # None inserts an axis; its output position counts the dims produced before it.
    arrays = [k for k in key if _is_index_array(k)]
    advanced_width = builtins.max(as_array(a).ndim for a in arrays) if arrays else 0
    new_axes, position, seen_advanced = [], 0, False
    for k in key:
        if k is None:
            new_axes.append(position)
            position += 1
        elif _is_index_array(k) and not seen_advanced:
            position += advanced_width
            seen_advanced = True
        elif isinstance(k, builtins.slice):
            position += 1
    result = expand_dims(result, new_axes) if new_axes else result
    if not has_arrays:  # basic indexing: numpy gives a view of the selected region
        note_view(result, x, tuple(slices))
    return result


# -- index_put: x[key] = updates, recorded functionally -----------------------------------------------


def _index_shape(data: ShapeDtype, spec: tuple, index_shapes: Sequence[tuple]) -> tuple[DimLike, ...]:
    """The shape numpy gives data[key] for an index_put spec (slices and index-array slots)."""
    shape: list[DimLike] = []
    advanced_done = False
    for dim, item in zip(data.shape, spec):
        if item[0] == "slice":
            shape.append(_slice_length(dim, *item[1:]))
        elif not advanced_done:
            shape.extend(broadcast_shapes(*index_shapes))
            advanced_done = True
    return tuple(shape)


def _index_put_rule(data: ShapeDtype, updates: ShapeDtype, *indices: ShapeDtype, spec: tuple) -> ShapeDtype:
    for idx in indices:
        require_integer(idx, "index arrays")
    if len(spec) != data.ndim:
        raise ShapeError(f"index has {len(spec)} items for {data}")
    target = _index_shape(data, spec, [i.shape for i in indices])
    if updates.dtype != data.dtype:
        raise DTypeError(f"updates {updates} must have the dtype of {data}")
    if broadcast_shapes(updates.shape, target) != target:
        raise ShapeError(f"updates {updates} do not broadcast to the indexed region [{shape_str(target)}] of {data}")
    return data


def _index_put_impl(data: np.ndarray, updates: np.ndarray, *indices: np.ndarray, spec: tuple) -> np.ndarray:
    out = data.copy()
    key = tuple(builtins.slice(*item[1:]) if item[0] == "slice" else indices[item[1]] for item in spec)
    out[key] = updates
    return out


index_put_p = primitive("index_put", _index_put_rule, _index_put_impl,
                        doc="A copy of data with data[index] = updates; spec items are ('slice', start, "
                            "stop, step) or ('array', k) for the k-th index array.")


def index_put(data: Any, indices: Any, updates: Any) -> Array:
    """Functional `data[indices] = updates`: returns the updated copy (numpy casting of updates)."""
    data = as_array(data)
    key = _expand_key(data, indices)
    if builtins.any(k is None for k in key):
        raise UnsupportedError("None (new axis) in an assignment index", location=user_location())
    has_arrays = builtins.any(_is_index_array(k) for k in key)
    spec, arrays = [], []
    for k in key:
        if _is_index_array(k) or (has_arrays and isinstance(k, (int, np.integer))):
            spec.append(("array", len(arrays)))
            arrays.append(as_array(k if _is_index_array(k) else np.asarray(k, dtype=np.int64)))
        elif isinstance(k, (int, np.integer)):
            spec.append(("slice", int(k), int(k) + 1 if k != -1 else None, 1))
        else:
            spec.append(("slice", None if k.start is None else _static_index(k.start),
                         None if k.stop is None else _static_index(k.stop), 1 if k.step is None else _static_index(k.step)))
    _advanced_span([k for k in key if not isinstance(k, (int, np.integer)) or has_arrays])
    # An int index removes its axis from the indexed region: updates gain that size-1 axis back.
    updates = as_array(promote(updates, to=data.dtype, op="index_put")[0])
    if not has_arrays:
        int_axes = [axis for axis, k in enumerate(key) if isinstance(k, (int, np.integer))]
        if int_axes:
            region = _index_shape(ShapeDtype.of(data), tuple(spec), [])
            squeezed = tuple(d for a, d in enumerate(region) if a not in int_axes)
            if updates.shape != squeezed:
                try:
                    fits = broadcast_shapes(updates.shape, squeezed) == squeezed
                except ShapeError:
                    fits = False
                if not fits:
                    raise ShapeError(f"updates {ShapeDtype.of(updates)} do not broadcast to the indexed region "
                                     f"[{shape_str(squeezed)}] of {ShapeDtype.of(data)}", op="index_put",
                                     location=user_location())
                updates = broadcast_to(updates, squeezed)
            updates = expand_dims(updates, int_axes)
    region = _index_shape(ShapeDtype.of(data), tuple(spec), [ShapeDtype.of(a).shape for a in arrays])
    if 0 in region:  # nothing is written (x[0:0] = v): a scatter of no elements is no model at all
        index_put_p.abstract_eval([ShapeDtype.of(v) for v in (data, updates, *arrays)], {"spec": tuple(spec)})
        return data
    return index_put_p.bind(data, updates, *arrays, spec=tuple(spec))


def setitem(x: Any, key: Any, value: Any) -> None:
    """`x[key] = value` on a traced value: records index_put and rebinds x to the result."""
    if not isinstance(x, Tracer):
        raise UnsupportedError("setitem on a non-traced array", location=user_location())
    result = index_put(x, key, value)
    node = result.value.producer if result is not x else None
    if node is not None and node.op == "index_put":
        trace = current_trace()
        if trace is not None:
            trace.assignments.append((x.value, node, node.params["spec"]))
    x.value = result.value


def copy(x: Any, order: str = "K") -> Array:
    """`x.copy()` / `np.copy(x)`: a new array (for traced values, a value no assignment aliases)."""
    from .elementwise import cast_p

    x = as_array(x)
    return cast_p.bind(x, dtype=x.dtype) if isinstance(x, Tracer) else x.copy()


# -- repeat (GQA's repeat_kv) -------------------------------------------------------------------------


def repeat(x: Any, repeats: int, axis: int | None = None) -> Array:
    """`np.repeat(x, repeats, axis)` for an int count: each entry repeated `repeats` times in place."""
    x = as_array(x)
    if axis is None:
        x, axis = reshape(x, (-1,)), 0
    if not isinstance(repeats, (int, np.integer)):
        raise UnsupportedError("repeat counts must be one static int", location=user_location())
    axis = normalize_axis(axis, x.ndim, op="repeat")
    expanded = expand_dims(x, axis + 1)
    target = x.shape[:axis + 1] + (int(repeats),) + x.shape[axis + 1:]
    tiled = broadcast_to(expanded, target)
    return reshape(tiled, x.shape[:axis] + (x.shape[axis] * int(repeats),) + x.shape[axis + 1:])
