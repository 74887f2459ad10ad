"""GPT2LMHeadModel: pre-LayerNorm layers after learned absolute position embeddings; c_attn (fused q|k|v)
and every projection in Conv1D layout ([in, out], used as stored) with biases; gelu_new MLP; multi-head
attention scaled by head_dim^-1/2 (1 without scale_attn_weights), also divided by layer + 1 with
scale_attn_by_inverse_layer_idx; a tied head."""

from __future__ import annotations

from dataclasses import dataclass

import qtrace

from ..blocks.gpt_decoder import final_layer_norm, gpt_layer, gpt_weights, token_and_position_embedding
from ..config import ConfigReader, DecoderConfig, gpt2_style_fields, replace
from ..registry import Architecture, register
from ..weights import CONV1D

NAME = "GPT2LMHeadModel"
MODULES = {"input_layernorm": "ln_1", "qkv_proj": "attn.c_attn", "o_proj": "attn.c_proj",
           "post_attention_layernorm": "ln_2", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}


@dataclass(frozen=True)
class GPT2Config(DecoderConfig):
    scale_by_inverse_layer: bool = False


def read_config(reader: ConfigReader) -> DecoderConfig:
    return GPT2Config(**gpt2_style_fields(reader, NAME, tie_word_embeddings=reader.get("tie_word_embeddings", True, bool)),
                      scale_by_inverse_layer=reader.get("scale_attn_by_inverse_layer_idx", False, bool))


def layer_config(cfg: GPT2Config, index: int) -> DecoderConfig:
    return replace(cfg, attention_scale=cfg.scale / (index + 1)) if cfg.scale_by_inverse_layer else cfg


def weights(cfg: DecoderConfig):
    return gpt_weights(cfg, "transformer.h.{i}.", MODULES, kind=CONV1D, embed="transformer.wte",
                       final_norm="transformer.ln_f", positions="transformer.wpe")


register(Architecture(NAME, read_config, weights, qtrace.function(gpt_layer, name="gpt2_layer"),
                      embed=token_and_position_embedding, final_norm=final_layer_norm, layer_config=layer_config,
                      notes="learned positions, Conv1D fused c_attn, LayerNorm with bias, gelu_new, tied head"))
