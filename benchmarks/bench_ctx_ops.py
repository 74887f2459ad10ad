"""onnxruntime latency and node counts of the KV-cache custom-op bodies: the current ones against a
baseline revision's (by default the session start, whose bodies concatenate a scratch slot, scatter
and slice it off, and whose CB ops gather whole cache rows first).

    python benchmarks/bench_ctx_ops.py [--baseline REV] [--rounds 15]

Each body runs alone in a one-node model whose inputs have symbolic dims (as in an exported model,
so onnxruntime cannot fold the body's shape arithmetic), on one thread, on a Llama-1B-shaped cache
[1, 8, 1024, 64] (decode: 1 new row, prefill: 32) and on a tiny one [1, 2, 16, 8]. The two bodies of
a case run alternately, round after round, and the median round is reported, so a busy machine
slows both alike. Prints per case: baseline and current microseconds per call and the ratio
baseline / current (> 1: current is faster); then the node count of every body. Asserts only that
both bodies agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
from onnx import helper

from baseline import SESSION_START
from qtrace.lowering import custom_ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {"1B": (1, 8, 1024, 64), "tiny": (1, 2, 16, 8)}


def baseline_library(revision: str):
    """custom_ops.py as it was at `revision`, imported as a standalone module (the bodies alone: lighter
    than baseline.baseline_tree's whole exporter in a child process)."""
    source = subprocess.run(["git", "-C", REPO, "show", f"{revision}:lowering/custom_ops.py"], check=True,
                            capture_output=True, text=True).stdout
    if "custom_op_bodies" in source:
        sys.exit(f"{revision} keeps its bodies in custom_op_bodies.py; pick a revision before 84df51b")
    path = os.path.join(tempfile.mkdtemp(), "baseline_custom_ops.py")
    with open(path, "w") as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location("baseline_custom_ops", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # onnxscript resolves the bodies' globals through sys.modules
    spec.loader.exec_module(module)
    return module


def session(function, feeds: dict[str, np.ndarray]) -> ort.InferenceSession:
    """A one-node model calling `function` on graph inputs with symbolic dims."""
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                            [f"{name}_{axis}" for axis in range(array.ndim)])
              for name, array in feeds.items()]
    first = next(iter(feeds.values()))
    output = helper.make_tensor_value_info("out", helper.np_dtype_to_tensor_dtype(first.dtype), [None] * first.ndim)
    node = helper.make_node(function.name, list(feeds), ["out"], domain=function.domain)
    graph = helper.make_graph([node], function.name, inputs, [output])
    model = helper.make_model(graph, functions=[function], opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid(function.domain, 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def cases(rng: np.random.Generator):
    """(label, op_type, feeds): decode and prefill writes, whole-cache reads, at both shapes."""
    for shape_name, (batch, heads, ctx_len, head_dim) in SHAPES.items():
        cache = rng.standard_normal((batch, heads, ctx_len, head_dim)).astype(np.float32)
        cache_3d = cache[:, 0]
        batch_index = np.arange(batch, dtype=np.int64).reshape(batch, 1)
        for phase, seq in (("decode", 1), ("prefill", min(32, ctx_len // 2))):
            positions = np.arange(seq, dtype=np.int64)[None].repeat(batch, 0)
            updates = rng.standard_normal((batch, heads, seq, head_dim)).astype(np.float32)
            label = f"{shape_name} {phase}"
            yield label, "CtxScatter", {"data": cache, "position_ids": positions, "updates": updates}
            yield label, "CtxScatterCB", {"data": cache, "batch_index": batch_index, "position_ids": positions,
                                          "updates": updates}
            yield label, "CtxScatter3D", {"data": cache_3d, "position_ids": positions, "updates": updates[:, 0]}
        live = np.arange(ctx_len)
        indices = np.where(live > ctx_len // 2, custom_ops.INT32_MAX, live)[None, None].repeat(batch, 0)
        read_len = np.array(ctx_len, dtype=np.int64)
        label = f"{shape_name} read"
        yield label, "CtxGather", {"data": cache, "ctx_indices": indices, "comp_ctx_len": read_len}
        yield label, "CtxGatherCB", {"data": cache, "batch_index": batch_index, "ctx_indices": indices,
                                     "comp_ctx_len": read_len}
        yield label, "CtxGather3D", {"data": cache_3d, "ctx_indices": indices[:, 0]}


def median_seconds(sessions: list[ort.InferenceSession], feeds: dict[str, np.ndarray], rounds: int) -> list[float]:
    """Per session, the median over `rounds` of the mean time of a batch of runs; sessions alternate."""
    for s in sessions:
        s.run(None, feeds)
    start = time.perf_counter()
    sessions[0].run(None, feeds)
    calls = max(3, int(0.02 / max(time.perf_counter() - start, 1e-6)))  # ~20 ms per batch
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for s, record in zip(sessions, times):
            start = time.perf_counter()
            for _ in range(calls):
                s.run(None, feeds)
            record.append((time.perf_counter() - start) / calls)
    return [sorted(record)[len(record) // 2] for record in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=SESSION_START, help="git revision with the baseline bodies")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    baseline = baseline_library(args.baseline)
    print(f"onnxruntime {ort.__version__}, 1 thread; baseline = bodies at {args.baseline}")
    print(f"{'case':14} {'op':13} {'baseline us':>12} {'current us':>11} {'baseline/current':>17}")
    for label, op_type, feeds in cases(np.random.default_rng(0)):
        old = session(baseline.custom_op_function(op_type), feeds)
        new = session(custom_ops.custom_op_function(op_type), feeds)
        np.testing.assert_array_equal(new.run(None, feeds)[0], old.run(None, feeds)[0])
        old_s, new_s = median_seconds([old, new], feeds, args.rounds)
        print(f"{label:14} {op_type:13} {old_s * 1e6:12.1f} {new_s * 1e6:11.1f} {old_s / new_s:16.2f}x", flush=True)
    print("\nnodes per body (Constant nodes included)")
    print(f"{'op':21} {'baseline':>8} {'current':>8}")
    for op_type in custom_ops.CUSTOM_OP_DOMAINS:
        old_count = (len(baseline.custom_op_function(op_type).node)
                     if op_type in baseline.CUSTOM_OP_DOMAINS else "-")
        print(f"{op_type:21} {old_count:>8} {len(custom_ops.custom_op_function(op_type).node):>8}")


if __name__ == "__main__":
    main()
