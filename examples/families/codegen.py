"""CodeGenForCausalLM: GPT-J's layer with a fused qkv_proj in mp_num = 4 model-parallel shards, each
holding its heads' q, v, k in that order (split in the graph, one MatMul); an lm_head with bias."""

from __future__ import annotations

import qtrace

from ..blocks.gpt_decoder import final_layer_norm, gpt_layer
from ..config import ConfigReader, DecoderConfig, gpt2_style_fields
from ..registry import Architecture, register
from .gptj import MLP, weights_of

NAME = "CodeGenForCausalLM"
MP_NUM = 4  # transformers hard-codes the shard count of CodeGen's checkpoints
MODULES = {"input_layernorm": "ln_1", "qkv_proj": "attn.qkv_proj", "o_proj": "attn.out_proj", **MLP}


def read_config(reader: ConfigReader) -> DecoderConfig:
    fields = gpt2_style_fields(reader, NAME, rotary=True, qkv_shards=MP_NUM, qkv_order="qvk",
                               tie_word_embeddings=reader.get("tie_word_embeddings", False, bool))
    if fields["num_attention_heads"] % MP_NUM:
        raise reader.error("n_head", f"= {fields['num_attention_heads']} is not a multiple of CodeGen's {MP_NUM} "
                                     "qkv_proj shards")
    return DecoderConfig(**fields)


register(Architecture(NAME, read_config, weights_of(MODULES), qtrace.function(gpt_layer, name="codegen_layer"),
                      final_norm=final_layer_norm,
                      notes="GPT-J's layer, qkv_proj in 4 (q, v, k) shards, lm_head bias"))
