"""GptOssForCausalLM: a MoE feed-forward in every layer (router with a bias; top-k of the logits, then
softmax over those k; experts stored as stacked kernels [E, H, 2I] with gate and up in the even and
odd columns, biases on both projections, and the clamped SwiGLU (up + 1) * g * sigmoid(1.702 g) with
g = min(gate, 7), up clipped to +-7), attention sinks (a learned logit per head in every softmax
denominator), q/k/v/o biases, sliding and full layers as `layer_types` lists them, YaRN RoPE."""

from __future__ import annotations

import qtrace

from ..blocks.decoder import pre_norm_layer
from ..blocks.moe import CLAMPED_SWIGLU, IN_OUT, INTERLEAVED, TOPK_SOFTMAX, MoeConfig, router_weights, stacked
from ..config import FULL, SLIDING, ConfigReader, common_fields
from ..registry import Architecture, register
from ..weights import BIAS, Weight, attention_weights, causal_lm_weights, norms

NAME = "GptOssForCausalLM"


def read_config(reader: ConfigReader) -> MoeConfig:
    layers = reader.require("num_hidden_layers")
    alternating = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(layers))
    types = reader.layer_types(layers) if reader.has("layer_types") else alternating
    return MoeConfig(**common_fields(reader, NAME, attention_bias=reader.get("attention_bias", True, bool),
                                     sliding_window=reader.get("sliding_window", None), layer_types=types),
                     num_experts=reader.require("num_local_experts"),
                     experts_per_token=reader.require("num_experts_per_tok"),
                     moe_intermediate_size=reader.require("intermediate_size"), moe_layers=(True,) * layers,
                     router=TOPK_SOFTMAX, expert_layout=IN_OUT, gate_up=INTERLEAVED, expert_act=CLAMPED_SWIGLU,
                     swiglu_alpha=reader.get("swiglu_alpha", 1.702, float),
                     swiglu_limit=reader.get("swiglu_limit", 7.0, float))


def weights(cfg: MoeConfig):
    d, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts

    def layer(n: int) -> dict:
        prefix = f"model.layers.{n}."
        mlp = prefix + "mlp."
        return {**norms(cfg, prefix, ("input_layernorm", "post_attention_layernorm")),
                **attention_weights(cfg, prefix + "self_attn.", o_bias=cfg.attention_bias),
                "sinks": Weight(prefix + "self_attn.sinks", (cfg.num_attention_heads,), BIAS),
                **router_weights(cfg, mlp + "router.weight", bias=mlp + "router.bias"),
                "experts_gate_up": stacked(mlp + "experts.gate_up_proj", (e, d, 2 * i), IN_OUT),
                "experts_gate_up_bias": Weight(mlp + "experts.gate_up_proj_bias", (e, 2 * i), BIAS),
                "experts_down": stacked(mlp + "experts.down_proj", (e, i, d), IN_OUT),
                "experts_down_bias": Weight(mlp + "experts.down_proj_bias", (e, d), BIAS)}

    return causal_lm_weights(cfg, layer)


register(Architecture(NAME, read_config, weights, qtrace.function(pre_norm_layer, name="gpt_oss_layer"),
                      notes="MoE (router bias, top-k then softmax, clamped SwiGLU, expert biases), attention "
                            "sinks, sliding/full layers, YaRN"))
