"""LlamaForCausalLM: pre-norm decoder, grouped-query attention, SwiGLU, RoPE (default, linear,
llama3, yarn, longrope); optional attention and MLP biases."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer, pre_norm_layer_weights
from ..config import ConfigReader, DecoderConfig, common_fields
from ..registry import Architecture, register
from ..weights import causal_lm_weights

NAME = "LlamaForCausalLM"


def read_config(reader: ConfigReader) -> DecoderConfig:
    return DecoderConfig(**common_fields(reader, NAME, mlp_bias=reader.get("mlp_bias", False, bool)))


def weights(cfg: DecoderConfig):
    return causal_lm_weights(cfg, lambda i: pre_norm_layer_weights(cfg, i, o_bias=cfg.attention_bias,
                                                                   mlp_bias=cfg.mlp_bias))


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="llama_layer"),
                      notes="RoPE default/linear/llama3/yarn/longrope, GQA, attention and MLP biases"))


def tiny_config(**overrides: object) -> dict:
    """The embedded default: a config.json for a random Llama small enough to export and run in a second."""
    config = {"architectures": [NAME], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512}
    config.update(overrides)
    return config
