"""FalconForCausalLM: one fused query_key_value and RoPE, in three layouts: Falcon-7B's multi-query
(q heads | k | v), the new decoder architecture's (Falcon-40B) [G q heads, k, v] per KV head, or
multi-head [q, k, v] per head. Attention and a gelu MLP run in parallel off one LayerNorm (7B) or two
(ln_attn and ln_mlp, the new decoder architecture); without parallel_attn, one after the other.
Biases when the config has bias; a tied head. ALiBi (alibi: true) is refused: transformers' Falcon
computes it in bfloat16 and adds it twice, which qtrace does not reproduce."""

from __future__ import annotations

from dataclasses import dataclass

import qtrace

from ..blocks.gpt_decoder import ALL, final_layer_norm, gpt_layer, gpt_weights
from ..config import ConfigReader, DecoderConfig
from ..registry import Architecture, register

NAME = "FalconForCausalLM"
ATTENTION_AND_MLP = {"qkv_proj": "self_attention.query_key_value", "o_proj": "self_attention.dense",
                     "up_proj": "mlp.dense_h_to_4h", "down_proj": "mlp.dense_4h_to_h"}


@dataclass(frozen=True)
class FalconConfig(DecoderConfig):
    layer_norms: tuple[tuple[str, str], ...] = ()  # (param key, module) of each layer's LayerNorms


def _layout(reader: ConfigReader, heads: int) -> tuple[int, int, tuple[tuple[str, str], ...]]:
    """(KV heads, qkv shards, LayerNorms) of the three layouts."""
    parallel = reader.get("parallel_attn", True, bool)
    if reader.get("new_decoder_architecture", False, bool):
        kv_heads = reader.get("num_kv_heads", heads)
        if reader.get("num_ln_in_parallel_attn", 2) == 2:
            return kv_heads, kv_heads, (("input_layernorm", "ln_attn"), ("mlp_layernorm", "ln_mlp"))
        if not parallel:
            raise reader.error("parallel_attn", "is false with one LayerNorm in the new decoder architecture, "
                                                "which transformers does not run")
        return kv_heads, kv_heads, (("input_layernorm", "input_layernorm"),)
    kv_heads = 1 if reader.get("multi_query", True, bool) else heads
    norms = (("input_layernorm", "input_layernorm"),)
    if not parallel:
        norms += (("post_attention_layernorm", "post_attention_layernorm"),)
    return kv_heads, 1 if kv_heads == 1 else heads, norms


def read_config(reader: ConfigReader) -> DecoderConfig:
    if reader.get("alibi", False, bool):
        raise reader.error("alibi", "is true; qtrace supports Falcon with RoPE (alibi: false)")
    heads, hidden = reader.require("num_attention_heads"), reader.require("hidden_size")
    kv_heads, shards, norms = _layout(reader, heads)
    if hidden % heads or heads % kv_heads:
        raise reader.error("num_kv_heads", f"= {kv_heads} must divide num_attention_heads = {heads}, which must "
                                           f"divide hidden_size = {hidden}")
    return FalconConfig(
        architecture=NAME, vocab_size=reader.require("vocab_size"), hidden_size=hidden,
        intermediate_size=reader.get("ffn_hidden_size", 4 * hidden),
        num_hidden_layers=reader.require("num_hidden_layers"),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads, qkv_shards=shards,
        norm_eps=reader.get("layer_norm_epsilon", 1e-5, float), rope=reader.check_rope(reader.rope(), hidden // heads),
        max_position_embeddings=reader.get("max_position_embeddings", 2048),
        tie_word_embeddings=reader.get("tie_word_embeddings", True, bool),
        attention_bias=reader.get("bias", False, bool),
        hidden_act=reader.choice("activation", "gelu", ("gelu", "gelu_new", "gelu_pytorch_tanh")), layer_norms=norms)


def weights(cfg: FalconConfig):
    return gpt_weights(cfg, "transformer.h.{i}.", {**dict(cfg.layer_norms), **ATTENTION_AND_MLP},
                       biased=ALL if cfg.attention_bias else (), embed="transformer.word_embeddings",
                       final_norm="transformer.ln_f")


register(Architecture(NAME, read_config, weights, qtrace.function(gpt_layer, name="falcon_layer"),
                      final_norm=final_layer_norm,
                      notes="fused multi-query/grouped QKV, parallel attention + MLP off one or two LayerNorms"))
