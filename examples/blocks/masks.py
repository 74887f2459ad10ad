"""What every layer's attention reads from `position_ids`, computed once per step at model level
(never inside a layer function: the compiler rejects shape-derived ranges there).

Cache slot c of a full-length cache holds position c. A query at position q (padding, -1, acts as
position 0 so that no row is all -inf) may see slot c when
- full attention:     c <= q
- sliding window W:   q - W < c <= q            (transformers' sliding_window semantics)
- chunked, size N:    c <= q and c // N == q // N
Slots past the row's largest position are never seen (c > q) and are read at INT32_MAX, which the
accelerator skips.

A ring cache (a sliding-window or chunked layer exported with `--sliding-cache ring`) has its own
length L >= span + prefill length - 1 (span: the window or chunk size) and writes position p at
slot p mod L (padding writes nothing: INT32_MAX). After a step whose largest position is M, slot s
holds the largest p <= M with p = s (mod L), or nothing when that p < 0; every key a query of the
step may see (q - span < p <= q, q > M - prefill length) is still there. The same visibility rules
then apply to the position each slot holds; a padding query acts as the row's last position, and a
row without positions (an idle continuous-batching lane) hides nothing, so no row is all -inf.

The score bias is additive (0 or -inf) and laid out for grouped-query attention: the G query heads
that share a KV head are stacked along the sequence axis, so the bias is [B, 1, G*S, C] with row
g*S + s for query s of group member g; with ALiBi (alibi.py) it also holds each head's linear bias,
[B, KV, G*S, C].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qtrace.primitives import INT32_MAX, arange, concatenate, maximum, minimum, remainder, where

from ..config import CHUNKED, FULL, SLIDING, DecoderConfig
from .alibi import alibi_bias


def slot_numbers(slots: Any) -> Any:
    """The slots read, as a 1-D int array: a length (int or symbolic dim) means slots 0..length-1."""
    return slots if hasattr(slots, "ndim") else arange(slots)


def cache_indices(position_ids: Any, slots: Any) -> Any:
    """CtxGather indices [B,1,C] for the slots read (a length, or an array of slot numbers): each
    slot, or INT32_MAX past the row's largest position."""
    slots = slot_numbers(slots)[None, None, :]
    invalid = slots > position_ids.max(axis=1, keepdims=True)[:, :, None]
    return where(invalid, INT32_MAX, slots)


def hidden_slots(query_positions: Any, slots: Any, kind: str, cfg: DecoderConfig, held: Any = None) -> Any:
    """bool [B,1,S,C]: slot c (of the slots read) is hidden from the query at query_positions[b, s].
    `held` [B,1,C]: the position each slot of a ring cache holds (else slot c holds position c)."""
    if held is None:
        slots = slot_numbers(slots)[None, None, None, :]
        q = maximum(query_positions, 0)[:, None, :, None]
    else:
        slots = held[:, :, None, :]
        last = query_positions.max(axis=1, keepdims=True)
        q = where(query_positions < 0, last, query_positions)[:, None, :, None]
    hidden = slots > q
    if held is not None:
        hidden = hidden | (slots < 0)
    if kind == SLIDING:
        hidden = hidden | (slots <= q - cfg.sliding_window)
    elif kind == CHUNKED:
        hidden = hidden | (slots // cfg.attention_chunk_size != q // cfg.attention_chunk_size)
    elif kind != FULL:
        raise ValueError(f"unknown attention kind {kind!r}")
    if held is not None:
        hidden = hidden & (last >= 0)[:, :, None, None]  # an idle lane: nothing hidden, nothing NaN
    return hidden


def score_bias(position_ids: Any, slots: Any, kind: str, cfg: DecoderConfig, dtype: Any, held: Any = None) -> Any:
    """Additive bias [B,1,G*S,C] (0 where visible, -inf where hidden) in the grouped layout; with ALiBi
    slopes in the config, plus each head's linear bias ([B,KV,G*S,C]). `held`: a ring cache's positions."""
    groups = cfg.query_groups
    slots = slot_numbers(slots)
    queries = position_ids if groups == 1 else concatenate([position_ids] * groups, axis=1)
    bias = where(hidden_slots(queries, slots, kind, cfg, held), np.array(-np.inf, dtype), np.array(0, dtype))
    if cfg.alibi_slopes is None:
        return bias
    return bias + alibi_bias(position_ids, slot_numbers(slots) if held is None else held, cfg, dtype)


def kv_block_slots(ctx_len: Any, count: int) -> list[Any]:
    """The slot numbers of `count` equal blocks covering a cache of ctx_len slots, ceil(ctx_len / count)
    each. ctx_len may be the cache's symbolic length: the boundaries are then computed in the graph, so
    an export runs at whatever context it is specialized to. Slots past the cache (when count does not
    divide ctx_len) are past every position, so they read at INT32_MAX and are hidden: equal blocks
    share one traced block body."""
    size = (ctx_len + count - 1) // count
    if isinstance(size, int):
        return [np.arange(j * size, (j + 1) * size, dtype=np.int64) for j in range(count)]
    first = arange(size)
    block_size = arange(size, size + 1)  # the block length as a value ([1]): the dim is symbolic
    return [first] + [first + j * block_size for j in range(1, count)]


def query_row_indices(rows: Any, count: int) -> tuple[Any, Any]:
    """(padded, kept) row numbers for cutting `rows` query rows (a symbolic count) into `count` equal
    blocks of ceil(rows / count): `padded` [count * size] lists every row and then repeats the last
    one as padding, `kept` [rows] the rows to keep when the blocks are merged. Built once per step,
    outside the layer functions: the compiler rejects a Range of symbolic length inside one."""
    size = (rows + count - 1) // count
    return minimum(arange(count * size), arange(rows - 1, rows)), arange(rows)


# -- ring caches -------------------------------------------------------------------------------------------


def ring_length(kind: str, cfg: DecoderConfig, ctx_len: int, prefill_seq_len: int) -> int:
    """The ring of a sliding or chunked layer: every query of a prefill chunk still sees its whole
    window (span + prefill_seq_len - 1 slots), and never more than the full cache."""
    span = cfg.sliding_window if kind == SLIDING else cfg.attention_chunk_size
    return min(ctx_len, span + prefill_seq_len - 1)


def ring_held_positions(position_ids: Any, ring_len: Any) -> Any:
    """[B,1,L]: the position slot s holds once the step is written, M - ((M - s) mod L) for the row's
    largest position M (negative: never written)."""
    length = arange(ring_len, ring_len + 1)  # L as a value ([1]); the dim may be symbolic
    last = position_ids.max(axis=1, keepdims=True)[:, :, None]
    return last - remainder(last - arange(ring_len)[None, None, :], length)


def ring_write_positions(position_ids: Any, ring_len: Any) -> Any:
    """[B,S]: the slot each new key goes to, p mod L (padding: INT32_MAX, which writes nothing)."""
    return where(position_ids < 0, INT32_MAX, remainder(position_ids, arange(ring_len, ring_len + 1)))


def ring_indices(held: Any, ring_len: Any) -> Any:
    """CtxGather indices [B,1,L]: each slot, or INT32_MAX where it holds nothing yet."""
    return where(held < 0, INT32_MAX, arange(ring_len)[None, None, :])
