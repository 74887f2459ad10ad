"""Pass time against graph size (docs/architecture.md, "Passes": cost must stay linear in graph size).

Traces the plain-numpy Llama-style decoder of examples/numpy_decoder.py with 1, 8, 32 and 128 layers
(no @qtrace.function, so the graph really grows), runs the default pass pipeline and prints, per
size: nodes before and after, the time of the trace and of each pass, and microseconds per node.
The last lines compare the time per node at 128 layers with 8 layers; the check fails (exit status
1) when it grows by more than 1.5x.

    python benchmarks/bench_passes.py [--layers 1 8 32 128] [--repeat 3]

Each figure is the best of --repeat runs (a fresh trace each time), so a busy machine inflates it
less. As with `timeit`, the garbage collector is paused while a run is timed (its full collections
scan every live object and make large graphs look slower than the algorithms are); `--gc` keeps it on.
"""

from __future__ import annotations

import argparse
import collections
import gc
import sys
import time

import qtrace
from qtrace.examples import numpy_decoder
from qtrace.passes import DEFAULT_PIPELINE, run_pipeline

FUSED_OPS = ("rms_norm", "softmax", "silu", "ctx_scatter", "ctx_gather")
MAX_GROWTH = 1.5


def measure(layers: int, repeat: int, keep_gc: bool) -> dict:
    cfg = numpy_decoder.DecoderConfig(num_layers=layers)
    fn, args = numpy_decoder.decoder_signature(cfg, numpy_decoder.init_params(cfg))
    best: dict = {}
    for _ in range(repeat):
        gc.collect()
        if not keep_gc:
            gc.disable()
        try:
            start = time.perf_counter()
            graph = qtrace.trace(fn, args)
            trace_seconds = time.perf_counter() - start
            nodes_before = len(graph.nodes)
            report = run_pipeline(graph)
        finally:
            gc.enable()
        seconds = {"trace": trace_seconds}
        for i, record in enumerate(report.records):
            seconds[f"{i + 1:02d} {record.name}"] = record.seconds
        if not best:
            best = {"nodes_before": nodes_before, "nodes_after": len(graph.nodes), "seconds": seconds,
                    "ops": collections.Counter(node.op for node in graph.nodes)}
        else:
            best["seconds"] = {k: min(v, seconds[k]) for k, v in best["seconds"].items()}
    best["passes"] = sum(v for k, v in best["seconds"].items() if k != "trace")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gc", action="store_true", help="keep the garbage collector on while timing")
    args = parser.parse_args(argv)

    print(f"pipeline: {', '.join(DEFAULT_PIPELINE)}; best of {args.repeat}, garbage collector "
          f"{'on' if args.gc else 'paused'}")
    print(f"{'layers':>6} {'nodes':>7} {'-> after':>8}  {'trace ms':>9} {'us/node':>8}  {'passes ms':>9} {'us/node':>8}"
          f"  after passes: {', '.join(FUSED_OPS)}")
    results = {}
    for layers in args.layers:
        r = results[layers] = measure(layers, args.repeat, args.gc)
        n, s = r["nodes_before"], r["seconds"]
        fused = " ".join(str(r["ops"][op]) for op in FUSED_OPS)
        print(f"{layers:>6} {n:>7} {r['nodes_after']:>8}  {s['trace'] * 1e3:>9.1f} {s['trace'] / n * 1e6:>8.1f}"
              f"  {r['passes'] * 1e3:>9.1f} {r['passes'] / n * 1e6:>8.1f}  {fused}")

    print("\nper pass, us/node:")
    names = list(next(iter(results.values()))["seconds"])
    print(f"{'pass':<16}" + "".join(f"{f'{layers} layers':>12}" for layers in results))
    for name in names:
        print(f"{name:<16}" + "".join(f"{r['seconds'][name] / r['nodes_before'] * 1e6:>12.1f}"
                                       for r in results.values()))

    if 8 not in results or 128 not in results:
        return 0
    small, large = results[8], results[128]
    ok = True
    print("\ngrowth of time per node, 128 layers vs 8:")
    for label, key in (("passes", None), ("trace", "trace")):
        per_node = [(r["passes"] if key is None else r["seconds"][key]) / r["nodes_before"] for r in (small, large)]
        ratio = per_node[1] / per_node[0]
        if key is None:  # the limit is on the passes; the trace is shown for comparison
            ok = ratio <= MAX_GROWTH
            verdict = "ok" if ok else f"FAIL (limit {MAX_GROWTH}x)"
        else:
            verdict = ""
        print(f"  {label:<8} {per_node[0] * 1e6:8.1f} -> {per_node[1] * 1e6:8.1f} us/node  = {ratio:.2f}x  {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
