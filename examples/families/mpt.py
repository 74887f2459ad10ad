"""MptForCausalLM: pre-LayerNorm layers without biases anywhere; ALiBi instead of position embeddings
(MPT's slopes for alibi_bias_max 8, added to the scores from the cache slots' positions); a fused Wqkv
(q | k | v), optionally clipped to ±clip_qkv; softmax_scale; a gelu MLP (up, down); a tied head.

transformers' MptForCausalLM ignores some config fields (it always runs ALiBi with alibi_bias_max 8,
without biases, ...); a checkpoint setting one otherwise computes something else in MosaicML's own
code, so qtrace refuses it rather than guess which of the two models is wanted."""

from __future__ import annotations

import qtrace

from ..blocks.alibi import alibi_slopes
from ..blocks.gpt_decoder import final_layer_norm, gpt_layer, gpt_weights
from ..config import ConfigReader, DecoderConfig
from ..registry import Architecture, register

NAME = "MptForCausalLM"
MODULES = {"input_layernorm": "norm_1", "qkv_proj": "attn.Wqkv", "o_proj": "attn.out_proj",
           "post_attention_layernorm": "norm_2", "up_proj": "ffn.up_proj", "down_proj": "ffn.down_proj"}
# Fields transformers ignores: field -> the value it computes as if the config had.
IGNORED = {"no_bias": True, "logit_scale": None, "expansion_ratio": 4}
IGNORED_IN_ATTN_CONFIG = {"alibi": True, "alibi_bias_max": 8, "qk_ln": False, "prefix_lm": False,
                          "attn_uses_sequence_id": False, "attn_type": "multihead_attention"}


def read_config(reader: ConfigReader) -> DecoderConfig:
    attn = ConfigReader(reader.data.get("attn_config") or {}, f"{reader.source} attn_config")
    for source, fields in ((reader, IGNORED), (attn, IGNORED_IN_ATTN_CONFIG)):
        for field, assumed in fields.items():
            if source.data.get(field, assumed) != assumed:
                raise source.error(field, f"is {source.data[field]!r}; transformers' MptForCausalLM ignores it and "
                                          f"computes as if it were {assumed!r}")
    hidden, heads = reader.require("d_model"), reader.require("n_heads")
    if hidden % heads:
        raise reader.error("d_model", f"= {hidden} is not a multiple of n_heads = {heads}")
    return DecoderConfig(
        architecture=NAME, vocab_size=reader.require("vocab_size"), hidden_size=hidden,
        intermediate_size=4 * hidden, num_hidden_layers=reader.require("n_layers"),
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads, rope=None,
        norm_eps=reader.get("layer_norm_epsilon", 1e-5, float), max_position_embeddings=reader.get("max_seq_len", 2048),
        tie_word_embeddings=reader.get("tie_word_embeddings", True, bool), hidden_act="gelu",
        attention_scale=attn.get("softmax_scale", None, float), clip_qkv=attn.get("clip_qkv", None, float),
        alibi_slopes=alibi_slopes(heads, IGNORED_IN_ATTN_CONFIG["alibi_bias_max"]))


def weights(cfg: DecoderConfig):
    return gpt_weights(cfg, "transformer.blocks.{i}.", MODULES, biased=(), norm_bias=False, embed="transformer.wte",
                       final_norm="transformer.norm_f")


register(Architecture(NAME, read_config, weights, qtrace.function(gpt_layer, name="mpt_layer"),
                      final_norm=final_layer_norm,
                      notes="ALiBi from alibi_bias_max, fused Wqkv with clip_qkv, LayerNorm without bias, tied head"))
