"""GraniteMoeForCausalLM: Granite's four scalars (embedding, attention, residual multipliers and
logits scaling) with a MoE feed-forward in every layer: top-k of the router logits, softmax over
those k; experts stored stacked (input_linear [E, 2I, H]: gate rows then up rows; output_linear
[E, H, I])."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer
from ..blocks.moe import HALVES, TOPK_SOFTMAX, MoeConfig, router_weights, stacked
from ..config import ConfigReader, common_fields
from ..registry import Architecture, register
from ..weights import attention_weights, causal_lm_weights, norms

NAME = "GraniteMoeForCausalLM"


def read_config(reader: ConfigReader) -> MoeConfig:
    layers = reader.require("num_hidden_layers")
    return MoeConfig(**common_fields(
        reader, NAME, embedding_multiplier=reader.get("embedding_multiplier", 1.0, float),
        attention_scale=reader.get("attention_multiplier", 1.0, float),
        residual_multiplier=reader.get("residual_multiplier", 1.0, float),
        logits_divisor=reader.get("logits_scaling", 1.0, float)),
        num_experts=reader.require("num_local_experts"), experts_per_token=reader.require("num_experts_per_tok"),
        moe_intermediate_size=reader.require("intermediate_size"), moe_layers=(True,) * layers,
        router=TOPK_SOFTMAX, gate_up=HALVES)


def weights(cfg: MoeConfig):
    d, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts

    def layer(n: int) -> dict:
        prefix = f"model.layers.{n}."
        moe = prefix + "block_sparse_moe."
        return {**norms(cfg, prefix, ("input_layernorm", "post_attention_layernorm")),
                **attention_weights(cfg, prefix + "self_attn.", o_bias=cfg.attention_bias),
                **router_weights(cfg, moe + "router.layer.weight"),
                "experts_gate_up": stacked(moe + "input_linear.weight", (e, 2 * i, d)),
                "experts_down": stacked(moe + "output_linear.weight", (e, d, i))}

    return causal_lm_weights(cfg, layer)


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="granitemoe_layer"),
                      notes="Granite scalars + MoE (top-k then softmax), stacked experts"))
