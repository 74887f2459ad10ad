"""Starcoder2ForCausalLM: Llama's layout with LayerNorms with bias, biases on q/k/v/o and on a
non-gated gelu_pytorch_tanh MLP (c_fc, c_proj) when use_bias, grouped-query attention, RoPE, and a
sliding window over every layer when the config sets one (in the mask, on a full cache); a tied head."""

from __future__ import annotations

import qtrace

from ..blocks.gpt_decoder import ALL, final_layer_norm, gpt_layer, gpt_weights
from ..config import ConfigReader, DecoderConfig, common_fields
from ..registry import Architecture, register

NAME = "Starcoder2ForCausalLM"
MODULES = {"input_layernorm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
           "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
           "post_attention_layernorm": "post_attention_layernorm", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}


def read_config(reader: ConfigReader) -> DecoderConfig:
    return DecoderConfig(**common_fields(
        reader, NAME, norm_eps=reader.get("norm_epsilon", 1e-5, float),
        attention_bias=reader.get("use_bias", True, bool),
        hidden_act=reader.choice("hidden_act", "gelu_pytorch_tanh", ("gelu_pytorch_tanh", "gelu_new", "gelu")),
        tie_word_embeddings=reader.get("tie_word_embeddings", True, bool), **reader.every_layer_window()))


def weights(cfg: DecoderConfig):
    return gpt_weights(cfg, "model.layers.{i}.", MODULES, biased=ALL if cfg.attention_bias else (),
                       embed="model.embed_tokens", final_norm="model.norm")


register(Architecture(NAME, read_config, weights, qtrace.function(gpt_layer, name="starcoder2_layer"),
                      final_norm=final_layer_norm,
                      notes="LayerNorm with bias, biased projections, gelu-tanh MLP, sliding window"))
