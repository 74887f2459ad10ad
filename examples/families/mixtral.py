"""MixtralForCausalLM: Mistral's attention (with its optional sliding window) and a MoE feed-forward
in every layer: softmax router, top-k renormalised, SwiGLU experts stored one per expert
(block_sparse_moe.experts.{j}.w1 / w3 / w2 = gate / up / down)."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer
from ..blocks.moe import SOFTMAX_TOPK, MoeConfig, per_expert_gated_mlp, router_weights
from ..config import FULL, SLIDING, ConfigReader, common_fields
from ..registry import Architecture, register
from ..weights import attention_weights, causal_lm_weights, norms

NAME = "MixtralForCausalLM"


def read_config(reader: ConfigReader) -> MoeConfig:
    window = reader.get("sliding_window", None)
    layers = reader.require("num_hidden_layers")
    experts = reader.require("num_local_experts")
    return MoeConfig(**common_fields(reader, NAME, sliding_window=window,
                                     layer_types=((SLIDING if window else FULL),) * layers),
                     num_experts=experts, experts_per_token=reader.require("num_experts_per_tok"),
                     moe_intermediate_size=reader.require("intermediate_size"), moe_layers=(True,) * layers,
                     router=SOFTMAX_TOPK, norm_topk_prob=True)


def weights(cfg: MoeConfig):
    def layer(i: int) -> dict:
        prefix = f"model.layers.{i}."
        moe = prefix + "block_sparse_moe."
        return {**norms(cfg, prefix, ("input_layernorm", "post_attention_layernorm")),
                **attention_weights(cfg, prefix + "self_attn."),
                **router_weights(cfg, moe + "gate.weight"),
                **per_expert_gated_mlp(cfg, moe + "experts.", ("w1", "w3", "w2"))}

    return causal_lm_weights(cfg, layer)


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="mixtral_layer"),
                      notes="MoE: softmax router, top-k renormalised, per-expert SwiGLU; sliding window"))
