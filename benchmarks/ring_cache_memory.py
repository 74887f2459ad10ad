"""KV-cache bytes of full caches against per-layer ring caches (`qtrace export --sliding-cache ring`).

    python benchmarks/ring_cache_memory.py [--ctx-len 8192] [--prefill-seq-len 32 128]

For published configs' shapes (no weights needed: the sizes come from Model.cache_shape, as the
export declares them), prints per batch row in float16 (the custom_io.yaml precision): the full
caches' bytes, the ring caches' bytes, the bytes saved and the ratio. A ring holds window (or chunk)
+ prefill_seq_len - 1 slots, so the saving shrinks slightly as the prefill length grows.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from qtrace.examples.blocks.causal_lm import Model
from qtrace.examples.registry import read_config

SHAPES: dict[str, dict[str, Any]] = {
    "Gemma-2-9B": dict(architectures=["Gemma2ForCausalLM"], vocab_size=256000, hidden_size=3584,
                       intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                       final_logit_softcapping=30.0),
    "Mistral-7B-v0.1": dict(architectures=["MistralForCausalLM"], vocab_size=32000, hidden_size=4096,
                            intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, sliding_window=4096),
    "gpt-oss-20b": dict(architectures=["GptOssForCausalLM"], vocab_size=201088, hidden_size=2880,
                        intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
                        head_dim=64, sliding_window=128, num_local_experts=32, num_experts_per_tok=4,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                         "original_max_position_embeddings": 4096}),
    "Llama-4-Scout (text)": dict(architectures=["Llama4ForCausalLM"], vocab_size=202048, hidden_size=5120,
                                 intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48,
                                 num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                                 attention_chunk_size=8192, num_local_experts=16, num_experts_per_tok=1,
                                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                                                  "original_max_position_embeddings": 8192}),
}


def kv_bytes(model: Model, ctx_len: int, prefill_seq_len: int, itemsize: int = 2) -> int:
    return sum(2 * int(np.prod(model.cache_shape(i, 1, ctx_len, prefill_seq_len))) * itemsize
               for i in range(model.cfg.num_hidden_layers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx-len", type=int, default=8192)
    parser.add_argument("--prefill-seq-len", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args(argv)
    print(f"KV cache per batch row, float16, ctx_len {args.ctx_len}")
    print(f"{'config':<22}{'prefill':>8}{'full':>12}{'ring':>12}{'saved':>12}{'saved bytes':>16}{'ring/full':>11}"
          "  ring lengths")
    for name, config in SHAPES.items():
        arch, cfg = read_config({"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, **config}, name)
        full, ring = Model(arch, cfg, {}), Model(arch, cfg, {}, sliding_cache="ring")
        for prefill in args.prefill_seq_len:
            a, b = kv_bytes(full, args.ctx_len, prefill), kv_bytes(ring, args.ctx_len, prefill)
            print(f"{name:<22}{prefill:>8}{a / 2**20:>9.0f} MiB{b / 2**20:>9.0f} MiB{(a - b) / 2**20:>9.0f} MiB"
                  f"{a - b:>16,}{b / a:>11.3f}  {ring.cache_sizes(args.ctx_len, prefill)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
