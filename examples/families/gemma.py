"""GemmaForCausalLM, Gemma2ForCausalLM and Gemma3ForCausalLM (text).

All three: RMSNorm computing x * (1 + w) (1 is added to w at load, so each norm stays one
CustomRMSNorm), embeddings x sqrt(hidden_size), a gelu-tanh gated MLP, an explicit head_dim and a
tied head. Gemma 2 adds four norms a layer, the query_pre_attn_scalar^-1/2 attention scale,
attention-logit and final-logit softcaps and sliding/global layers; Gemma 3 drops the softcaps
(unless the config sets them) and adds per-head q/k norms and a RoPE of its own for sliding layers.
"""

from __future__ import annotations

import math
from typing import Any

import qtrace

from ..blocks.decoder import SANDWICH_NORMS, pre_norm_layer, pre_norm_layer_weights, sandwich_norm_layer
from ..config import FULL, SLIDING, ConfigReader, DecoderConfig, common_fields
from ..registry import Architecture, register
from ..weights import attention_weights, causal_lm_weights, gated_mlp_weights, norms

GEMMA_NORM = 1.0  # Gemma's RMSNorm weight offset: x * (1 + w)


def _gemma_fields(reader: ConfigReader, name: str, **overrides: Any) -> dict[str, Any]:
    hidden = reader.require("hidden_size")
    act = reader.choice("hidden_activation", reader.data.get("hidden_act") or "gelu_pytorch_tanh",
                        ("gelu_pytorch_tanh", "gelu"))
    fields = common_fields(reader, name, hidden_act=act, embedding_multiplier=math.sqrt(hidden),
                           tie_word_embeddings=reader.get("tie_word_embeddings", True, bool))
    fields.update(overrides)
    return fields


def _softcaps_and_window(reader: ConfigReader, default_types: tuple[str, ...]) -> dict[str, Any]:
    layers = reader.require("num_hidden_layers")
    types = reader.layer_types(layers) if reader.has("layer_types") else default_types
    return dict(attention_scale=reader.require("query_pre_attn_scalar", float) ** -0.5,
                attn_logit_softcap=reader.get("attn_logit_softcapping", None, float),
                final_logit_softcap=reader.get("final_logit_softcapping", None, float),
                sliding_window=reader.get("sliding_window", None), layer_types=types)


def read_gemma(reader: ConfigReader) -> DecoderConfig:
    return DecoderConfig(**_gemma_fields(reader, "GemmaForCausalLM"))


def read_gemma2(reader: ConfigReader) -> DecoderConfig:
    layers = reader.require("num_hidden_layers")
    alternating = tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers))
    return DecoderConfig(**_gemma_fields(reader, "Gemma2ForCausalLM", **_softcaps_and_window(reader, alternating)))


def read_gemma3(reader: ConfigReader) -> DecoderConfig:
    layers = reader.require("num_hidden_layers")
    pattern = reader.get("sliding_window_pattern", 6)
    default = tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers))
    # transformers >= 5: rope_parameters per layer type; older: rope_theta (global), rope_local_base_freq
    # (sliding) and rope_scaling (global only).
    parameters = reader.data.get("rope_parameters") or {}
    if FULL in parameters:
        rope = reader.rope(parameters=parameters[FULL], field=f"rope_parameters.{FULL}")
        local_rope = reader.rope(parameters=parameters.get(SLIDING, {}), field=f"rope_parameters.{SLIDING}")
    else:
        rope = reader.rope()
        local_rope = reader.rope(parameters={"rope_theta": reader.get("rope_local_base_freq", 10000.0, float)})
    return DecoderConfig(**_gemma_fields(reader, "Gemma3ForCausalLM", rope=rope, local_rope=local_rope,
                                         **_softcaps_and_window(reader, default)))


def gemma_weights(cfg: DecoderConfig):
    return causal_lm_weights(cfg, lambda i: pre_norm_layer_weights(cfg, i, norm_offset=GEMMA_NORM),
                             norm_offset=GEMMA_NORM)


def sandwich_weights(qk_norm: str | None):
    def weights(cfg: DecoderConfig):
        def layer(i: int) -> dict:
            prefix = f"model.layers.{i}."
            return {**norms(cfg, prefix, SANDWICH_NORMS, GEMMA_NORM),
                    **attention_weights(cfg, prefix + "self_attn.", qk_norm=qk_norm, norm_offset=GEMMA_NORM),
                    **gated_mlp_weights(cfg, prefix + "mlp.")}

        return causal_lm_weights(cfg, layer, norm_offset=GEMMA_NORM)

    return weights


register(
    Architecture("GemmaForCausalLM", read_gemma, gemma_weights, qtrace.function(pre_norm_layer, name="gemma_layer"),
                 notes="(1+w) RMSNorm, scaled embeddings, GeGLU, tied head"),
    Architecture("Gemma2ForCausalLM", read_gemma2, sandwich_weights(None),
                 qtrace.function(sandwich_norm_layer, name="gemma2_layer"),
                 notes="four norms, attention and final softcaps, alternating sliding layers"),
    Architecture("Gemma3ForCausalLM", read_gemma3, sandwich_weights("head"),
                 qtrace.function(sandwich_norm_layer, name="gemma3_layer"),
                 notes="per-head q/k norms, sliding:global pattern, local and global RoPE"),
)
