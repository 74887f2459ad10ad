"""Cached self-attention in the Cloud AI 100 form.

Grouped-query (and multi-query) attention never repeats K/V: the G query heads that share a KV head
are stacked along the sequence axis, so one [B, KV, G*S, D] x [B, KV, D, C] MatMul scores them all
against the KV head's cache rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qtrace.primitives import softmax, tanh

from ..config import DecoderConfig
from .cache import read_cache, write_cache
from .layers import linear, norm
from .rope import apply_rope


@dataclass
class AttentionInputs:
    """What a layer's attention reads from the step, computed once per step at model level."""

    position_ids: Any        # [B,S] where the new keys/values are written
    ctx_indices: Any         # [B,1,C] CtxGather indices (INT32_MAX past the live context)
    bias: Any                # [B,1 or KV,G*S,C] additive score bias (masks, ALiBi)
    batch_index: Any = None  # [B,1] cache slot of each row (continuous batching)
    cos: Any = None          # [B,S,1,D] RoPE tables at the positions (None: no rotary)
    sin: Any = None
    rotation: Any = None     # [D,D] the RoPE pairing


def cached_attention(q: Any, k: Any, v: Any, inputs: AttentionInputs, past_key: Any, past_value: Any, *,
                     scale: float, softcap: float | None = None) -> tuple[Any, Any, Any]:
    """q [B,S,H,D], k/v [B,S,KV,D] -> (out [B,S,H*D], key cache, value cache)."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    key_cache = write_cache(past_key, inputs.position_ids, k.transpose(0, 2, 1, 3), inputs.batch_index)
    value_cache = write_cache(past_value, inputs.position_ids, v.transpose(0, 2, 1, 3), inputs.batch_index)
    keys = read_cache(key_cache, inputs.ctx_indices, inputs.batch_index)        # [B,KV,C,D]
    values = read_cache(value_cache, inputs.ctx_indices, inputs.batch_index)
    grouped = (q * scale).transpose(0, 2, 1, 3).reshape(batch, kv_heads, groups * seq, head_dim)
    scores = grouped @ keys.transpose(0, 1, 3, 2)                              # [B,KV,G*S,C]
    if softcap is not None:
        scores = tanh(scores / softcap) * softcap
    probs = softmax(scores + inputs.bias, axis=-1)
    out = (probs @ values).reshape(batch, heads, seq, head_dim).transpose(0, 2, 1, 3)
    return out.reshape(batch, seq, heads * head_dim), key_cache, value_cache


def split_heads(x: Any, heads: int, head_dim: int) -> Any:
    return x.reshape(x.shape[0], x.shape[1], heads, head_dim)


def project_qkv(x: Any, p: dict[str, Any], cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    """q [B,S,H,D], k and v [B,S,KV,D] from q/k/v_proj (+ q/k/v_bias), with the optional q/k RMSNorms:
    over each head when `q_norm` has head_dim entries (Qwen3, Gemma 3), over the whole projection
    when it has heads*head_dim (OLMo 2)."""
    q = linear(x, p["q_proj"], p.get("q_bias"))
    k = linear(x, p["k_proj"], p.get("k_bias"))
    v = linear(x, p["v_proj"], p.get("v_bias"))
    per_head = "q_norm" in p and p["q_norm"].shape[0] == cfg.head_dim
    if "q_norm" in p and not per_head:
        q, k = norm(q, p["q_norm"], cfg.norm_eps), norm(k, p["k_norm"], cfg.norm_eps)
    q = split_heads(q, cfg.num_attention_heads, cfg.head_dim)
    k = split_heads(k, cfg.num_key_value_heads, cfg.head_dim)
    if per_head:
        q, k = norm(q, p["q_norm"], cfg.norm_eps), norm(k, p["k_norm"], cfg.norm_eps)
    return q, k, split_heads(v, cfg.num_key_value_heads, cfg.head_dim)


def self_attention(x: Any, p: dict[str, Any], inputs: AttentionInputs, past_key: Any, past_value: Any,
                   cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    """The standard attention sublayer: projections, RoPE, cached attention, o_proj (+ o_bias)."""
    q, k, v = project_qkv(x, p, cfg)
    if inputs.cos is not None:
        q = apply_rope(q, inputs.cos, inputs.sin, inputs.rotation)
        k = apply_rope(k, inputs.cos, inputs.sin, inputs.rotation)
    out, key_cache, value_cache = cached_attention(q, k, v, inputs, past_key, past_value, scale=cfg.scale,
                                                   softcap=cfg.attn_logit_softcap)
    return linear(out, p["o_proj"], p.get("o_bias")), key_cache, value_cache
