"""Olmo2ForCausalLM: no pre-norms; each sublayer's output is normed before its residual add, and q
and k are RMS-normed over the whole projection (before the split into heads and RoPE)."""

from __future__ import annotations

from typing import Any

import qtrace

from ..blocks import AttentionInputs, gated_mlp, norm, self_attention
from ..config import ConfigReader, DecoderConfig, common_fields
from ..registry import Architecture, register
from ..weights import attention_weights, causal_lm_weights, gated_mlp_weights, norms

NAME = "Olmo2ForCausalLM"


def read_config(reader: ConfigReader) -> DecoderConfig:
    return DecoderConfig(**common_fields(reader, NAME))


def weights(cfg: DecoderConfig):
    def layer(i: int) -> dict:
        prefix = f"model.layers.{i}."
        return {**norms(cfg, prefix, ("post_attention_layernorm", "post_feedforward_layernorm")),
                **attention_weights(cfg, prefix + "self_attn.", qk_norm="projection"),
                **gated_mlp_weights(cfg, prefix + "mlp.")}

    return causal_lm_weights(cfg, layer)


@qtrace.function
def olmo2_layer(x: Any, p: dict[str, Any], inputs: AttentionInputs, past_key: Any, past_value: Any,
                cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    attn, key_cache, value_cache = self_attention(x, p, inputs, past_key, past_value, cfg)
    h = x + norm(attn, p["post_attention_layernorm"], cfg.norm_eps)
    return h + norm(gated_mlp(h, p, cfg.hidden_act), p["post_feedforward_layernorm"], cfg.norm_eps), key_cache, \
        value_cache


register(Architecture(NAME, read_config, weights, olmo2_layer,
                      notes="post-sublayer norms, whole-projection q/k RMSNorm"))
