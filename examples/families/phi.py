"""PhiForCausalLM (Phi-1, Phi-1.5, Phi-2): attention and a gelu_new MLP in parallel off one LayerNorm;
biases on q/k/v/dense and fc1/fc2; rotate-half RoPE on the first partial_rotary_factor of each head;
optional LayerNorms over each head of q and k (qk_layernorm); a final LayerNorm; an lm_head with bias."""

from __future__ import annotations

from dataclasses import dataclass

import qtrace

from ..blocks.gpt_decoder import final_layer_norm, gpt_layer, gpt_weights
from ..config import ConfigReader, DecoderConfig, common_fields, replace
from ..registry import Architecture, register

NAME = "PhiForCausalLM"
MODULES = {"input_layernorm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
           "v_proj": "self_attn.v_proj", "o_proj": "self_attn.dense", "up_proj": "mlp.fc1", "down_proj": "mlp.fc2"}
QK_LAYERNORMS = {"q_layernorm": "self_attn.q_layernorm", "k_layernorm": "self_attn.k_layernorm"}


@dataclass(frozen=True)
class PhiConfig(DecoderConfig):
    qk_layernorm: bool = False


def read_config(reader: ConfigReader) -> DecoderConfig:
    rope = reader.rope()
    if "partial_rotary_factor" not in {**reader.data, **(reader.data.get("rope_parameters") or {})}:
        rope = replace(rope, partial_rotary_factor=0.5)  # Phi's default
    return PhiConfig(**common_fields(reader, NAME, rope=rope, norm_eps=reader.get("layer_norm_eps", 1e-5, float),
                                     hidden_act=reader.choice("hidden_act", "gelu_new", ("gelu_new", "gelu"))),
                     qk_layernorm=reader.get("qk_layernorm", False, bool))


def weights(cfg: PhiConfig):
    modules = {**MODULES, **(QK_LAYERNORMS if cfg.qk_layernorm else {})}
    return gpt_weights(cfg, "model.layers.{i}.", modules, embed="model.embed_tokens",
                       final_norm="model.final_layernorm", head_bias=True)


register(Architecture(NAME, read_config, weights, qtrace.function(gpt_layer, name="phi_layer"),
                      final_norm=final_layer_norm,
                      notes="parallel attention + MLP, partial rotate-half rotary, biases, lm_head bias"))
