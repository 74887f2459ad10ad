"""Qwen2ForCausalLM: Llama's layer with q/k/v biases; with `use_sliding_window`, layers from
`max_window_layers` on (or as `layer_types` lists them) attend a sliding window."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer, pre_norm_layer_weights
from ..config import FULL, SLIDING, ConfigReader, DecoderConfig, common_fields
from ..registry import Architecture, register
from ..weights import causal_lm_weights

NAME = "Qwen2ForCausalLM"


def sliding_layer_types(reader: ConfigReader) -> tuple[tuple[str, ...], int | None]:
    """(layer types, window) of a Qwen-style config: no window unless use_sliding_window."""
    layers = reader.require("num_hidden_layers")
    window = reader.get("sliding_window", None) if reader.get("use_sliding_window", False, bool) else None
    if window is None:
        return (FULL,) * layers, None
    if reader.has("layer_types"):
        return reader.layer_types(layers), window
    first = reader.get("max_window_layers", layers, int, positive=False)
    return tuple(SLIDING if i >= first else FULL for i in range(layers)), window


def read_config(reader: ConfigReader) -> DecoderConfig:
    layer_types, window = sliding_layer_types(reader)
    return DecoderConfig(**common_fields(reader, NAME, attention_bias=True, layer_types=layer_types,
                                         sliding_window=window))


def weights(cfg: DecoderConfig):
    return causal_lm_weights(cfg, lambda i: pre_norm_layer_weights(cfg, i))


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="qwen2_layer"),
                      notes="q/k/v bias, optional sliding window from max_window_layers"))
