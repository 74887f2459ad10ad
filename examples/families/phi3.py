"""Phi3ForCausalLM: Llama's layer with fused qkv_proj and gate_up_proj (split at load into views of
the checkpoint), longrope (short factors until a sequence passes original_max_position_embeddings,
then long ones, cos/sin x the attention factor), partial rotary, and an optional sliding window."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer, pre_norm_layer_weights
from ..config import ConfigReader, DecoderConfig, common_fields
from ..registry import Architecture, register
from ..weights import causal_lm_weights

NAME = "Phi3ForCausalLM"


def read_config(reader: ConfigReader) -> DecoderConfig:
    return DecoderConfig(**common_fields(reader, NAME, **reader.every_layer_window()))


def weights(cfg: DecoderConfig):
    return causal_lm_weights(cfg, lambda i: pre_norm_layer_weights(cfg, i, fused_qkv="qkv_proj",
                                                                   fused_gate_up="gate_up_proj"))


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="phi3_layer"),
                      notes="fused qkv/gate_up, longrope switching to long factors, partial rotary, window"))
