"""Qwen3MoeForCausalLM: Qwen3's attention (per-head q/k RMSNorm, explicit head_dim) with MoE
feed-forwards on the layers decoder_sparse_step selects (less mlp_only_layers): softmax router,
top-k, renormalised when norm_topk_prob; experts stored one per expert (mlp.experts.{j}.*_proj)."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer
from ..blocks.moe import SOFTMAX_TOPK, MoeConfig, moe_layer_pattern, per_expert_gated_mlp, router_weights
from ..config import FULL, SLIDING, ConfigReader, common_fields
from ..registry import Architecture, register
from ..weights import attention_weights, causal_lm_weights, gated_mlp_weights, norms

NAME = "Qwen3MoeForCausalLM"


def read_config(reader: ConfigReader) -> MoeConfig:
    layers = reader.require("num_hidden_layers")
    # the window (opt-in) applies to every layer
    window = reader.get("sliding_window", None) if reader.get("use_sliding_window", False, bool) else None
    # transformers 5 writes num_local_experts; the published checkpoints' configs say num_experts
    field = "num_local_experts" if reader.has("num_local_experts") else "num_experts"
    experts = reader.get(field, 0, positive=False)
    step = reader.get("decoder_sparse_step", 1)
    dense = reader.data.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
        raise reader.error("mlp_only_layers", f"must be a list of layer indices, got {dense!r}")
    return MoeConfig(**common_fields(reader, NAME, sliding_window=window,
                                     layer_types=((SLIDING if window else FULL),) * layers),
                     num_experts=max(experts, 1), experts_per_token=reader.require("num_experts_per_tok"),
                     moe_intermediate_size=reader.require("moe_intermediate_size"),
                     moe_layers=moe_layer_pattern(layers,
                                                  lambda i: i not in dense and experts > 0 and (i + 1) % step == 0),
                     router=SOFTMAX_TOPK, norm_topk_prob=reader.get("norm_topk_prob", False, bool))


def weights(cfg: MoeConfig):
    def layer(i: int) -> dict:
        prefix = f"model.layers.{i}."
        if cfg.is_moe(i):
            mlp = {**router_weights(cfg, prefix + "mlp.gate.weight"), **per_expert_gated_mlp(cfg, prefix + "mlp.experts.")}
        else:
            mlp = gated_mlp_weights(cfg, prefix + "mlp.")
        return {**norms(cfg, prefix, ("input_layernorm", "post_attention_layernorm")),
                **attention_weights(cfg, prefix + "self_attn.", qk_norm="head"), **mlp}

    return causal_lm_weights(cfg, layer)


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="qwen3_moe_layer"),
                      notes="Qwen3 attention + MoE (softmax top-k, optional renorm), decoder_sparse_step"))
