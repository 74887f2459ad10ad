"""A Llama-style decoder written with plain numpy operators: no qtrace primitive appears in the
model except `arange` (numpy's cannot see a symbolic size). RMSNorm, softmax and silu are written
out; the KV cache is updated by index assignment. The `fuse` pass turns these spellings into the
single ops the accelerator runs (rms_norm, softmax, silu, ctx_scatter, ctx_gather).

    cfg = DecoderConfig(num_layers=2)
    fn, args = decoder_signature(cfg, init_params(cfg))
    graph = qtrace.trace(fn, args)

The same function runs eagerly on numpy arrays: it is its own reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

import qtrace
from qtrace.primitives import arange


@dataclass(frozen=True)
class DecoderConfig:
    num_layers: int = 2
    vocab_size: int = 128
    hidden_size: int = 32
    num_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 64
    rms_norm_eps: float = 1e-5
    max_positions: int = 64


def init_params(cfg: DecoderConfig, seed: int = 0) -> dict[str, Any]:
    """Random weights; linear weights are stored [in_features, out_features]."""
    rng = np.random.default_rng(seed)

    def dense(n_in: int, n_out: int) -> np.ndarray:
        return (rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(cfg.hidden_size)).astype(np.float32)

    attn = cfg.num_heads * cfg.head_dim
    layers = [{"input_norm": norm(), "wq": dense(cfg.hidden_size, attn), "wk": dense(cfg.hidden_size, attn),
               "wv": dense(cfg.hidden_size, attn), "wo": dense(attn, cfg.hidden_size), "post_norm": norm(),
               "w_gate": dense(cfg.hidden_size, cfg.intermediate_size),
               "w_up": dense(cfg.hidden_size, cfg.intermediate_size),
               "w_down": dense(cfg.intermediate_size, cfg.hidden_size)}
              for _ in range(cfg.num_layers)]
    half = cfg.head_dim // 2
    angles = np.arange(cfg.max_positions)[:, None] / 10000.0 ** (np.arange(half) / half)
    angles = np.concatenate([angles, angles], axis=-1)
    return {"embed": (0.5 * rng.standard_normal((cfg.vocab_size, cfg.hidden_size))).astype(np.float32),
            "layers": layers, "norm": norm(), "lm_head": dense(cfg.hidden_size, cfg.vocab_size),
            "rope_cos": np.cos(angles).astype(np.float32), "rope_sin": np.sin(angles).astype(np.float32)}


# -- the written-out operations -------------------------------------------------------------------------


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    return x * (1 / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)) * weight


def rms_norm_upcast(x: Any, weight: Any, eps: float) -> Any:
    """The Hugging Face spelling: normalize in float32, cast back, then scale."""
    h = x.astype(np.float32)
    normed = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * weight


def softmax(scores: Any) -> Any:
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sigmoid(x: Any) -> Any:
    return 1 / (1 + np.exp(-x))


def silu(x: Any) -> Any:
    return x * sigmoid(x)


def rotate_half(x: Any) -> Any:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def one_hot(ids: Any, size: int) -> Any:
    """Table lookups as a one-hot matmul: `np.take(table, ids)` dispatches on the table only, so a
    traced `ids` never reaches qtrace through it."""
    return (ids[..., None] == np.arange(size)).astype(np.float32)


# -- the model ------------------------------------------------------------------------------------------


def attention(x: Any, p: dict[str, Any], cos: Any, sin: Any, position_ids: Any, cache_k: Any, cache_v: Any,
              cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    batch, seq = position_ids.shape
    heads, head_dim = cfg.num_heads, cfg.head_dim
    q = (x @ p["wq"]).reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)
    k = (x @ p["wk"]).reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)
    v = (x @ p["wv"]).reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    # Write this step's keys and values at their positions, then read the whole cache back.
    b_idx = arange(batch)[:, None, None]
    h_idx = arange(heads)[None, :, None]
    cache_k[b_idx, h_idx, position_ids[:, None, :]] = k
    cache_v[b_idx, h_idx, position_ids[:, None, :]] = v
    slots = arange(cache_k.shape[2])
    keys = cache_k[b_idx, h_idx, slots[None, None, :]]
    values = cache_v[b_idx, h_idx, slots[None, None, :]]

    scores = q @ keys.transpose(0, 1, 3, 2) / np.sqrt(np.float32(head_dim))
    future = slots[None, None, None, :] > position_ids[:, None, :, None]
    scores = np.where(future, -np.inf, scores)
    out = (softmax(scores) @ values).transpose(0, 2, 1, 3).reshape(batch, seq, heads * head_dim)
    return out @ p["wo"], cache_k, cache_v


def mlp(x: Any, p: dict[str, Any]) -> Any:
    return (silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def decoder_layer(x: Any, p: dict[str, Any], cos: Any, sin: Any, position_ids: Any, cache_k: Any, cache_v: Any,
                  cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    attn, cache_k, cache_v = attention(rms_norm(x, p["input_norm"], cfg.rms_norm_eps), p, cos, sin, position_ids,
                                       cache_k, cache_v, cfg)
    h = x + attn
    return h + mlp(rms_norm_upcast(h, p["post_norm"], cfg.rms_norm_eps), p), cache_k, cache_v


def decoder(params: dict[str, Any], cfg: DecoderConfig, input_ids: Any, position_ids: Any,
            caches: dict[str, Any]) -> dict[str, Any]:
    """One step: logits for every position and the updated caches (under their input names)."""
    h = one_hot(input_ids, cfg.vocab_size) @ params["embed"]
    positions = one_hot(position_ids, cfg.max_positions)
    cos = (positions @ params["rope_cos"])[:, None]                    # [B,1,S,head_dim]
    sin = (positions @ params["rope_sin"])[:, None]
    outputs = {}
    for i, p in enumerate(params["layers"]):
        with qtrace.scope(f"layers.{i}"):
            h, outputs[f"past_key.{i}"], outputs[f"past_value.{i}"] = decoder_layer(
                h, p, cos, sin, position_ids, caches[f"past_key.{i}"], caches[f"past_value.{i}"], cfg)
    return {"logits": rms_norm(h, params["norm"], cfg.rms_norm_eps) @ params["lm_head"], **outputs}


def decoder_signature(cfg: DecoderConfig, params: dict[str, Any]) -> tuple[Any, tuple]:
    """The function to trace and its example specs (symbolic batch_size, seq_len, ctx_len)."""
    ids = qtrace.ShapeDtype(("batch_size", "seq_len"), np.int64)
    cache = qtrace.ShapeDtype(("batch_size", cfg.num_heads, "ctx_len", cfg.head_dim), np.float32)
    caches = {f"past_{kind}.{i}": cache for i in range(cfg.num_layers) for kind in ("key", "value")}
    return functools.partial(decoder, params, cfg), (ids, ids, caches)


def example_inputs(cfg: DecoderConfig, batch: int = 2, seq: int = 3, ctx_len: int = 8,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Concrete arguments for `decoder_signature`'s function: a prefill of `seq` tokens per row."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int64)
    position_ids = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
    caches = {f"past_{kind}.{i}": rng.standard_normal((batch, cfg.num_heads, ctx_len, cfg.head_dim)).astype(np.float32)
              for i in range(cfg.num_layers) for kind in ("key", "value")}
    return input_ids, position_ids, caches


def example_args(fn: Any) -> tuple[Any, tuple]:
    """For `qtrace dump examples/numpy_decoder.py:decoder`: a two-layer model."""
    cfg = DecoderConfig()
    return decoder_signature(cfg, init_params(cfg))
