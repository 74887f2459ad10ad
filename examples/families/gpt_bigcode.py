"""GPTBigCodeForCausalLM (StarCoder, Granite-20B-code): GPT-2's layer in Linear layout, with multi-query
attention inside the fused c_attn (q | one k head | one v head) or, without multi_query, multi-head
attention whose c_attn holds each head's q, k, v together; gelu_pytorch_tanh MLP; a tied head."""

from __future__ import annotations

import qtrace

from ..blocks.gpt_decoder import final_layer_norm, gpt_layer, gpt_weights, token_and_position_embedding
from ..config import ConfigReader, DecoderConfig, gpt2_style_fields
from ..registry import Architecture, register
from .gpt2 import MODULES

NAME = "GPTBigCodeForCausalLM"


def read_config(reader: ConfigReader) -> DecoderConfig:
    fields = gpt2_style_fields(reader, NAME, default_act="gelu_pytorch_tanh",
                               tie_word_embeddings=reader.get("tie_word_embeddings", True, bool))
    if reader.get("multi_query", True, bool):
        return DecoderConfig(**{**fields, "num_key_value_heads": 1})
    return DecoderConfig(**{**fields, "qkv_shards": fields["num_attention_heads"]})


def weights(cfg: DecoderConfig):
    return gpt_weights(cfg, "transformer.h.{i}.", MODULES, embed="transformer.wte", final_norm="transformer.ln_f",
                       positions="transformer.wpe")


register(Architecture(NAME, read_config, weights, qtrace.function(gpt_layer, name="gpt_bigcode_layer"),
                      embed=token_and_position_embedding, final_norm=final_layer_norm,
                      notes="GPT-2 block in Linear layout, multi-query attention in the fused c_attn"))
