"""The KV cache as the Cloud AI 100 keeps it: one [batch or slots, kv_heads, ctx_len, head_dim] buffer
per layer and per K/V, written with CtxScatter at each token's position and read back with CtxGather.

With continuous batching (`batch_index` given) the cache has one row per slot and row b of the step
reads and writes slot batch_index[b, 0]; these two functions are the only place that choice is made.
"""

from __future__ import annotations

from typing import Any

from qtrace.primitives import (ctx_gather, ctx_gather_blocked_kv, ctx_gather_blocked_kv_cb, ctx_gather_cb, ctx_scatter,
                               ctx_scatter_cb)


def write_cache(cache: Any, position_ids: Any, new: Any, batch_index: Any = None) -> Any:
    """The cache with new [B,H,S,D] written at position_ids [B,S] (-1: padding; INT32_MAX: nothing)."""
    if batch_index is None:
        return ctx_scatter(cache, position_ids, new)
    return ctx_scatter_cb(cache, batch_index, position_ids, new)


def read_cache(cache: Any, ctx_indices: Any, batch_index: Any = None) -> Any:
    """Rows ctx_indices [B,1,K] of the cache, [B,H,K,D]; INT32_MAX reads row 0 (the mask hides it)."""
    if batch_index is None:
        return ctx_gather(cache, ctx_indices)
    return ctx_gather_cb(cache, batch_index, ctx_indices)


def read_cache_block(cache: Any, block_indices: Any, batch_index: Any = None) -> Any:
    """One block of the cache for blocked attention (CtxGatherBlockedKV), block_indices [B,H,L]."""
    if batch_index is None:
        return ctx_gather_blocked_kv(cache, block_indices)
    return ctx_gather_blocked_kv_cb(cache, batch_index, block_indices)
