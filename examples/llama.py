"""A Llama-family causal LM as pure functions over a params pytree, in the form the Cloud AI 100
compiler wants (design.md §6): KV cache written with ctx_scatter and read back with ctx_gather,
INT32_MAX beyond the live context, causality from position_ids, logits only at argmax(position_ids).

Covers LlamaForCausalLM (default and Llama 3 RoPE scaling), MistralForCausalLM (contexts no longer
than its sliding window) and Qwen2ForCausalLM (q/k/v bias), tied embeddings, grouped-query attention
and continuous batching. Runs eagerly on numpy (the reference) and traces with qtrace.

    cfg = LlamaConfig.tiny()
    params = init_params(cfg, seed=0)
    fn, args = causal_lm_signature(cfg, params, ctx_len=128)
    lowered = qtrace.lower(fn, args)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

import qtrace
from qtrace.primitives import (INT32_MAX, arange, argmax, concatenate, ctx_gather, ctx_gather_cb, ctx_scatter,
                               ctx_scatter_cb, gather, rms_norm, silu, softmax, take, transpose, where)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ConfigError(qtrace.QtraceError, ValueError):
    """A checkpoint's config.json is unusable."""


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # hashable: a static argument of layers
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None  # attention sees only this many latest positions (None: all)
    architecture: str = "LlamaForCausalLM"

    @staticmethod
    def tiny(**overrides: Any) -> "LlamaConfig":
        """The embedded default: small enough to export and run in a second."""
        base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                    rope_theta=10000.0, max_position_embeddings=512)
        base.update(overrides)
        return LlamaConfig(**base)

    @staticmethod
    def from_hf(config: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Read a Hugging Face config.json dict (Llama, Mistral or Qwen2)."""
        architectures = config.get("architectures") or []
        arch = next((a for a in architectures if a in ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(f"{source}: unsupported architecture {architectures or config.get('model_type')!r}; "
                              f"qtrace supports {', '.join(ARCHITECTURES)}")
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            # transformers >= 5 writes `rope_parameters` (rope_theta inside); older versions write
            # `rope_theta` and `rope_scaling` at the top level.
            scaling = config.get("rope_parameters") or config.get("rope_scaling")
            rope_theta = config.get("rope_theta", 10000.0)
            if scaling is not None:
                if not isinstance(scaling, dict):
                    raise ConfigError(f"{source}: rope_parameters must be an object, got {scaling!r}")
                rope_theta = scaling.get("rope_theta", rope_theta)
                kind = scaling.get("rope_type", scaling.get("type", "default"))
                if kind not in ("default", "llama3"):
                    raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (default, llama3)")
                scaling = None if kind == "default" else tuple(sorted(
                    (k, v) for k, v in scaling.items() if isinstance(v, (int, float, str)) and k != "rope_theta"))
            # Mistral always slides its attention window; Qwen2 only with use_sliding_window.
            window = config.get("sliding_window") if arch == "MistralForCausalLM" or \
                (arch == "Qwen2ForCausalLM" and config.get("use_sliding_window")) else None
            return LlamaConfig(
                vocab_size=int(config["vocab_size"]), hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]), num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope_theta), rope_scaling=scaling,
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", arch == "Qwen2ForCausalLM")),
                sliding_window=int(window) if window else None, architecture=arch)
        except KeyError as exc:
            raise ConfigError(f"{source}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{source}: malformed field: {exc}") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict transformers can read (used to make test checkpoints)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("architecture", "rope_scaling")}
        out["architectures"] = [self.architecture]
        out["model_type"] = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                             "Qwen2ForCausalLM": "qwen2"}[self.architecture]
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        out["hidden_act"] = "silu"
        return out


# -- parameters -----------------------------------------------------------------------------------------
# Linear weights are stored as the checkpoint stores them, [out_features, in_features]. The model
# transposes them once in the main graph (not inside the layer function), where constant folding
# pre-transposes in-memory weights and leaves memory-mapped checkpoint weights untouched.

LINEAR_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def init_params(cfg: LlamaConfig, seed: int = 0, dtype: Any = np.float32) -> dict[str, Any]:
    """Random weights (the embedded default needs no download)."""
    rng = np.random.default_rng(seed)

    def dense(out_features: int, in_features: int) -> np.ndarray:
        return (rng.standard_normal((out_features, in_features)) / math.sqrt(in_features)).astype(dtype)

    def norm(size: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(size)).astype(dtype)

    q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layers = []
    for _ in range(cfg.num_hidden_layers):
        layer = {
            "input_layernorm": norm(cfg.hidden_size),
            "q_proj": dense(q_size, cfg.hidden_size), "k_proj": dense(kv_size, cfg.hidden_size),
            "v_proj": dense(kv_size, cfg.hidden_size), "o_proj": dense(cfg.hidden_size, q_size),
            "post_attention_layernorm": norm(cfg.hidden_size),
            "gate_proj": dense(cfg.intermediate_size, cfg.hidden_size),
            "up_proj": dense(cfg.intermediate_size, cfg.hidden_size),
            "down_proj": dense(cfg.hidden_size, cfg.intermediate_size),
        }
        if cfg.attention_bias:
            for name, size in (("q_bias", q_size), ("k_bias", kv_size), ("v_bias", kv_size)):
                layer[name] = (0.1 * rng.standard_normal(size)).astype(dtype)
        layers.append(layer)
    embed = (rng.standard_normal((cfg.vocab_size, cfg.hidden_size)) * 0.5).astype(dtype)
    params = {"embed_tokens": embed, "layers": layers, "norm": norm(cfg.hidden_size)}
    params["lm_head"] = embed if cfg.tie_word_embeddings else dense(cfg.vocab_size, cfg.hidden_size)
    return params


# -- RoPE -----------------------------------------------------------------------------------------------


def rope_inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim))
    if not cfg.rope_scaling:
        return inv_freq
    scaling = dict(cfg.rope_scaling)
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_tables(cfg: LlamaConfig, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables [positions, head_dim] (constants, indexed by position_ids in the model)."""
    freqs = np.outer(np.arange(positions, dtype=np.float64), rope_inverse_frequencies(cfg))
    angles = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rotate_half(x: Any) -> Any:
    half = x.shape[-1] // 2
    return concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: Any, cos: Any, sin: Any) -> Any:
    """x [B,H,S,hd] with cos/sin [B,1,S,hd]."""
    return x * cos + rotate_half(x) * sin


# -- the model ------------------------------------------------------------------------------------------


def linear(x: Any, kernel: Any, bias: Any = None) -> Any:
    """x @ kernel (+ bias), kernel [in_features, out_features]."""
    y = x @ kernel
    return y if bias is None else y + bias


def kernels(layer: dict[str, Any]) -> dict[str, Any]:
    """A layer's params with linear weights as [in, out] kernels."""
    return {k: transpose(v) if k in LINEAR_WEIGHTS else v for k, v in layer.items()}


def _split_heads(x: Any, heads: int, head_dim: int) -> Any:
    batch, seq = x.shape[0], x.shape[1]
    return x.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)


def attention_masks(position_ids: Any, ctx_len: Any) -> tuple[Any, Any, Any]:
    """What every layer's attention reads from position_ids, computed once per step at model level:
    the CtxGather indices (arange(ctx_len), INT32_MAX past max(position_ids)) [B,1,C], the slots
    past the live context [B,1,C,1] and the causal mask [B,1,S,C]. Padding rows (position -1) attend
    slot 0, so no row is all -inf."""
    slots = arange(ctx_len)[None, None, :]                                 # [1,1,C]
    invalid = slots > position_ids.max(axis=1, keepdims=True)[:, :, None]  # [B,1,C]
    ctx_indices = where(invalid, INT32_MAX, slots)
    query_positions = np.maximum(position_ids, 0)[:, None, :, None]
    causal = slots[:, :, None, :] > query_positions                        # [B,1,S,C]
    return ctx_indices, invalid[:, :, :, None], causal


def attention(x: Any, p: dict[str, Any], cos: Any, sin: Any, position_ids: Any, masks: tuple[Any, Any, Any],
              past_key: Any, past_value: Any, batch_index: Any, cfg: LlamaConfig) -> tuple[Any, Any, Any]:
    batch, seq = x.shape[0], x.shape[1]
    q = _split_heads(linear(x, p["q_proj"], p.get("q_bias")), cfg.num_attention_heads, cfg.head_dim)
    k = _split_heads(linear(x, p["k_proj"], p.get("k_bias")), cfg.num_key_value_heads, cfg.head_dim)
    v = _split_heads(linear(x, p["v_proj"], p.get("v_bias")), cfg.num_key_value_heads, cfg.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    # Write the new keys/values, then read back the whole cache up to the live context.
    if batch_index is None:
        key_cache = ctx_scatter(past_key, position_ids, k)
        value_cache = ctx_scatter(past_value, position_ids, v)
    else:
        key_cache = ctx_scatter_cb(past_key, batch_index, position_ids, k)
        value_cache = ctx_scatter_cb(past_value, batch_index, position_ids, v)
    ctx_indices, invalid, causal = masks
    if batch_index is None:
        keys, values = ctx_gather(key_cache, ctx_indices), ctx_gather(value_cache, ctx_indices)
    else:
        keys = ctx_gather_cb(key_cache, batch_index, ctx_indices)
        values = ctx_gather_cb(value_cache, batch_index, ctx_indices)
    values = where(invalid, 0.0, values)

    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    keys, values = np.repeat(keys, groups, axis=1), np.repeat(values, groups, axis=1)
    scores = (q @ keys.transpose(0, 1, 3, 2)) * (cfg.head_dim ** -0.5)       # [B,H,S,C]
    scores = where(causal, -np.inf, scores)
    out = softmax(scores, axis=-1) @ values                                 # [B,H,S,hd]
    out = out.transpose(0, 2, 1, 3).reshape(batch, seq, cfg.num_attention_heads * cfg.head_dim)
    return linear(out, p["o_proj"]), key_cache, value_cache


def mlp(x: Any, p: dict[str, Any]) -> Any:
    return linear(silu(linear(x, p["gate_proj"])) * linear(x, p["up_proj"]), p["down_proj"])


@qtrace.function
def decoder_layer(x: Any, p: dict[str, Any], cos: Any, sin: Any, position_ids: Any, masks: tuple[Any, Any, Any],
                  past_key: Any, past_value: Any, batch_index: Any, cfg: LlamaConfig) -> tuple[Any, Any, Any]:
    attn, key_cache, value_cache = attention(rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps), p, cos, sin,
                                             position_ids, masks, past_key, past_value, batch_index, cfg)
    h = x + attn
    return h + mlp(rms_norm(h, p["post_attention_layernorm"], cfg.rms_norm_eps), p), key_cache, value_cache


def causal_lm(params: dict[str, Any], cfg: LlamaConfig, rope: tuple[np.ndarray, np.ndarray], input_ids: Any,
              position_ids: Any, past_key_values: dict[str, Any], batch_index: Any = None,
              layer_functions: bool = True) -> dict[str, Any]:
    """One prefill or decode step. Returns logits [B,1,vocab] at argmax(position_ids) of each row
    and the updated caches under their input names (lowering names them *_RetainedState)."""
    h = take(params["embed_tokens"], input_ids, axis=0)
    cos_table, sin_table = rope
    safe_positions = np.maximum(position_ids, 0)
    cos = take(cos_table, safe_positions, axis=0)[:, None]                 # [B,1,S,hd]
    sin = take(sin_table, safe_positions, axis=0)[:, None]
    masks = attention_masks(position_ids, past_key_values["past_key.0"].shape[2])
    layer = decoder_layer if layer_functions else decoder_layer.__wrapped__
    outputs: dict[str, Any] = {}
    for i, p in enumerate(params["layers"]):
        with qtrace.scope(f"layers.{i}"):
            h, key_cache, value_cache = layer(h, kernels(p), cos, sin, position_ids, masks,
                                              past_key_values[f"past_key.{i}"], past_key_values[f"past_value.{i}"],
                                              batch_index, cfg)
        outputs[f"past_key.{i}"], outputs[f"past_value.{i}"] = key_cache, value_cache
    h = rms_norm(h, params["norm"], cfg.rms_norm_eps)
    last = argmax(position_ids, axis=1, keepdims=True)                     # [B,1]
    rows = arange(h.shape[0])[:, None]
    h_last = gather(h, [rows, last], axis=0)                               # [B,1,D]
    return {"logits": linear(h_last, transpose(params["lm_head"])), **outputs}


def causal_lm_signature(cfg: LlamaConfig, params: dict[str, Any], *, ctx_len: int | str = "ctx_len",
                        batch_size: int | str = "batch_size", seq_len: int | str = "seq_len",
                        full_batch_size: int | str | None = None, dtype: Any = np.float32,
                        layer_functions: bool = True, max_ctx_len: int = 0) -> tuple[Any, tuple]:
    """The function to lower and its example specs, with QEfficient's input names and dims.
    The RoPE tables cover max_position_embeddings, ctx_len when it is an int, and max_ctx_len (the
    largest context a symbolic ctx_len will be specialized to)."""
    max_positions = max(cfg.max_position_embeddings, ctx_len if isinstance(ctx_len, int) else 0, max_ctx_len)
    # The tables share the cache's dtype, so float16 weights compute in float16 throughout.
    rope = tuple(table.astype(dtype) for table in rope_tables(cfg, max_positions))
    cache_batch = batch_size if full_batch_size is None else full_batch_size
    cache = qtrace.ShapeDtype((cache_batch, cfg.num_key_value_heads, ctx_len, cfg.head_dim), dtype)
    past = {}
    for i in range(cfg.num_hidden_layers):
        past[f"past_key.{i}"] = cache
        past[f"past_value.{i}"] = cache
    ids = qtrace.ShapeDtype((batch_size, seq_len), np.int64)
    args: tuple = (ids, ids, past)
    if full_batch_size is not None:
        args += (qtrace.ShapeDtype((batch_size, 1), np.int64),)
    fn = functools.partial(causal_lm, params, cfg, rope, layer_functions=layer_functions)
    return fn, args


def empty_cache(cfg: LlamaConfig, batch: int, ctx_len: int, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    shape = (batch, cfg.num_key_value_heads, ctx_len, cfg.head_dim)
    cache = {}
    for i in range(cfg.num_hidden_layers):
        cache[f"past_key.{i}"] = np.zeros(shape, dtype)
        cache[f"past_value.{i}"] = np.zeros(shape, dtype)
    return cache


def load_config(path: str) -> LlamaConfig:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return LlamaConfig.from_hf(data, path)
