"""The pre-norm decoder layer most Llama-shaped families share, and its weight map.

    h   = x + m * attention(norm(x))
    out = h + m * mlp(norm(h))

with m = residual_multiplier (Granite; 1 elsewhere) and mlp the MoE block on a layer that has a
router (blocks/moe.py), the gated MLP otherwise. Families with another ordering (post-norms, four
norms, parallel blocks) write their own layer from the same blocks.
"""

from __future__ import annotations

from typing import Any

from ..config import DecoderConfig
from ..weights import BIAS, Weight, attention_weights, gated_mlp_weights, norms
from .attention import AttentionInputs, self_attention
from .layers import gated_mlp, norm, scaled
from .moe import feed_forward


def pre_norm_layer(x: Any, p: dict[str, Any], inputs: AttentionInputs, past_key: Any, past_value: Any,
                   cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    attn, key_cache, value_cache = self_attention(norm(x, p["input_layernorm"], cfg.norm_eps), p, inputs,
                                                  past_key, past_value, cfg)
    h = x + scaled(attn, cfg.residual_multiplier)
    mlp = feed_forward(norm(h, p["post_attention_layernorm"], cfg.norm_eps), p, cfg)
    return h + scaled(mlp, cfg.residual_multiplier), key_cache, value_cache


def pre_norm_layer_weights(cfg: DecoderConfig, index: int, *, o_bias: bool = False, mlp_bias: bool = False,
                           qk_norm: str | None = None, fused_qkv: str | None = None,
                           fused_gate_up: str | None = None, prefix: str = "model.layers.{i}.",
                           norm_offset: float = 0.0) -> dict[str, Weight]:
    """Hugging Face's names for one pre-norm layer: input_layernorm, self_attn.{q,k,v,o}_proj,
    post_attention_layernorm, mlp.{gate,up,down}_proj (fused variants as named)."""
    prefix = prefix.format(i=index)
    weights = norms(cfg, prefix, ("input_layernorm", "post_attention_layernorm"), norm_offset)
    weights.update(attention_weights(cfg, prefix + "self_attn.", o_bias=o_bias, qk_norm=qk_norm, fused_qkv=fused_qkv,
                                     norm_offset=norm_offset))
    weights.update(gated_mlp_weights(cfg, prefix + "mlp.", fused_gate_up=fused_gate_up))
    if mlp_bias:
        for name, size in (("gate", cfg.intermediate_size), ("up", cfg.intermediate_size), ("down", cfg.hidden_size)):
            weights[f"{name}_bias"] = Weight(f"{prefix}mlp.{name}_proj.bias", (size,), BIAS)
    return weights


def sandwich_norm_layer(x: Any, p: dict[str, Any], inputs: AttentionInputs, past_key: Any, past_value: Any,
                        cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    """Four norms a layer (Gemma 2 and 3): each sublayer normed before and after.

        h   = x + post_attention_norm(attention(input_norm(x)))
        out = h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))
    """
    attn, key_cache, value_cache = self_attention(norm(x, p["input_layernorm"], cfg.norm_eps), p, inputs,
                                                  past_key, past_value, cfg)
    h = x + norm(attn, p["post_attention_layernorm"], cfg.norm_eps)
    mlp = gated_mlp(norm(h, p["pre_feedforward_layernorm"], cfg.norm_eps), p, cfg.hidden_act)
    return h + norm(mlp, p["post_feedforward_layernorm"], cfg.norm_eps), key_cache, value_cache


SANDWICH_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm")
