"""The decoder layer of the GPT-2 lineage and its weight map: LayerNorms with (or without) bias, a
non-gated MLP, projections with biases, fused or separate q/k/v, and one of two residual structures,
chosen by the layer's params:

    sequential (GPT-2, GPTBigCode, StarCoder2, MPT; Falcon without parallel_attn), when the layer
    has a post_attention_layernorm:
        h   = x + attention(ln(x))
        out = h + mlp(post_attention_layernorm(h))
    parallel (GPT-J, CodeGen, Phi, Falcon) otherwise, off one LayerNorm or two (Falcon's new decoder
    architecture has an mlp_layernorm):
        out = x + attention(ln(x)) + mlp(mlp_layernorm(x) or ln(x))

Also the model-level hooks these families share: token plus learned absolute position embeddings
(GPT-2, GPTBigCode) and a final LayerNorm.
"""

from __future__ import annotations

from typing import Any, Collection

from qtrace.primitives import layer_norm, maximum, take

from ..config import DecoderConfig
from ..weights import BIAS, EMBEDDING, LINEAR, NORM, Weight, WeightMap, causal_lm_weights
from .attention import AttentionInputs, self_attention
from .layers import mlp


def _norm(x: Any, p: dict[str, Any], key: str, cfg: DecoderConfig) -> Any:
    return layer_norm(x, p[key], p.get(f"{key}_bias"), cfg.norm_eps)


def gpt_layer(x: Any, p: dict[str, Any], inputs: AttentionInputs, past_key: Any, past_value: Any,
              cfg: DecoderConfig) -> tuple[Any, Any, Any]:
    """One layer, sequential or parallel as its params say (see the module docstring)."""
    normed = _norm(x, p, "input_layernorm", cfg)
    attn, key_cache, value_cache = self_attention(normed, p, inputs, past_key, past_value, cfg)
    if "post_attention_layernorm" in p:
        h = x + attn
        return h + mlp(_norm(h, p, "post_attention_layernorm", cfg), p, cfg.hidden_act), key_cache, value_cache
    mlp_in = _norm(x, p, "mlp_layernorm", cfg) if "mlp_layernorm" in p else normed
    return x + attn + mlp(mlp_in, p, cfg.hidden_act), key_cache, value_cache


def token_and_position_embedding(params: dict[str, Any], input_ids: Any, position_ids: Any, cfg: DecoderConfig) -> Any:
    """wte[input_ids] + wpe[position_ids]; padding (position -1) reads position 0."""
    tokens = take(params["embed_tokens"], input_ids, axis=0)
    return tokens + take(params["embed_positions"], maximum(position_ids, 0), axis=0)


def final_layer_norm(h: Any, params: dict[str, Any], cfg: DecoderConfig) -> Any:
    return _norm(h, params, "norm", cfg)


# -- weight maps ------------------------------------------------------------------------------------------

ALL = frozenset({"qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"})
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "mlp_layernorm")
HEAD_NORMS = ("q_layernorm", "k_layernorm")


def _projection_shape(key: str, cfg: DecoderConfig) -> tuple[int, int]:
    """(in_features, out_features) of a layer's projection."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    d, i = cfg.hidden_size, cfg.intermediate_size
    return {"qkv_proj": (d, q + 2 * kv), "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "up_proj": (d, i), "down_proj": (i, d)}[key]


def gpt_layer_weights(cfg: DecoderConfig, prefix: str, modules: dict[str, str], *, biased: Collection[str] = ALL,
                      norm_bias: bool = True, kind: str = LINEAR) -> dict[str, Weight]:
    """One layer's weights: `modules` maps each param key (input_layernorm, post_attention_layernorm,
    mlp_layernorm, q_layernorm, k_layernorm, qkv_proj or q/k/v_proj, o_proj, up_proj, down_proj) to the
    checkpoint's module name under `prefix`. Projections listed in `biased` have a bias; LayerNorms
    have one when `norm_bias`; `kind` is LINEAR ([out, in]) or CONV1D ([in, out])."""
    weights: dict[str, Weight] = {}
    for key, module in modules.items():
        name = prefix + module
        if key in LAYER_NORMS or key in HEAD_NORMS:
            size = cfg.head_dim if key in HEAD_NORMS else cfg.hidden_size
            weights[key] = Weight(f"{name}.weight", (size,), NORM)
            if norm_bias:
                weights[f"{key}_bias"] = Weight(f"{name}.bias", (size,), BIAS)
            continue
        in_features, out_features = _projection_shape(key, cfg)
        shape = (out_features, in_features) if kind == LINEAR else (in_features, out_features)
        weights[key] = Weight(f"{name}.weight", shape, kind)
        if key in biased:
            weights[f"{key.removesuffix('_proj')}_bias"] = Weight(f"{name}.bias", (out_features,), BIAS)
    return weights


def gpt_weights(cfg: DecoderConfig, layer_prefix: str, modules: dict[str, str], *, biased: Collection[str] = ALL,
                norm_bias: bool = True, kind: str = LINEAR, embed: str, final_norm: str, positions: str | None = None,
                head: str = "lm_head", head_bias: bool = False) -> WeightMap:
    """The whole map (see causal_lm_weights): every layer's weights from `modules` under
    `layer_prefix` (with "{i}" for the layer index; see gpt_layer_weights), the final LayerNorm and its
    bias, learned position embeddings and an lm_head bias where the family has them (module names,
    without ".weight")."""
    weights = causal_lm_weights(cfg, lambda i: gpt_layer_weights(cfg, layer_prefix.format(i=i), modules, biased=biased,
                                                                  norm_bias=norm_bias, kind=kind),
                                embed=f"{embed}.weight", final_norm=f"{final_norm}.weight", head=f"{head}.weight")
    if norm_bias:
        weights["norm_bias"] = Weight(f"{final_norm}.bias", (cfg.hidden_size,), BIAS)
    if positions is not None:
        weights["embed_positions"] = Weight(f"{positions}.weight", (cfg.max_position_embeddings, cfg.hidden_size),
                                            EMBEDDING)
    if head_bias:
        weights["lm_head_bias"] = Weight(f"{head}.bias", (cfg.vocab_size,), BIAS)
    return weights
