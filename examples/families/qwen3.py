"""Qwen3ForCausalLM: Llama's layer with an RMSNorm over each head of q and k (before RoPE), an
explicit head_dim, and Qwen's opt-in sliding window."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer, pre_norm_layer_weights
from ..config import ConfigReader, DecoderConfig, common_fields
from ..registry import Architecture, register
from ..weights import causal_lm_weights

NAME = "Qwen3ForCausalLM"


def read_config(reader: ConfigReader) -> DecoderConfig:
    layer_types, window = reader.opt_in_window()
    return DecoderConfig(**common_fields(reader, NAME, layer_types=layer_types, sliding_window=window))


def weights(cfg: DecoderConfig):
    return causal_lm_weights(cfg, lambda i: pre_norm_layer_weights(cfg, i, qk_norm="head"))


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="qwen3_layer"),
                      notes="per-head q/k RMSNorm, explicit head_dim, optional sliding window"))
