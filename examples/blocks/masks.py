"""What every layer's attention reads from `position_ids`, computed once per step at model level
(never inside a layer function: the compiler rejects shape-derived ranges there).

Cache slot c of a full-length cache holds position c. A query at position q (padding, -1, acts as
position 0 so that no row is all -inf) may see slot c when
- full attention:     c <= q
- sliding window W:   q - W < c <= q            (transformers' sliding_window semantics)
- chunked, size N:    c <= q and c // N == q // N
Slots past the row's largest position are never seen (c > q) and are read at INT32_MAX, which the
accelerator skips.

The score bias is additive (0 or -inf) and laid out for grouped-query attention: the G query heads
that share a KV head are stacked along the sequence axis, so the bias is [B, 1, G*S, C] with row
g*S + s for query s of group member g.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qtrace.primitives import INT32_MAX, arange, concatenate, maximum, where

from ..config import CHUNKED, FULL, SLIDING, DecoderConfig


def cache_indices(position_ids: Any, ctx_len: Any) -> Any:
    """CtxGather indices [B,1,C]: each slot, or INT32_MAX past the row's largest position."""
    slots = arange(ctx_len)[None, None, :]
    invalid = slots > position_ids.max(axis=1, keepdims=True)[:, :, None]
    return where(invalid, INT32_MAX, slots)


def hidden_slots(query_positions: Any, ctx_len: Any, kind: str, cfg: DecoderConfig) -> Any:
    """bool [B,1,S,C]: slot c is hidden from the query at query_positions[b, s]."""
    slots = arange(ctx_len)[None, None, None, :]
    q = maximum(query_positions, 0)[:, None, :, None]
    hidden = slots > q
    if kind == SLIDING:
        hidden = hidden | (slots <= q - cfg.sliding_window)
    elif kind == CHUNKED:
        hidden = hidden | (slots // cfg.attention_chunk_size != q // cfg.attention_chunk_size)
    elif kind != FULL:
        raise ValueError(f"unknown attention kind {kind!r}")
    return hidden


def score_bias(position_ids: Any, ctx_len: Any, kind: str, cfg: DecoderConfig, dtype: Any) -> Any:
    """Additive bias [B,1,G*S,C] (0 where visible, -inf where hidden) in the grouped layout."""
    groups = cfg.query_groups
    queries = position_ids if groups == 1 else concatenate([position_ids] * groups, axis=1)
    return where(hidden_slots(queries, ctx_len, kind, cfg), np.array(-np.inf, dtype), np.array(0, dtype))
