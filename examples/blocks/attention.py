"""Cached self-attention in the Cloud AI 100 form.

Grouped-query (and multi-query) attention never repeats K/V: the G query heads that share a KV head
are stacked along the sequence axis, so one [B, KV, G*S, D] x [B, KV, D, C] MatMul scores them all
against the KV head's cache rows.

Blocked attention (long contexts) reads the cache one block at a time (CtxGatherBlockedKV) and
combines the blocks with an exact online softmax: a running maximum, a running denominator and a
running weighted sum, rescaled whenever the maximum grows. The per-block step is one traced function
shared by every block of every layer, so N blocks cost N call nodes, not N copies of the body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import qtrace
from qtrace.primitives import (clip, concatenate, exp, layer_norm, log, maximum, sigmoid, softmax, stack, take, tanh,
                               where)

from ..config import DecoderConfig
from .cache import read_cache, read_cache_block, write_cache
from .layers import linear, norm
from .rope import apply_rope


@dataclass
class AttentionInputs:
    """What a layer's attention reads from the step, computed once per step at model level."""

    position_ids: Any        # [B,S] the tokens' positions (where the new keys/values are written)
    ctx_indices: Any         # [B,1,C] CtxGather indices (INT32_MAX past the live context)
    bias: Any                # [B,1 or KV,G*S,C] additive score bias (masks, ALiBi)
    batch_index: Any = None  # [B,1] cache slot of each row (continuous batching)
    cos: Any = None          # [B,S,1,D] RoPE tables at the positions (None: no rotary)
    sin: Any = None
    rotation: Any = None     # [D,D] the RoPE pairing
    blocks: tuple = ()       # blocked attention: ((indices [B,KV,L], bias [B,1,G*S,L], future), ...), one per
                             # KV block; future: bool [] true when the block lies past every position (or None)
    write_positions: Any = None  # [B,S] cache slots of the new keys/values when not position_ids (rings)
    head_block_size: int = 0     # blocked attention over this many KV heads at a time (0: all heads together)
    q_blocks: int = 0            # blocked attention over this many equal blocks of query rows (0: all rows together)
    query_rows: tuple = ()       # with q_blocks: (padded [Q*ceil(R/Q)], kept [R]) row numbers (masks.query_row_indices)


def cached_attention(q: Any, k: Any, v: Any, inputs: AttentionInputs, past_key: Any, past_value: Any, *,
                     scale: float, softcap: float | None = None, sinks: Any = None) -> tuple[Any, Any, Any]:
    """q [B,S,H,D], k/v [B,S,KV,D] -> (out [B,S,H*D], key cache, value cache). `sinks` [H] (gpt-oss):
    one learned logit per head that joins each query's softmax denominator and attends to nothing."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    slots = inputs.position_ids if inputs.write_positions is None else inputs.write_positions
    key_cache = write_cache(past_key, slots, k.transpose(0, 2, 1, 3), inputs.batch_index)
    value_cache = write_cache(past_value, slots, v.transpose(0, 2, 1, 3), inputs.batch_index)
    # Scaled after the reshape, next to the score product: onnxruntime folds that Mul into the MatMul.
    grouped = q.transpose(0, 2, 1, 3).reshape(batch, kv_heads, groups * seq, head_dim) * scale
    if inputs.blocks:
        out = blocked_attention(grouped, key_cache, value_cache, inputs.blocks, inputs.batch_index, softcap,
                                with_logsumexp=sinks is not None, head_block_size=inputs.head_block_size,
                                q_blocks=inputs.q_blocks, query_rows=inputs.query_rows)
        if sinks is not None:
            out, total = out
    else:
        keys = read_cache(key_cache, inputs.ctx_indices, inputs.batch_index)    # [B,KV,C,D]
        values = read_cache(value_cache, inputs.ctx_indices, inputs.batch_index)
        biased = capped_scores(grouped, keys, softcap) + inputs.bias
        out = softmax(biased, axis=-1) @ values                                # [B,KV,G*S,D]
        if sinks is not None:
            row_max = biased.max(axis=-1, keepdims=True)
            total = row_max + log(exp(biased - row_max).sum(axis=-1, keepdims=True))   # [B,KV,G*S,1]
    out = out.reshape(batch, heads, seq, head_dim)
    if sinks is not None:
        # A sink logit t joins the denominator: exp(s_i) / (sum_j exp(s_j) + exp(t)) is the softmax
        # times sigmoid(logsumexp(s) - t), applied per head once the heads are apart again.
        out = out * sigmoid(total.reshape(batch, heads, seq, 1) - sinks[:, None, None])
    out = out.transpose(0, 2, 1, 3)
    return out.reshape(batch, seq, heads * head_dim), key_cache, value_cache


def capped_scores(grouped_q: Any, keys: Any, softcap: float | None) -> Any:
    """q . k for the grouped queries [B,KV,G*S,D] and keys [B,KV,C,D], softcapped (c * tanh(s / c))."""
    scores = grouped_q @ keys.transpose(0, 1, 3, 2)                           # [B,KV,G*S,C]
    return scores if softcap is None else tanh(scores / softcap) * softcap


def _online_softmax_terms(scores: Any, running_max: Any) -> tuple[Any, Any, Any]:
    """(new maximum, exp(scores - new maximum), exp(running maximum - new maximum)); a row that has
    seen no visible slot yet keeps a maximum of -inf and gets zeros, never NaN."""
    new_max = scores.max(axis=-1, keepdims=True)
    if running_max is not None:
        new_max = maximum(running_max, new_max)
    safe = where(new_max == -np.inf, np.zeros((), scores.dtype), new_max)
    correction = None if running_max is None else exp(running_max - safe)
    return new_max, exp(scores - safe), correction


@qtrace.function(name="attention_kv_block")
def attention_kv_block(grouped_q: Any, key_cache: Any, value_cache: Any, block: tuple[Any, Any], batch_index: Any,
                       running: tuple[Any, Any, Any], softcap: float | None) -> tuple[Any, Any, Any]:
    """Fold one KV block into the running (maximum, denominator, weighted sum). A block wholly in the
    future (its `future` predicate, --skip-kv) leaves them as they are: it would add exactly nothing,
    and the predicate lets the accelerator skip the block's reads and products."""
    indices, bias, future = block
    keys, values = read_cache_block(key_cache, indices, batch_index), read_cache_block(value_cache, indices, batch_index)
    running_max, denominator, total = running
    new_max, weights, correction = _online_softmax_terms(capped_scores(grouped_q, keys, softcap) + bias, running_max)
    folded = (new_max, denominator * correction + weights.sum(axis=-1, keepdims=True),
              total * correction + weights @ values)
    if future is None:
        return folded
    return tuple(where(future, before, after) for before, after in zip(running, folded))


def blocked_attention(grouped_q: Any, key_cache: Any, value_cache: Any, blocks: tuple, batch_index: Any,
                      softcap: float | None, with_logsumexp: bool = False, head_block_size: int = 0,
                      q_blocks: int = 0, query_rows: tuple = ()) -> Any:
    """softmax(scores + bias) @ values over the whole cache, read block by block: [B,KV,G*S,D]; with
    with_logsumexp, also log(sum(exp(scores + bias))) per row [B,KV,G*S,1] (for attention sinks).
    head_block_size (QEfficient's head blocking): the KV heads taken that many at a time, each group
    over its own slice of the caches and blocks, so every score tile covers only those heads.
    q_blocks (query blocking): the G*S query rows taken in that many equal blocks, each against every
    KV block, so every score tile covers only those rows; query_rows holds the row numbers that cut
    and merge them (masks.query_row_indices)."""
    kv_heads = grouped_q.shape[1]
    if not head_block_size or head_block_size >= kv_heads:
        return _attention_over_query_blocks(grouped_q, key_cache, value_cache, blocks, batch_index, softcap,
                                            with_logsumexp, q_blocks, query_rows)
    parts = []
    for first in range(0, kv_heads, head_block_size):
        heads = slice(first, first + head_block_size)
        group_blocks = tuple((indices[:, heads], bias[:, heads] if bias.shape[1] == kv_heads else bias, future)
                             for indices, bias, future in blocks)
        parts.append(_attention_over_query_blocks(grouped_q[:, heads], key_cache[:, heads], value_cache[:, heads],
                                                  group_blocks, batch_index, softcap, with_logsumexp, q_blocks,
                                                  query_rows))
    if with_logsumexp:
        return concatenate([p[0] for p in parts], axis=1), concatenate([p[1] for p in parts], axis=1)
    return concatenate(parts, axis=1)


def query_row_blocks(x: Any, count: int, padded: Any) -> list[Any]:
    """x [B,H,R,...] cut into `count` equal blocks of rows along axis 2: the rows in the order `padded`
    lists them (every row, then copies of the last as padding; masks.query_row_indices)."""
    x = take(x, padded, axis=2)
    x = x.reshape(x.shape[:2] + (count, x.shape[2] // count) + x.shape[3:])
    return [x[:, :, j] for j in range(count)]


def merge_query_row_blocks(parts: list[Any], kept: Any) -> Any:
    """The inverse of query_row_blocks: the blocks back in order, the rows `kept` lists kept."""
    x = stack(parts, axis=2)
    return take(x.reshape(x.shape[:2] + (x.shape[2] * x.shape[3],) + x.shape[4:]), kept, axis=2)


def _attention_over_query_blocks(grouped_q: Any, key_cache: Any, value_cache: Any, blocks: tuple, batch_index: Any,
                                 softcap: float | None, with_logsumexp: bool, q_blocks: int,
                                 query_rows: tuple = ()) -> Any:
    if q_blocks <= 1:
        return _attention_over_blocks(grouped_q, key_cache, value_cache, blocks, batch_index, softcap, with_logsumexp)
    padded, kept = query_rows
    queries = query_row_blocks(grouped_q, q_blocks, padded)
    biases = [query_row_blocks(bias, q_blocks, padded) for _, bias, _ in blocks]  # each KV block's, cut alike
    parts = [_attention_over_blocks(queries[j], key_cache, value_cache,
                                    tuple((indices, bias[j], future) for (indices, _, future), bias in zip(blocks, biases)),
                                    batch_index, softcap, with_logsumexp) for j in range(q_blocks)]
    if with_logsumexp:
        return tuple(merge_query_row_blocks([part[i] for part in parts], kept) for i in range(2))
    return merge_query_row_blocks(parts, kept)


def _attention_over_blocks(grouped_q: Any, key_cache: Any, value_cache: Any, blocks: tuple, batch_index: Any,
                           softcap: float | None, with_logsumexp: bool) -> Any:
    (indices, bias, _), rest = blocks[0], blocks[1:]  # the first block starts at slot 0: never in the future
    keys = read_cache_block(key_cache, indices, batch_index)
    new_max, weights, _ = _online_softmax_terms(capped_scores(grouped_q, keys, softcap) + bias, None)
    running = (new_max, weights.sum(axis=-1, keepdims=True), weights @ read_cache_block(value_cache, indices, batch_index))
    for block in rest:
        running = attention_kv_block(grouped_q, key_cache, value_cache, block, batch_index, running, softcap)
    if with_logsumexp:
        return running[2] / running[1], running[0] + log(running[1])
    return running[2] / running[1]


def split_heads(x: Any, heads: int, head_dim: int) -> Any:
    return x.reshape(x.shape[0], x.shape[1], heads, head_dim)


def split_fused_qkv(qkv: Any, cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    """q [B,S,H*D], k and v [B,S,KV*D] from one fused projection [B,S,(H+2*KV)*D]. The fused output is
    `cfg.qkv_shards` equal blocks, each holding its share of the q, k and v heads in `cfg.qkv_order`:

        1 shard, "qkv"    q | k | v                       GPT-2, MPT, GPTBigCode's and Falcon-7B's multi-query
        KV shards, "qkv"  per KV head: its G q heads, k, v  Falcon's new decoder architecture (G = 1: per head
                                                            q, k, v, as GPTBigCode's and Falcon's multi-head)
        4 shards, "qvk"   CodeGen's mp_num = 4 model-parallel shards
    """
    shards, head_dim = cfg.qkv_shards, cfg.head_dim
    sizes = {"q": cfg.num_attention_heads // shards * head_dim, "k": cfg.num_key_value_heads // shards * head_dim}
    sizes["v"] = sizes["k"]
    batch, seq = qkv.shape[0], qkv.shape[1]
    blocks = qkv if shards == 1 else qkv.reshape(batch, seq, shards, qkv.shape[-1] // shards)
    parts, start = {}, 0
    for name in cfg.qkv_order:
        part = blocks[..., start:start + sizes[name]]
        parts[name] = part if shards == 1 else part.reshape(batch, seq, shards * sizes[name])
        start += sizes[name]
    return parts["q"], parts["k"], parts["v"]


def project_qkv(x: Any, p: dict[str, Any], cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    """q [B,S,H,D], k and v [B,S,KV,D] from q/k/v_proj (+ q/k/v_bias) or a fused qkv_proj (+ qkv_bias),
    clipped to ±clip_qkv when the config says so (MPT), with the optional q/k RMSNorms: over each head
    when `q_norm` has head_dim entries (Qwen3, Gemma 3), over the whole projection when it has
    heads*head_dim (OLMo 2); or LayerNorms over each head (`q_layernorm`, Phi)."""
    def projected(name: str) -> Any:
        y = linear(x, p[f"{name}_proj"], p.get(f"{name}_bias"))
        return y if cfg.clip_qkv is None else clip(y, -cfg.clip_qkv, cfg.clip_qkv)

    q, k, v = split_fused_qkv(projected("qkv"), cfg) if "qkv_proj" in p else (projected(n) for n in "qkv")
    per_head = "q_norm" in p and p["q_norm"].shape[0] == cfg.head_dim
    if "q_norm" in p and not per_head:
        q, k = norm(q, p["q_norm"], cfg.norm_eps), norm(k, p["k_norm"], cfg.norm_eps)
    q = split_heads(q, cfg.num_attention_heads, cfg.head_dim)
    k = split_heads(k, cfg.num_key_value_heads, cfg.head_dim)
    if per_head:
        q, k = norm(q, p["q_norm"], cfg.norm_eps), norm(k, p["k_norm"], cfg.norm_eps)
    if "q_layernorm" in p:
        q = layer_norm(q, p["q_layernorm"], p.get("q_layernorm_bias"), cfg.norm_eps)
        k = layer_norm(k, p["k_layernorm"], p.get("k_layernorm_bias"), cfg.norm_eps)
    return q, k, split_heads(v, cfg.num_key_value_heads, cfg.head_dim)


def self_attention(x: Any, p: dict[str, Any], inputs: AttentionInputs, past_key: Any, past_value: Any,
                   cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    """The standard attention sublayer: projections, RoPE, cached attention (with the layer's
    attention sinks when it has them), o_proj (+ o_bias)."""
    q, k, v = project_qkv(x, p, cfg)
    if inputs.cos is not None:
        q = apply_rope(q, inputs.cos, inputs.sin, inputs.rotation)
        k = apply_rope(k, inputs.cos, inputs.sin, inputs.rotation)
    out, key_cache, value_cache = cached_attention(q, k, v, inputs, past_key, past_value, scale=cfg.scale,
                                                   softcap=cfg.attn_logit_softcap, sinks=p.get("sinks"))
    return linear(out, p["o_proj"], p.get("o_bias")), key_cache, value_cache
