"""Llama4ForCausalLM (the text model): MoE feed-forwards on the layers `moe_layers` lists (top-k of
the router logits; sigmoid(logit) scales the token before its expert; an always-on shared expert on
the unscaled token), dense gated MLPs (intermediate_size_mlp) elsewhere. RoPE layers rotate
interleaved (complex) pairs, may apply a weightless RMS ("L2") norm to q and k after RoPE, and attend
in chunks of attention_chunk_size as `layer_types` says; NoPE layers (no_rope_layers[i] == 0) have no
rotary embedding and, with attn_temperature_tuning, scale each query by
log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1 at position p."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import qtrace
from qtrace.primitives import log

from ..blocks.attention import AttentionInputs, cached_attention, project_qkv
from ..blocks.layers import linear, norm, unit_norm
from ..blocks.moe import IN_OUT, HALVES, SIGMOID_INPUT, MoeConfig, feed_forward, router_weights, \
    shared_expert_weights, stacked
from ..blocks.rope import apply_rope
from ..config import CHUNKED, FULL, ConfigReader, RopeSpec, common_fields
from ..registry import Architecture, register
from ..weights import attention_weights, causal_lm_weights, gated_mlp_weights, norms

NAME = "Llama4ForCausalLM"


@dataclass(frozen=True)
class Llama4Config(MoeConfig):
    rope_layers: tuple[bool, ...] = ()   # False: a NoPE layer
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 8192
    attn_scale: float = 0.1

    def rope_for_layer(self, index: int) -> RopeSpec | None:
        return self.rope if self.rope_layers[index] else None


def _layer_list(reader: ConfigReader, field: str, layers: int) -> list[int] | None:
    value = reader.data.get(field)
    if value is not None and (not isinstance(value, list) or not all(isinstance(v, int) for v in value)):
        raise reader.error(field, f"must be a list of integers, got {value!r}")
    return value


def read_config(reader: ConfigReader) -> Llama4Config:
    layers = reader.require("num_hidden_layers")
    rope_layers = _layer_list(reader, "no_rope_layers", layers)
    if rope_layers is None or not rope_layers:  # transformers' default: a NoPE layer every interval
        interval = reader.get("no_rope_layer_interval", 4)
        rope_layers = [int((i + 1) % interval != 0) for i in range(layers)]
    if len(rope_layers) != layers:
        raise reader.error("no_rope_layers", f"must list {layers} layers, got {len(rope_layers)}")
    moe_layers = _layer_list(reader, "moe_layers", layers)
    if moe_layers is None:
        step = reader.get("interleave_moe_layer_step", 1)
        moe_layers = list(range(step - 1, layers, step))
    if any(not 0 <= i < layers for i in moe_layers):
        raise reader.error("moe_layers", f"has indices outside 0..{layers - 1}: {moe_layers!r}")
    chunk = reader.get("attention_chunk_size", None)
    default_types = tuple(CHUNKED if rope and chunk is not None else FULL for rope in rope_layers)
    types = reader.layer_types(layers) if reader.has("layer_types") else default_types
    if CHUNKED in types and chunk is None:
        raise reader.error("attention_chunk_size", "is missing while layer_types has chunked_attention layers")
    size = reader.require("intermediate_size")
    return Llama4Config(**common_fields(reader, NAME, intermediate_size=reader.get("intermediate_size_mlp", size),
                                        rope=reader.rope(interleaved=True), layer_types=types,
                                        attention_chunk_size=chunk),
                        num_experts=reader.require("num_local_experts"),
                        experts_per_token=reader.require("num_experts_per_tok"), moe_intermediate_size=size,
                        moe_layers=tuple(i in moe_layers for i in range(layers)), router=SIGMOID_INPUT,
                        shared_intermediate_size=size, expert_layout=IN_OUT, gate_up=HALVES,
                        rope_layers=tuple(bool(r) for r in rope_layers),
                        use_qk_norm=reader.get("use_qk_norm", True, bool),
                        attn_temperature_tuning=reader.get("attn_temperature_tuning", True, bool),
                        floor_scale=reader.get("floor_scale", 8192), attn_scale=reader.get("attn_scale", 0.1, float))


def weights(cfg: Llama4Config):
    d, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts

    def layer(n: int) -> dict:
        prefix = f"model.layers.{n}."
        ff = prefix + "feed_forward."
        if cfg.is_moe(n):
            mlp = {**router_weights(cfg, ff + "router.weight"),
                   "experts_gate_up": stacked(ff + "experts.gate_up_proj", (e, d, 2 * i), IN_OUT),
                   "experts_down": stacked(ff + "experts.down_proj", (e, i, d), IN_OUT),
                   **shared_expert_weights(cfg, ff + "shared_expert.")}
        else:
            mlp = gated_mlp_weights(cfg, ff)
        return {**norms(cfg, prefix, ("input_layernorm", "post_attention_layernorm")),
                **attention_weights(cfg, prefix + "self_attn.", o_bias=cfg.attention_bias), **mlp}

    return causal_lm_weights(cfg, layer)


def query_temperature(position_ids: Any, cfg: Llama4Config, dtype: Any) -> Any:
    """[B,S,1,1]: log(floor((p + 1) / floor_scale) + 1) * attn_scale + 1 at each position p."""
    steps = ((position_ids + 1) // cfg.floor_scale).astype(dtype)
    return (log(steps + 1) * np.asarray(cfg.attn_scale, dtype) + 1)[:, :, None, None]


def llama4_attention(x: Any, p: dict[str, Any], inputs: AttentionInputs, past_key: Any, past_value: Any,
                     cfg: Llama4Config) -> tuple[Any, Any, Any]:
    q, k, v = project_qkv(x, p, cfg)
    if inputs.cos is not None:  # RoPE layer: rotate, then the weightless q/k norm
        q, k = apply_rope(q, inputs.cos, inputs.sin, inputs.rotation), apply_rope(k, inputs.cos, inputs.sin,
                                                                                 inputs.rotation)
        if cfg.use_qk_norm:
            q, k = unit_norm(q, cfg.norm_eps), unit_norm(k, cfg.norm_eps)
    elif cfg.attn_temperature_tuning:  # NoPE layer
        q = q * query_temperature(inputs.position_ids, cfg, q.dtype)
    out, key_cache, value_cache = cached_attention(q, k, v, inputs, past_key, past_value, scale=cfg.scale)
    return linear(out, p["o_proj"], p.get("o_bias")), key_cache, value_cache


@qtrace.function
def llama4_layer(x: Any, p: dict[str, Any], inputs: AttentionInputs, past_key: Any, past_value: Any,
                 cfg: Llama4Config) -> tuple[Any, Any, Any]:
    attn, key_cache, value_cache = llama4_attention(norm(x, p["input_layernorm"], cfg.norm_eps), p, inputs,
                                                    past_key, past_value, cfg)
    h = x + attn
    return h + feed_forward(norm(h, p["post_attention_layernorm"], cfg.norm_eps), p, cfg), key_cache, value_cache


register(Architecture(NAME, read_config, weights, llama4_layer,
                      notes="MoE interleaving, top-1 sigmoid-scaled input, shared expert, chunked attention, "
                            "NoPE layers with query temperature, interleaved RoPE, L2 q/k norm"))
