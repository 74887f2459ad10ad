"""MistralForCausalLM: Llama's layer with every layer attending a sliding window of
`sliding_window` positions (none when the config gives null), applied in the mask on a full cache,
so any ctx_len and any prefill chunking are exact."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer, pre_norm_layer_weights
from ..config import ConfigReader, DecoderConfig, common_fields
from ..registry import Architecture, register
from ..weights import causal_lm_weights

NAME = "MistralForCausalLM"


def read_config(reader: ConfigReader) -> DecoderConfig:
    return DecoderConfig(**common_fields(reader, NAME, **reader.every_layer_window()))


def weights(cfg: DecoderConfig):
    return causal_lm_weights(cfg, lambda i: pre_norm_layer_weights(cfg, i))


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="mistral_layer"),
                      notes="sliding window on a full cache (exact for any ctx_len)"))
