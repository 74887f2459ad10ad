"""GraniteForCausalLM: Llama's layer with four scalars: embeddings x embedding_multiplier, attention
scale attention_multiplier (instead of head_dim^-1/2), each sublayer's output x residual_multiplier
before its residual add, and logits / logits_scaling."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer, pre_norm_layer_weights
from ..config import ConfigReader, DecoderConfig, common_fields
from ..registry import Architecture, register
from ..weights import causal_lm_weights

NAME = "GraniteForCausalLM"


def read_config(reader: ConfigReader) -> DecoderConfig:
    return DecoderConfig(**common_fields(
        reader, NAME, mlp_bias=reader.get("mlp_bias", False, bool),
        embedding_multiplier=reader.get("embedding_multiplier", 1.0, float),
        attention_scale=reader.get("attention_multiplier", 1.0, float),
        residual_multiplier=reader.get("residual_multiplier", 1.0, float),
        logits_divisor=reader.get("logits_scaling", 1.0, float)))


def weights(cfg: DecoderConfig):
    return causal_lm_weights(cfg, lambda i: pre_norm_layer_weights(cfg, i, o_bias=cfg.attention_bias,
                                                                   mlp_bias=cfg.mlp_bias))


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="granite_layer"),
                      notes="embedding/attention/residual multipliers, logits scaling"))
