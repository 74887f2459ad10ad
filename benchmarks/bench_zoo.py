"""Export cost and graph size of every zoo family at 32 layers (tiny dims), each in a fresh process.

For each registered architecture, the config of its parity fixture (tests/fixtures/*) with
num_hidden_layers = 32 and random weights is exported (ctx_len 128, prefill 32) in a new Python
process. Printed per family: the export time (trace + passes + lowering + save, measured inside the
child), the child's whole wall time (imports included), and node counts of the model: the main graph,
the graph with its layer functions inlined (custom ops kept whole, as the compiler sees them), and
fully inlined (custom-op bodies too).

    python benchmarks/bench_zoo.py [--layers 32] [--families Llama Gemma2 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "tests", "fixtures")


def fixture_configs() -> dict[str, dict]:
    """One fixture config per architecture (the first fixture directory naming it)."""
    configs: dict[str, dict] = {}
    for name in sorted(os.listdir(FIXTURES)):
        path = os.path.join(FIXTURES, name, "config.json")
        if os.path.isfile(path):
            with open(path) as f:
                config = json.load(f)
            configs.setdefault(config["architectures"][0], config)
    return configs


def node_counts(model) -> tuple[int, int, int]:
    """(main graph, layer functions inlined, everything inlined) node counts."""
    functions = {(f.domain, f.name): f for f in model.functions}

    def expanded(nodes, custom_whole: bool) -> int:
        total = 0
        for node in nodes:
            body = functions.get((node.domain, node.op_type))
            if body is None or (custom_whole and node.domain != "qtrace.local"):
                total += 1
            else:
                total += expanded(body.node, custom_whole)
        return total

    return len(model.graph.node), expanded(model.graph.node, True), expanded(model.graph.node, False)


def child(config_json: str, layers: int) -> None:
    start = time.perf_counter()
    import onnx

    from qtrace.examples.checkpoint import export_model, random_model

    config = {**json.loads(config_json), "num_hidden_layers": layers}
    for alias in ("n_layer", "n_layers", "num_layers"):  # the GPT-2 lineage's own names for it
        if alias in config:
            config[alias] = layers
    for per_layer in ("layer_types", "no_rope_layers", "moe_layers"):
        config.pop(per_layer, None)  # re-derived for the new layer count where the family has a default
    if config["architectures"][0] == "Gemma3ForCausalLM":
        config["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    model = random_model(config)
    imported = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        export_model(model, out, ctx_len=128, prefill_seq_len=32)
        exported = time.perf_counter()
        counts = node_counts(onnx.load(os.path.join(out, "model.onnx"), load_external_data=False))
    print(json.dumps({"export": exported - imported, "setup": imported - start, "nodes": counts}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--families", nargs="*", help="architecture names or prefixes (default: all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.layers)
        return
    configs = fixture_configs()
    if args.families:
        configs = {k: v for k, v in configs.items() if any(k.startswith(f) for f in args.families)}
    print(f"{args.layers} layers, tiny dims, ctx_len 128; each family in a fresh process")
    print(f"{'architecture':<26} {'export s':>9} {'process s':>10} {'main':>6} {'layers inlined':>15} "
          f"{'fully inlined':>14}")
    worst = 0.0
    for name, config in configs.items():
        start = time.perf_counter()
        result = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--child", json.dumps(config)],
                                capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        row = json.loads(result.stdout.strip().splitlines()[-1])
        main_nodes, layers_inlined, fully = row["nodes"]
        worst = max(worst, row["export"])
        print(f"{name:<26} {row['export']:9.2f} {wall:10.2f} {main_nodes:6d} {layers_inlined:15d} {fully:14d}")
    print(f"slowest export: {worst:.2f} s (budget 2 s)")


if __name__ == "__main__":
    main()
