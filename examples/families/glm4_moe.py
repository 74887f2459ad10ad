"""Glm4MoeForCausalLM: the first `first_k_dense_replace` layers keep a dense MLP, the rest are MoE
with a sigmoid router whose e_score_correction_bias takes part in choosing the experts only
(optionally among the best topk_group of n_group groups), the chosen scores renormalised and
multiplied by routed_scaling_factor, plus a shared expert. Attention: q/k/v bias, optional per-head
q/k RMSNorm, partial rotate-half RoPE (partial_rotary_factor, 0.5 by default)."""

from __future__ import annotations

from dataclasses import dataclass

import qtrace

from ..blocks.decoder import pre_norm_layer
from ..blocks.moe import (SIGMOID_TOPK, MoeConfig, moe_layer_pattern, per_expert_gated_mlp, router_weights,
                          shared_expert_weights)
from ..config import ConfigReader, common_fields
from ..registry import Architecture, register
from ..weights import BIAS, Weight, attention_weights, causal_lm_weights, gated_mlp_weights, norms

NAME = "Glm4MoeForCausalLM"


@dataclass(frozen=True)
class Glm4MoeConfig(MoeConfig):
    use_qk_norm: bool = False  # per-head q/k RMSNorm (GLM-4.5 has none; its Air variants may)


def read_config(reader: ConfigReader) -> Glm4MoeConfig:
    layers = reader.require("num_hidden_layers")
    experts = reader.require("n_routed_experts")
    groups, best_groups = reader.get("n_group", 1), reader.get("topk_group", 1)
    if experts % groups:
        raise reader.error("n_group", f"= {groups} does not divide n_routed_experts = {experts}")
    if best_groups > groups:
        raise reader.error("topk_group", f"= {best_groups} exceeds n_group = {groups}")
    first_moe = reader.get("first_k_dense_replace", 1, positive=False)
    parameters = dict(reader.data.get("rope_parameters") or reader.data.get("rope_scaling") or {})
    parameters.setdefault("partial_rotary_factor", reader.data.get("partial_rotary_factor", 0.5))
    moe_size = reader.require("moe_intermediate_size")
    return Glm4MoeConfig(**common_fields(reader, NAME, rope=reader.rope(parameters=parameters)),
                     num_experts=experts, experts_per_token=reader.require("num_experts_per_tok"),
                     moe_intermediate_size=moe_size, moe_layers=moe_layer_pattern(layers, lambda i: i >= first_moe),
                     router=SIGMOID_TOPK, norm_topk_prob=reader.get("norm_topk_prob", True, bool),
                     routed_scaling_factor=reader.get("routed_scaling_factor", 1.0, float),
                     n_group=groups, topk_group=best_groups,
                     shared_intermediate_size=moe_size * reader.get("n_shared_experts", 0, positive=False),
                     use_qk_norm=reader.get("use_qk_norm", False, bool))


def weights(cfg: Glm4MoeConfig):
    def layer(i: int) -> dict:
        prefix = f"model.layers.{i}."
        if cfg.is_moe(i):
            mlp = {**router_weights(cfg, prefix + "mlp.gate.weight"),
                   "router_correction_bias": Weight(prefix + "mlp.gate.e_score_correction_bias", (cfg.num_experts,),
                                                    BIAS),
                   **per_expert_gated_mlp(cfg, prefix + "mlp.experts.")}
            if cfg.shared_intermediate_size:
                mlp.update(shared_expert_weights(cfg, prefix + "mlp.shared_experts."))
        else:
            mlp = gated_mlp_weights(cfg, prefix + "mlp.")
        return {**norms(cfg, prefix, ("input_layernorm", "post_attention_layernorm")),
                **attention_weights(cfg, prefix + "self_attn.", qk_norm="head" if cfg.use_qk_norm else None), **mlp}

    return causal_lm_weights(cfg, layer)


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="glm4_moe_layer"),
                      notes="dense then MoE layers: sigmoid router with selection bias, groups, scaling, "
                            "shared expert; partial RoPE"))
