"""The causal-LM driver and its QEfficient-compatible signature.

One step (prefill chunk or decode) of any zoo model:

    embed -> for each layer (under qtrace.scope("layers.i"), a @qtrace.function): the family's layer
    -> final norm -> the hidden state at argmax(position_ids) of each row -> head -> logits [B,1,V]

Everything a layer reads from the step (cache indices, masks, RoPE at the positions) is computed
here once per step and passed in; the layer itself sees only arrays of fixed meaning, so all layers of
one kind share one traced body. Inputs and outputs carry QEfficient's names and dims: `input_ids`,
`position_ids` [batch_size, seq_len], `past_key.{i}`/`past_value.{i}` [batch_size (or
full_batch_size), kv_heads, ctx_len, head_dim], optional `batch_index` [batch_size, 1]; outputs
`logits` and the updated caches, which lowering names `*_RetainedState`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

import qtrace
from qtrace.primitives import arange, argmax, gather, take, tanh, transpose

from ..config import DecoderConfig
from ..registry import Architecture
from ..weights import linear_keys
from .attention import AttentionInputs
from .layers import linear, norm
from .masks import cache_indices, score_bias
from .rope import RopeTables, model_rope_tables, rope_at, rope_name


@dataclass
class Model:
    """An architecture, its config and its params (memory maps of a checkpoint, or random)."""

    arch: Architecture
    cfg: DecoderConfig
    params: dict[str, Any]

    @property
    def dtype(self) -> np.dtype:
        return np.asarray(self.params["embed_tokens"][:0]).dtype

    def cache_shape(self, layer: int, batch: Any, ctx_len: Any) -> tuple[Any, ...]:
        return (batch, self.cfg.num_key_value_heads, ctx_len, self.cfg.head_dim)

    def empty_cache(self, batch: int, ctx_len: int, dtype: Any = None) -> dict[str, np.ndarray]:
        dtype = dtype or self.dtype
        cache = {}
        for i in range(self.cfg.num_hidden_layers):
            cache[f"past_key.{i}"] = np.zeros(self.cache_shape(i, batch, ctx_len), dtype)
            cache[f"past_value.{i}"] = np.zeros(self.cache_shape(i, batch, ctx_len), dtype)
        return cache

    def signature(self, *, ctx_len: int | str = "ctx_len", batch_size: int | str = "batch_size",
                  seq_len: int | str = "seq_len", full_batch_size: int | str | None = None,
                  layer_functions: bool = True, max_ctx_len: int = 0) -> tuple[Any, tuple]:
        """The step function to lower (or run eagerly) and its example specs. RoPE tables cover the
        largest context the export will be specialized to (an int ctx_len, or max_ctx_len) and, failing
        that, max_position_embeddings."""
        positions = max(ctx_len if isinstance(ctx_len, int) else 0, max_ctx_len) or self.cfg.max_position_embeddings
        tables = model_rope_tables(self.cfg, positions, self.dtype)
        cache_batch = batch_size if full_batch_size is None else full_batch_size
        past = {}
        for i in range(self.cfg.num_hidden_layers):
            spec = qtrace.ShapeDtype(self.cache_shape(i, cache_batch, ctx_len), self.dtype)
            past[f"past_key.{i}"], past[f"past_value.{i}"] = spec, spec
        ids = qtrace.ShapeDtype((batch_size, seq_len), np.int64)
        args: tuple = (ids, ids, past)
        if full_batch_size is not None:
            args += (qtrace.ShapeDtype((batch_size, 1), np.int64),)
        fn = functools.partial(causal_lm_step, self.arch, self.cfg, self.params, tables,
                               layer_functions=layer_functions)
        return fn, args


# -- default hooks (a family's Architecture may replace each) -------------------------------------------


def token_embedding(params: dict[str, Any], input_ids: Any, position_ids: Any, cfg: DecoderConfig) -> Any:
    h = take(params["embed_tokens"], input_ids, axis=0)
    if cfg.embedding_multiplier != 1.0:
        # transformers multiplies in the embedding's dtype (Gemma's normalizer is a tensor of it)
        h = h * np.asarray(cfg.embedding_multiplier, dtype=h.dtype)
    return h


def final_rms_norm(h: Any, params: dict[str, Any], cfg: DecoderConfig) -> Any:
    return norm(h, params["norm"], cfg.norm_eps)


def lm_head(h: Any, params: dict[str, Any], cfg: DecoderConfig) -> Any:
    logits = linear(h, transpose(params["lm_head"]), params.get("lm_head_bias"))
    if cfg.logits_divisor != 1.0:
        logits = logits / cfg.logits_divisor
    if cfg.final_logit_softcap is not None:
        logits = tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits


# -- one step -------------------------------------------------------------------------------------------


class StepInputs:
    """The per-step arrays layers read, built lazily once per (attention kind, cache length, RoPE)."""

    def __init__(self, cfg: DecoderConfig, tables: dict[str, RopeTables], position_ids: Any, batch_index: Any,
                 dtype: Any):
        self.cfg, self.tables, self.position_ids, self.batch_index, self.dtype = cfg, tables, position_ids, batch_index, dtype
        self._made: dict[Any, Any] = {}

    def _once(self, key: Any, make: Any) -> Any:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def for_layer(self, layer: int, ctx_len: Any) -> AttentionInputs:
        kind = self.cfg.layer_type(layer)
        indices = self._once(("indices", ctx_len), lambda: cache_indices(self.position_ids, ctx_len))
        bias = self._once(("bias", kind, ctx_len),
                          lambda: score_bias(self.position_ids, ctx_len, kind, self.cfg, self.dtype))
        spec = self.cfg.rope_for(kind)
        cos = sin = rotation = None
        if spec is not None:
            table = self.tables[rope_name(self.cfg, spec)]
            cos, sin = self._once(("rope", rope_name(self.cfg, spec)), lambda: rope_at(table, self.position_ids))
            rotation = table.rotation
        return AttentionInputs(self.position_ids, indices, bias, self.batch_index, cos, sin, rotation)


def causal_lm_step(arch: Architecture, cfg: DecoderConfig, params: dict[str, Any], tables: dict[str, RopeTables],
                   input_ids: Any, position_ids: Any, past_key_values: dict[str, Any], batch_index: Any = None, *,
                   layer_functions: bool = True) -> dict[str, Any]:
    """One prefill or decode step: logits [B,1,vocab] at argmax(position_ids) of each row, and the
    updated caches under their input names."""
    h = (arch.embed or token_embedding)(params, input_ids, position_ids, cfg)
    step = StepInputs(cfg, tables, position_ids, batch_index, h.dtype)
    with qtrace.scope("step"):
        layer_inputs = [step.for_layer(i, past_key_values[f"past_key.{i}"].shape[2]) for i in range(len(params["layers"]))]
    linear_names = _linear_names(arch, cfg)
    layer = arch.layer if layer_functions else getattr(arch.layer, "__wrapped__", arch.layer)
    outputs: dict[str, Any] = {}
    for i, p in enumerate(params["layers"]):
        past_key, past_value = past_key_values[f"past_key.{i}"], past_key_values[f"past_value.{i}"]
        kernels = {k: transpose(v) if k in linear_names else v for k, v in p.items()}
        with qtrace.scope(f"layers.{i}"):
            h, key_cache, value_cache = layer(h, kernels, layer_inputs[i], past_key, past_value, cfg)
        outputs[f"past_key.{i}"], outputs[f"past_value.{i}"] = key_cache, value_cache
    h = (arch.final_norm or final_rms_norm)(h, params, cfg)
    last = argmax(position_ids, axis=1, keepdims=True)                     # [B,1]
    rows = arange(h.shape[0])[:, None]
    h_last = gather(h, [rows, last], axis=0)                               # [B,1,D]
    return {"logits": (arch.head or lm_head)(h_last, params, cfg), **outputs}


@functools.lru_cache(maxsize=None)
def _linear_names(arch: Architecture, cfg: DecoderConfig) -> frozenset[str]:
    return linear_keys(arch.weights(cfg))
