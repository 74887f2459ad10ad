"""The Cloud AI 100 KV-cache primitives: ctx_scatter / ctx_gather and their continuous-batching
(`_cb`) forms, each 4-D ([batch, heads, ctx, dim]) or 3-D ([batch, ctx, dim]) by the data's rank.
The blocked-KV reads (`ctx_gather_blocked_kv`, `ctx_gather_blocked_kv_cb`: one block of the cache,
no compute-context length) are ctx_gather / ctx_gather_cb with `blocked=True`; a 3-D int32
ctx_scatter is the compiler's CtxScatter3DInt (index tables). The lowering picks the op from these.

Index conventions (design.md §5), honoured by these references and by the ONNX function bodies:
- a negative position counts from the end for the plain scatter (so padding at -1 writes the last
  slot); the continuous-batching scatter first turns negative positions into INT32_MAX;
- INT32_MAX is the invalid index: a scatter there writes nothing, a gather there reads index 0;
- indices are int32 or int64; the data keeps its dtype.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from qtrace.dims import DimLike
from qtrace.errors import DTypeError, QtraceError, ShapeError
from qtrace.ir import ShapeDtype

from .common import INT32_MAX, Array, as_array, fmt, primitive, require_integer


def _check_rank(data: ShapeDtype, what: str) -> bool:
    """True for the 4-D (with heads) form, False for 3-D."""
    if data.ndim not in (3, 4):
        raise ShapeError(f"{what} must be [batch, heads, ctx, dim] or [batch, ctx, dim], got {data}")
    return data.ndim == 4


def _check_batch_index(batch_index: ShapeDtype, batch: DimLike) -> None:
    require_integer(batch_index, "batch_index")
    if batch_index.shape != (batch, 1):
        raise ShapeError(f"batch_index must be [{batch},1], got {batch_index}")


def _scatter_checks(data: ShapeDtype, position_ids: ShapeDtype, updates: ShapeDtype, batch: DimLike) -> None:
    has_heads = _check_rank(data, "data")
    require_integer(position_ids, "position_ids")
    if updates.dtype != data.dtype:
        raise DTypeError(f"updates must have the dtype of data: {fmt(data, updates)}")
    if position_ids.ndim != 2 or position_ids.shape[0] != batch:
        raise ShapeError(f"position_ids must be [batch, seq] with batch {batch}: {fmt(data, position_ids, updates)}")
    seq = position_ids.shape[1]
    expected = (batch, data.shape[1], seq, data.shape[3]) if has_heads else (batch, seq, data.shape[2])
    if updates.shape != expected:
        raise ShapeError(f"updates must be [{','.join(map(str, expected))}]: {fmt(data, position_ids, updates)}")


def _ctx_scatter_rule(data: ShapeDtype, position_ids: ShapeDtype, updates: ShapeDtype) -> ShapeDtype:
    _check_rank(data, "data")
    _scatter_checks(data, position_ids, updates, data.shape[0])
    return data


def _ctx_scatter_cb_rule(data: ShapeDtype, batch_index: ShapeDtype, position_ids: ShapeDtype,
                         updates: ShapeDtype) -> ShapeDtype:
    batch = position_ids.shape[0] if position_ids.ndim else None
    _check_batch_index(batch_index, batch)
    _scatter_checks(data, position_ids, updates, batch)
    return data


def _scatter(out: np.ndarray, slots: np.ndarray, position_ids: np.ndarray, updates: np.ndarray) -> np.ndarray:
    """out[slots[b], (:,) positions[b, s]] = updates[b, (:,) s] for every valid (b, s), in order."""
    ctx_axis = out.ndim - 2
    positions = position_ids.astype(np.int64)
    positions = np.where(positions < 0, positions + out.shape[ctx_axis], positions)
    for b, s in zip(*np.nonzero(position_ids != INT32_MAX)):
        if ctx_axis == 2:
            out[slots[b], :, positions[b, s], :] = updates[b, :, s, :]
        else:
            out[slots[b], positions[b, s], :] = updates[b, s, :]
    return out


def _ctx_scatter_impl(data: np.ndarray, position_ids: np.ndarray, updates: np.ndarray) -> np.ndarray:
    return _scatter(data.copy(), np.arange(data.shape[0]), position_ids, updates)


def _ctx_scatter_cb_impl(data: np.ndarray, batch_index: np.ndarray, position_ids: np.ndarray,
                         updates: np.ndarray) -> np.ndarray:
    positions = np.where(position_ids < 0, INT32_MAX, position_ids)
    return _scatter(data.copy(), batch_index[:, 0].astype(np.int64), positions, updates)


ctx_scatter_p = primitive("ctx_scatter", _ctx_scatter_rule, _ctx_scatter_impl,
                          doc="KV-cache write: data[b, :, position_ids[b, s], :] = updates[b, :, s, :].")
ctx_scatter_cb_p = primitive("ctx_scatter_cb", _ctx_scatter_cb_rule, _ctx_scatter_cb_impl,
                             doc="Continuous-batching KV-cache write into slot batch_index[b, 0].")


def ctx_scatter(data: Any, position_ids: Any, updates: Any) -> Array:
    """Write `updates` into the cache `data` at `position_ids` (CtxScatter / CtxScatter3D).

    data [B,H,C,D] (or [B,C,D]), position_ids [B,S] int, updates [B,H,S,D] (or [B,S,D]).
    A negative position counts from the end; INT32_MAX writes nothing. A 3-D int32 cache (e.g. a
    table of token indices being packed) lowers to the compiler's int32 form, CtxScatter3DInt."""
    return ctx_scatter_p.bind(as_array(data), as_array(position_ids), as_array(updates))


def ctx_scatter_cb(data: Any, batch_index: Any, position_ids: Any, updates: Any) -> Array:
    """Continuous-batching write (CtxScatterCB / CtxScatterCB3D): row b goes to cache slot
    batch_index[b, 0]; negative positions and INT32_MAX write nothing."""
    return ctx_scatter_cb_p.bind(as_array(data), as_array(batch_index), as_array(position_ids), as_array(updates))


def _gather_checks(data: ShapeDtype, ctx_indices: ShapeDtype, batch: DimLike, comp_ctx_len: DimLike | None,
                   blocked: bool) -> ShapeDtype:
    if blocked and data.ndim != 4:
        raise ShapeError(f"a blocked-KV read needs a [batch, heads, ctx, dim] cache, got {data}")
    has_heads = _check_rank(data, "data")
    require_integer(ctx_indices, "ctx_indices")
    lead = (batch, data.shape[1]) if has_heads else (batch,)
    if ctx_indices.ndim != len(lead) + 1 or any(
            i != 1 and i != d for i, d in zip(ctx_indices.shape[:-1], lead)):
        want = "[B or 1, 1 or H, K]" if has_heads else "[B or 1, K]"
        raise ShapeError(f"ctx_indices must be {want}: {fmt(data, ctx_indices)}")
    if comp_ctx_len is not None and comp_ctx_len != ctx_indices.shape[-1]:
        raise ShapeError(f"comp_ctx_len ({comp_ctx_len}) must equal the number of indices K of {ctx_indices}: "
                         "the accelerator reads exactly comp_ctx_len cache rows")
    return ShapeDtype(lead + (ctx_indices.shape[-1], data.shape[-1]), data.dtype)


@contextlib.contextmanager
def _errors_named(name: str | None) -> Iterator[None]:
    """Errors raised inside name `name` as their operation (the function the user called), if given."""
    try:
        yield
    except QtraceError as exc:
        raise exc.with_context(name, None) from None


def _ctx_gather_rule(data: ShapeDtype, ctx_indices: ShapeDtype, *, comp_ctx_len: DimLike | None = None,
                     blocked: bool = False) -> ShapeDtype:
    with _errors_named("ctx_gather_blocked_kv" if blocked else None):
        _check_rank(data, "data")
        out = _gather_checks(data, ctx_indices, data.shape[0], comp_ctx_len, blocked)
        if blocked and ctx_indices.shape != out.shape[:3]:
            # CtxGatherBlockedKV takes one index per (batch, head, key): the compiler does not broadcast them.
            raise ShapeError(f"ctx_indices must be [{','.join(map(str, out.shape[:3]))}] exactly (broadcast_to "
                             f"it first): {fmt(data, ctx_indices)}")
        return out


def _ctx_gather_cb_rule(data: ShapeDtype, batch_index: ShapeDtype, ctx_indices: ShapeDtype, *,
                        comp_ctx_len: DimLike | None = None, blocked: bool = False) -> ShapeDtype:
    with _errors_named("ctx_gather_blocked_kv_cb" if blocked else None):
        batch = batch_index.shape[0] if batch_index.ndim else None
        _check_batch_index(batch_index, batch)
        if ctx_indices.ndim == 0 or ctx_indices.shape[0] != batch:
            raise ShapeError(f"ctx_indices must have batch {batch} like batch_index: "
                             f"{fmt(data, batch_index, ctx_indices)}")
        return _gather_checks(data, ctx_indices, batch, comp_ctx_len, blocked)


def _gather(data: np.ndarray, slots: np.ndarray, ctx_indices: np.ndarray) -> np.ndarray:
    """out[b, (h,) k] = data[slots[b], (h,) index[b, (h,) k]] with INT32_MAX reading index 0."""
    index = ctx_indices.astype(np.int64)
    index = np.where(index == INT32_MAX, 0, index)
    ctx = data.shape[-2]
    index = np.where(index < 0, index + ctx, index)
    batch = slots.shape[0]
    if data.ndim == 4:
        heads = data.shape[1]
        index = np.broadcast_to(index, (batch, heads, index.shape[-1]))
        return data[slots[:, None, None], np.arange(heads)[None, :, None], index, :]
    index = np.broadcast_to(index, (batch, index.shape[-1]))
    return data[slots[:, None], index, :]


def _ctx_gather_impl(data: np.ndarray, ctx_indices: np.ndarray, *, comp_ctx_len: Any = None,
                     blocked: bool = False) -> np.ndarray:
    return _gather(data, np.arange(data.shape[0]), ctx_indices)


def _ctx_gather_cb_impl(data: np.ndarray, batch_index: np.ndarray, ctx_indices: np.ndarray, *,
                        comp_ctx_len: Any = None, blocked: bool = False) -> np.ndarray:
    return _gather(data, batch_index[:, 0].astype(np.int64), ctx_indices)


ctx_gather_p = primitive("ctx_gather", _ctx_gather_rule, _ctx_gather_impl,
                         doc="KV-cache read: out[b, h, k, :] = data[b, h, ctx_indices[b, h, k], :].")
ctx_gather_cb_p = primitive("ctx_gather_cb", _ctx_gather_cb_rule, _ctx_gather_cb_impl,
                            doc="Continuous-batching KV-cache read from slot batch_index[b, 0].")


def ctx_gather(data: Any, ctx_indices: Any, comp_ctx_len: DimLike | None = None) -> Array:
    """Read cache rows `ctx_indices` (CtxGather / CtxGather3D); INT32_MAX reads index 0.

    data [B,H,C,D] with ctx_indices [B or 1, 1 or H, K] -> [B,H,K,D]; or data [B,C,D] with
    ctx_indices [B or 1, K] -> [B,K,D]. `comp_ctx_len` is the compute context length the
    accelerator reads (QEfficient's CCL); it must equal K, which is also its default."""
    return ctx_gather_p.bind(as_array(data), as_array(ctx_indices), comp_ctx_len=comp_ctx_len)


def ctx_gather_cb(data: Any, batch_index: Any, ctx_indices: Any, comp_ctx_len: DimLike | None = None) -> Array:
    """Continuous-batching read (CtxGatherCB / CtxGatherCB3D) from cache slot batch_index[b, 0]."""
    return ctx_gather_cb_p.bind(as_array(data), as_array(batch_index), as_array(ctx_indices),
                                comp_ctx_len=comp_ctx_len)


def ctx_gather_blocked_kv(data: Any, ctx_indices: Any) -> Array:
    """Read one block of the cache for blocked-KV attention (CtxGatherBlockedKV).

    data [B,H,C,D], ctx_indices [B,H,K] int (exactly: one index per batch row, head and key) ->
    [B,H,K,D] with out[b, h, k, :] = data[b, h, ctx_indices[b, h, k], :]. The block's slots past the
    live context are set to INT32_MAX by the caller; INT32_MAX reads index 0 (mask those rows). Unlike
    ctx_gather there is no compute-context length: the block has K slots."""
    return ctx_gather_p.bind(as_array(data), as_array(ctx_indices), blocked=True)


def ctx_gather_blocked_kv_cb(data: Any, batch_index: Any, ctx_indices: Any) -> Array:
    """Continuous-batching blocked-KV read (CtxGatherBlockedKVCB): data [N,H,C,D], batch_index [B,1],
    ctx_indices [B, 1 or H, K] -> [B,H,K,D] read from cache slot batch_index[b, 0]; INT32_MAX reads
    index 0."""
    return ctx_gather_cb_p.bind(as_array(data), as_array(batch_index), as_array(ctx_indices), blocked=True)
