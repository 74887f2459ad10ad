"""The two ways to run mixture-of-experts layers, measured; and the memory of exporting Mixtral-8x7B.

    python benchmarks/bench_moe.py [--sections strategies sparse] [--workdir DIR] [--repeats 10]

strategies: for a Mixtral-shaped config (hidden 256, 8 experts, top-2, expert width 896, 4 layers)
and a Qwen3-MoE-shaped one (hidden 256, 128 experts, top-8, expert width 96, 4 layers), random float32
weights, each exported with --moe-strategy gather and dense (ctx_len 128, prefill 32): export time
(the second export of each, after a warm-up one),
ONNX nodes (main graph; one MoE layer function; all, with every function call expanded), the bytes
of expert weights each token touches in prefill (32 tokens a step) and decode (1 token a step)
counted from the shapes (gather: k experts per token, each gathered into its own copy; dense: all E
experts once per step, shared by the step's tokens), and onnxruntime's median prefill and decode
latency (CPU, this machine's threads). The dense/gather ratio is the baseline measured in the same
run; both forms must give the same logits (checked, printed).

sparse: a Mixtral-8x7B-shaped checkpoint (32 layers, hidden 4096, 8 experts of width 14336, float16:
93 GB) written as a sparse file, the safetensors header followed by a data region that is only a
truncate() (no disk used, reads give zeros), exported in a fresh process with --dtype float16
--weights reference: the export references the checkpoint's bytes and never reads them. Prints the
peak anonymous memory (sampled RssAnon: heap, not the file pages a read would map) of the whole
process and its growth over the imports, the export time and the size of what was written.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

CTX_LEN, PREFILL_LEN = 128, 32
COMMON = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              head_dim=32, max_position_embeddings=512, rms_norm_eps=1e-5)
CONFIGS: dict[str, dict[str, Any]] = {
    "Mixtral-shaped": dict(COMMON, architectures=["MixtralForCausalLM"], intermediate_size=896, num_local_experts=8,
                           num_experts_per_tok=2),
    "Qwen3-MoE-shaped": dict(COMMON, architectures=["Qwen3MoeForCausalLM"], intermediate_size=768,
                             moe_intermediate_size=96, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True),
}
MIXTRAL_8X7B = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
                    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
                    rope_theta=1e6, sliding_window=None, torch_dtype="float16")
GIB = 1 << 30


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


# -- strategies -------------------------------------------------------------------------------------------


def node_counts(proto: Any) -> tuple[int, int, int]:
    """(main graph nodes, nodes of the largest layer function, nodes with every call expanded)."""
    functions = {f.name: f for f in proto.functions}

    def expanded(nodes: Any) -> int:
        return sum(expanded(functions[n.op_type].node) if n.op_type in functions and n.domain != "" and
                   not n.domain.startswith("com.") else 1 for n in nodes)

    layer_sizes = [len(f.node) for f in proto.functions if "layer" in f.name]
    return len(proto.graph.node), max(layer_sizes, default=0), expanded(proto.graph.node)


def expert_bytes_per_token(cfg: Any, strategy: str, tokens: int) -> int:
    """Bytes of expert matrices read per token by a step of `tokens` tokens (all MoE layers)."""
    one_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
    layers = sum(cfg.moe_layers)
    if strategy == "gather":
        return layers * cfg.experts_per_token * one_expert
    return layers * cfg.num_experts * one_expert // tokens


def median_seconds(run: Any, repeats: int) -> float:
    run()
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def strategies(workdir: str, repeats: int) -> None:
    import onnx

    from qtrace.examples.blocks.moe import with_moe_strategy
    from qtrace.examples.checkpoint import export_model, random_model
    from qtrace.examples.generation import onnx_session
    from qtrace.lowering.custom_ops import custom_op_function

    custom_op_function("CtxScatter")  # compile the custom-op bodies once, outside the timings
    print(f"== expert strategies: ctx_len {CTX_LEN}, prefill {PREFILL_LEN} tokens, batch 1, float32, "
          f"onnxruntime CPU ({os.cpu_count()} CPUs), median of {repeats}")
    header = (f"   {'strategy':<9}{'export':>8}{'main':>7}{'layer fn':>9}{'expanded':>9}"
              f"{'expert bytes/token':>21}{'':>12}{'prefill':>10}{'decode':>10}")
    for name, config in CONFIGS.items():
        base = random_model(config, seed=0)
        cfg = base.cfg
        print(f"\n{name}: {cfg.num_experts} experts, top-{cfg.experts_per_token}, expert width "
              f"{cfg.moe_intermediate_size}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers")
        print(header)
        print(f"   {'':<9}{'':>8}{'nodes':>7}{'nodes':>9}{'nodes':>9}{'prefill':>21}{'decode':>12}"
              f"{'ms':>10}{'ms':>10}")
        ids = (np.arange(PREFILL_LEN, dtype=np.int64)[None] * 37 + 5) % cfg.vocab_size
        positions = np.arange(PREFILL_LEN, dtype=np.int64)[None]
        results = {}
        for strategy in ("gather", "dense"):
            model = with_moe_strategy(base, strategy)
            out = os.path.join(workdir, f"{name}-{strategy}")
            export_model(model, out, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN)  # warm-up: one-time costs
            start = time.perf_counter()
            export_model(model, out, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN)
            export_seconds = time.perf_counter() - start
            main, layer, expanded = node_counts(onnx.load(os.path.join(out, "model.onnx"), load_external_data=False))
            session = onnx_session(out)
            cache = model.empty_cache(1, CTX_LEN)
            prefill_feeds = {"input_ids": ids, "position_ids": positions, **cache}
            outputs = session.run(None, prefill_feeds)
            names = [o.name for o in session.get_outputs()]
            filled = {n[:-len("_RetainedState")]: v for n, v in zip(names, outputs) if n.endswith("_RetainedState")}
            decode_feeds = {"input_ids": np.array([[11]], np.int64),
                            "position_ids": np.array([[PREFILL_LEN]], np.int64), **filled}
            prefill_ms = 1e3 * median_seconds(lambda: session.run(None, prefill_feeds), repeats)
            decode_ms = 1e3 * median_seconds(lambda: session.run(None, decode_feeds), 2 * repeats)
            results[strategy] = dict(logits=outputs[0], prefill=prefill_ms, decode=decode_ms, export=export_seconds)
            print(f"   {strategy:<9}{export_seconds:>7.2f}s{main:>7}{layer:>9}{expanded:>9}"
                  f"{fmt_bytes(expert_bytes_per_token(cfg, strategy, PREFILL_LEN)):>21}"
                  f"{fmt_bytes(expert_bytes_per_token(cfg, strategy, 1)):>12}{prefill_ms:>10.2f}{decode_ms:>10.2f}")
        gather, dense = results["gather"], results["dense"]
        difference = float(np.abs(gather["logits"] - dense["logits"]).max())
        print(f"   dense / gather: prefill {dense['prefill'] / gather['prefill']:.2f}x, decode "
              f"{dense['decode'] / gather['decode']:.2f}x, export {dense['export'] / gather['export']:.2f}x; "
              f"max |logit difference| {difference:.1e}")


# -- the sparse Mixtral-8x7B ------------------------------------------------------------------------------


def write_sparse_checkpoint(directory: str, config: dict[str, Any]) -> int:
    """config.json and a model.safetensors whose data region is a hole: the header names every tensor
    of the family's weight map (float16), then the file is extended to its full size with truncate()."""
    from qtrace.examples.registry import read_config
    from qtrace.examples.weights import checkpoint_shapes

    arch, cfg = read_config(config)
    header: dict[str, Any] = {}
    offset = 0
    for name, weight in sorted(checkpoint_shapes(arch.weights(cfg)).items()):
        nbytes = int(np.prod(weight.shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(weight.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return offset


def child_sparse_export(checkpoint: str, out: str) -> dict[str, Any]:
    from bench_export import AnonymousPeak  # this directory is on sys.path when a script here runs

    from qtrace.examples.checkpoint import export_model, load_checkpoint
    from qtrace.lowering.custom_ops import custom_op_function

    custom_op_function("CtxScatter")
    baseline = AnonymousPeak()._sample()
    with AnonymousPeak() as anonymous:
        start = time.perf_counter()
        model = load_checkpoint(checkpoint, dtype=np.float16)
        report = export_model(model, out, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN, dtype="float16",
                              weights="reference")
        seconds = time.perf_counter() - start
    checkpoint_file = os.path.join(checkpoint, "model.safetensors")  # hard-linked beside model.onnx, not copied
    written = sum(os.path.getsize(f) for f in report.files if not os.path.samefile(f, checkpoint_file))
    return {"peak_anon": anonymous.peak, "growth": anonymous.peak - baseline, "seconds": seconds, "written": written,
            "stages": report.stage_seconds}


def sparse(workdir: str) -> None:
    checkpoint = os.path.join(workdir, "mixtral-8x7b-sparse")
    data = write_sparse_checkpoint(checkpoint, MIXTRAL_8X7B)
    disk = os.stat(os.path.join(checkpoint, "model.safetensors")).st_blocks * 512
    print(f"\n== Mixtral-8x7B-shaped checkpoint, float16, {data / 1e9:.1f} GB of weights in a sparse file "
          f"({fmt_bytes(disk)} on disk); export --dtype float16 --weights reference in a fresh process")
    out = os.path.join(workdir, "mixtral-8x7b-export")
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", checkpoint, out],
                            capture_output=True, text=True)
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        print(f"   FAILED: {lines[-1] if lines else result.returncode}")
        return
    r = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"   peak anonymous memory {fmt_bytes(r['peak_anon'])} (the whole process; "
          f"{fmt_bytes(r['growth'])} over its state after imports), budget 1 GiB: "
          f"{'within' if r['peak_anon'] < GIB else 'OVER'}; peak / weights = {r['peak_anon'] / data:.4f}")
    print(f"   export {r['seconds']:.1f}s (" + ", ".join(f"{k} {v:.1f}s" for k, v in r["stages"].items()) +
          f"), written {fmt_bytes(r['written'])} (model.onnx, model.onnx.data, side files; the weights are a hard "
          "link to the checkpoint)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["strategies", "sparse"], choices=["strategies", "sparse"])
    parser.add_argument("--workdir", help="where the temporary exports go (default: $TMPDIR)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_sparse_export(*args.child)))
        return 0
    with tempfile.TemporaryDirectory(prefix="qtrace-bench-moe-", dir=args.workdir) as workdir:
        if "strategies" in args.sections:
            strategies(workdir, args.repeats)
        if "sparse" in args.sections:
            sparse(workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
