"""Qwen2ForCausalLM: Llama's layer with q/k/v biases; with `use_sliding_window`, layers from
`max_window_layers` on (or as `layer_types` lists them) attend a sliding window."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer, pre_norm_layer_weights
from ..config import ConfigReader, DecoderConfig, common_fields
from ..registry import Architecture, register
from ..weights import causal_lm_weights

NAME = "Qwen2ForCausalLM"


def read_config(reader: ConfigReader) -> DecoderConfig:
    layer_types, window = reader.opt_in_window()
    return DecoderConfig(**common_fields(reader, NAME, attention_bias=True, layer_types=layer_types,
                                         sliding_window=window))


def weights(cfg: DecoderConfig):
    return causal_lm_weights(cfg, lambda i: pre_norm_layer_weights(cfg, i))


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="qwen2_layer"),
                      notes="q/k/v bias, optional sliding window from max_window_layers"))
