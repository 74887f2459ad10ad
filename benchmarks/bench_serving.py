"""Serving modes on onnxruntime, each against the plain export of the same random Llama in the same run.

Model: hidden 512, intermediate 1376, 4 layers, 8 heads / 2 KV heads, head_dim 64, vocab 8192,
ctx_len 4096, prefill chunks of 128 (random float32 weights; onnxruntime on CPU, 1 thread). Timings
are medians over rounds that run every variant once, so drift on a shared machine hits all alike.

- compute-context length: one decode step at position 500 with each comp_ctx_lengths bucket, as a
  ratio to the plain export's step (which reads all 4096 slots);
- speculative decoding: greedy tokens per second with a target export (K = 3) and the target itself
  as draft (every proposal accepted: the ceiling), and with prompt lookup on a repetitive prompt,
  against plain decoding;
- on-device sampling: a decode step with the sampler (512 candidates) against the plain step;
- export time of each mode against the plain export.

    python benchmarks/bench_serving.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, vocab_size=8192)
CTX_LEN, PREFILL = 4096, 128


def interleaved_medians(variants: dict, repeats: int) -> dict:
    """Median seconds of each callable, timed in rounds that run every variant once."""
    for fn in variants.values():
        fn()
    times: dict = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from qtrace.examples.checkpoint import export_model, random_model
    from qtrace.examples.families.llama import tiny_config
    from qtrace.examples.generation import Decoder, Executable, SamplingParams
    from qtrace.examples.serving import ServingOptions

    model = random_model(tiny_config(**SHAPE, max_position_embeddings=CTX_LEN), seed=0)
    modes = {"plain": ServingOptions(),
             "ccl": ServingOptions(comp_ctx_lengths_prefill=(1024, 2048), comp_ctx_lengths_decode=(512, 1024, 2048)),
             "target": ServingOptions(num_speculative_tokens=(0, 3)),
             "sampling": ServingOptions(sampling=True)}
    root = tempfile.mkdtemp(prefix="bench-serving-")
    dirs, export_seconds = {}, {}
    export_model(model, os.path.join(root, "warm-up"), ctx_len=CTX_LEN, prefill_seq_len=PREFILL)  # custom-op cache
    for mode, serving in modes.items():
        dirs[mode] = os.path.join(root, mode)
        start = time.perf_counter()
        export_model(model, dirs[mode], ctx_len=CTX_LEN, prefill_seq_len=PREFILL, serving=serving)
        export_seconds[mode] = time.perf_counter() - start
    print(f"model: {SHAPE}, ctx_len {CTX_LEN}, prefill {PREFILL}; onnxruntime CPU, 1 thread")
    print("export seconds: " + ", ".join(f"{m} {s:.2f} ({s / export_seconds['plain']:.2f}x)"
                                         for m, s in export_seconds.items()))

    rng = np.random.default_rng(0)
    load = {mode: (lambda d=d: Executable.load(d, threads=1)) for mode, d in dirs.items()}
    prompt = rng.integers(0, SHAPE["vocab_size"], 500).tolist()
    plain, ccl, sampler = load["plain"](), load["ccl"](), load["sampling"]()
    _, state = Decoder(plain).prefill([prompt], plain.new_state(1))
    step = {"input_ids": np.array([[7]]), "position_ids": np.array([[len(prompt)]]), **state}
    variants = {"plain": lambda: plain.run(step)}
    for bucket in (512, 1024, 2048, 4096):
        feeds = {**step, "comp_ctx_lengths": np.zeros(bucket, np.int64)}
        variants[f"CCL bucket {bucket}"] = lambda feeds=feeds: ccl.run(feeds)
    sampling_feeds = {**step, "last_accepted_output_tokens": step["input_ids"],
                      "past_repetition_penalty_buffer": np.zeros((1, SHAPE["vocab_size"]), bool),
                      "past_presence_penalty_buffer": np.zeros((1, SHAPE["vocab_size"]), bool),
                      **SamplingParams(temperature=0.8, top_k=40, top_p=0.9).feeds(1, 512, rng)}
    variants["with the on-device sampler (512 candidates)"] = lambda: sampler.run(sampling_feeds)
    medians = interleaved_medians(variants, args.repeats)
    print(f"decode step at position {len(prompt)} (plain reads all {CTX_LEN} slots):")
    for name, seconds in medians.items():
        print(f"  {name:45s} {seconds * 1e3:7.2f} ms = {seconds / medians['plain']:.2f}x plain")

    new = 48
    short = rng.integers(0, SHAPE["vocab_size"], 40).tolist()
    repetitive = (short[:20] * 3)[:60]
    expected = {tuple(p): Decoder(load["plain"]()).generate([p], new) for p in (short, repetitive)}
    outcome: dict = {}

    def run(name, prompt, **proposer):
        def go():
            decoder = Decoder(load["plain" if not proposer else "target"]())
            if proposer:
                tokens, outcome[name] = decoder.speculate([prompt], new, **proposer)
            else:
                tokens = decoder.generate([prompt], new)
            assert tokens == expected[tuple(prompt)]
        return go

    generations = {"plain": run("plain", short),
                   "draft": run("draft", short, draft=Decoder(load["target"]())),
                   "plain (repeated prompt)": run("plain", repetitive),
                   "lookup": run("lookup", repetitive, prompt_lookup=3)}
    seconds = interleaved_medians(generations, max(3, args.repeats // 10))
    rate = {name: new / s for name, s in seconds.items()}
    draft, lookup = outcome["draft"], outcome["lookup"]
    print(f"greedy tokens/s ({new} new, prefill included): plain {rate['plain']:.1f}")
    print(f"  target + itself as draft: {rate['draft']:.1f} ({rate['draft'] / rate['plain']:.2f}x; acceptance "
          f"{draft.acceptance_rate:.2f}, {draft.tokens / draft.target_calls:.2f} tokens per target call)")
    print(f"  prompt lookup, repeated prompt: {rate['lookup']:.1f} ({rate['lookup'] / rate['plain (repeated prompt)']:.2f}x"
          f" plain on it; acceptance {lookup.acceptance_rate:.2f} of {lookup.proposed} proposed, "
          f"{lookup.tokens / lookup.target_calls:.2f} tokens per target call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
