"""Shared blocks of the model zoo: the KV cache (`cache`), step masks (`masks`), RoPE (`rope`),
cached attention (`attention`), linear layers, norms and MLPs (`layers`) and the causal-LM driver
(`causal_lm`) with its serving options and the on-device sampler (`sampler`). Family files compose these; cache and mask logic live here only."""

from .attention import AttentionInputs, cached_attention, project_qkv, self_attention, split_heads
from .cache import read_cache, write_cache
from .causal_lm import Model, StepOptions, causal_lm_step, final_rms_norm, kept_positions, lm_head, token_embedding
from .layers import activation, gated_mlp, linear, norm
from .masks import cache_indices, hidden_slots, score_bias
from .rope import RopeTables, apply_rope, rope_at, rope_tables
from .sampler import SamplerOptions, sample

__all__ = ["AttentionInputs", "Model", "RopeTables", "SamplerOptions", "StepOptions", "activation", "apply_rope", "cache_indices", "cached_attention",
           "causal_lm_step", "final_rms_norm", "gated_mlp", "hidden_slots", "kept_positions", "linear", "lm_head", "norm",
           "project_qkv", "read_cache", "rope_at", "rope_tables", "sample", "score_bias", "self_attention", "split_heads",
           "token_embedding", "write_cache"]
