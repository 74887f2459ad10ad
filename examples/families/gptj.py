"""GPTJForCausalLM: attention and MLP in parallel off one LayerNorm (out = x + attn(ln(x)) + mlp(ln(x)));
RoPE on the first rotary_dim dims of each head, rotated in interleaved pairs (rotate_every_two);
separate q/k/v/out projections without bias; gelu_new MLP with biases; an lm_head with bias."""

from __future__ import annotations

import qtrace

from ..blocks.gpt_decoder import final_layer_norm, gpt_layer, gpt_weights
from ..config import ConfigReader, DecoderConfig, gpt2_style_fields
from ..registry import Architecture, register

NAME = "GPTJForCausalLM"
MLP = {"up_proj": "mlp.fc_in", "down_proj": "mlp.fc_out"}
MODULES = {"input_layernorm": "ln_1", "q_proj": "attn.q_proj", "k_proj": "attn.k_proj", "v_proj": "attn.v_proj",
           "o_proj": "attn.out_proj", **MLP}


def read_config(reader: ConfigReader) -> DecoderConfig:
    return DecoderConfig(**gpt2_style_fields(reader, NAME, rotary=True,
                                             tie_word_embeddings=reader.get("tie_word_embeddings", False, bool)))


def weights_of(modules: dict[str, str]):
    """The weight map of GPT-J's layout with these layer modules (CodeGen differs in its qkv_proj)."""
    def weights(cfg: DecoderConfig):
        return gpt_weights(cfg, "transformer.h.{i}.", modules, biased=MLP, embed="transformer.wte",
                           final_norm="transformer.ln_f", head_bias=True)

    return weights


register(Architecture(NAME, read_config, weights_of(MODULES), qtrace.function(gpt_layer, name="gptj_layer"),
                      final_norm=final_layer_norm,
                      notes="parallel attention + MLP, interleaved partial rotary, lm_head bias"))
