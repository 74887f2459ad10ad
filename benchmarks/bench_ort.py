"""onnxruntime step latency of qtrace's Llama export against the exporter at session start (same run),
with the memory-bandwidth floor for a decode step, and node counts of every zoo family.

Models (random float32 weights, written once as a safetensors checkpoint and exported by both
exporters in `--weights reference` mode, so both read the same bytes):
- tiny: hidden 256, intermediate 688, 2 layers, 8 heads / 4 KV heads, vocab 512, ctx_len 128;
- 1B-shaped: hidden 2048, intermediate 8192, 16 layers, 32 heads / 8 KV heads, head_dim 64,
  vocab 32000, ctx_len 1024 (4.9 GB of weights: about 10 GB of disk while it runs).

For each: prefill of 32 tokens and one decode step after it, at 1 and 2 onnxruntime threads, median of
repeated runs, the two exports and the essential-work bound timed in turns of 10 runs so drift hits
them alike. Two lower bounds, measured in the same run:
- essential work (`essential_work`): one small graph of the arithmetic any export of this interface
  must do in the step (projections, norms, MLP, residuals, attention over all ctx_len slots), without
  RoPE, the cache write and read, or the mask construction: up to run-to-run noise, no export can
  run the step faster;
- the decode memory floor: (bytes of weights a step reads + bytes of cache it reads) / the copy
  bandwidth one numpy thread measures on this machine. A copy reads and writes each byte, so reading
  a step's bytes (with two threads especially) can beat this floor: it is generous to the exporter,
  and below 1x when the weights fit in the CPU caches (the tiny model).

    python benchmarks/bench_ort.py [--models tiny 1B] [--repeats 20] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baseline import SESSION_START, baseline_tree, run_export  # noqa: E402
from bench_zoo import fixture_configs, node_counts  # noqa: E402

MODELS = {
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32, vocab_size=512, ctx_len=128),
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=32000, ctx_len=1024),
}
PREFILL = 32


def write_checkpoint(directory: str, shape: dict) -> tuple[dict, int]:
    """A random Llama checkpoint streamed to disk tensor by tensor; returns its config and weight bytes."""
    from qtrace.examples.checkpoint import random_model, write_safetensors  # noqa: F401  (layout check)
    from qtrace.examples.families.llama import tiny_config
    from qtrace.examples.registry import read_config
    from qtrace.examples.weights import checkpoint_shapes

    config = tiny_config(**{k: v for k, v in shape.items() if k != "ctx_len"}, max_position_embeddings=shape["ctx_len"])
    arch, cfg = read_config(config)
    shapes = checkpoint_shapes(arch.weights(cfg))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    header, offset = {}, 0
    for name, weight in shapes.items():
        nbytes = int(np.prod(weight.shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(weight.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, weight in shapes.items():
            fan_in = weight.shape[-1]
            scale = 0.1 if weight.kind == "norm" else (0.5 if weight.kind == "embedding" else fan_in ** -0.5)
            base = 1.0 if weight.kind == "norm" else 0.0
            rows = max(1, (1 << 24) // (4 * fan_in))  # ~16 MiB at a time
            for start in range(0, weight.shape[0], rows):
                block = (weight.shape[0] if len(weight.shape) == 1 else min(rows, weight.shape[0] - start),)
                block += weight.shape[1:]
                if len(weight.shape) == 1:
                    f.write((base + scale * rng.standard_normal(block)).astype(np.float32).tobytes())
                    break
                f.write((base + scale * rng.standard_normal(block)).astype(np.float32).tobytes())
    return config, offset


def session(model_dir: str, threads: int):
    """Stock onnxruntime on `model_dir`/model.onnx: every graph optimizer on (qtrace's own sessions,
    `qtrace.lowering.session`, turn one off), as a user of either export would run it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # idle threads must not spin: the sessions are timed in turns, and a spinning pool steals the cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(os.path.join(model_dir, "model.onnx"), options, providers=["CPUExecutionProvider"])


def cache_feeds(sess, ctx_len: int) -> dict[str, np.ndarray]:
    feeds = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_"):
            shape = [1 if d == "batch_size" else ctx_len if d == "ctx_len" else d for d in i.shape]
            feeds[i.name] = np.zeros(shape, np.float32)
    return feeds


def step_feeds(sess, vocab: int, ctx_len: int) -> tuple[dict, dict]:
    """Feeds of a 32-token prefill on an empty cache and of the decode step after it."""
    outputs = [o.name for o in sess.get_outputs()]
    ids = (np.arange(PREFILL, dtype=np.int64)[None] * 7) % vocab
    prefill_feeds = {"input_ids": ids, "position_ids": np.arange(PREFILL, dtype=np.int64)[None],
                     **cache_feeds(sess, ctx_len)}
    result = sess.run(None, prefill_feeds)
    state = {name[:-len("_RetainedState")]: value for name, value in zip(outputs, result)
             if name.endswith("_RetainedState")}
    decode_feeds = {"input_ids": np.array([[3]], np.int64), "position_ids": np.array([[PREFILL]], np.int64), **state}
    return prefill_feeds, decode_feeds


def interleaved_medians(runs: dict[str, tuple], repeats: int, chunk: int = 10) -> dict[str, float]:
    """Median seconds of sess.run(feeds) for each (sess, feeds) in `runs`, taken in turns of `chunk`
    runs each (after one untimed run), so drift in the machine's speed hits every entry alike while
    each turn still runs with warm caches, as a served model does."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(max(1, repeats // chunk)):
        for label, (sess, feeds) in runs.items():
            sess.run(None, feeds)
            for _ in range(chunk):
                start = time.perf_counter()
                sess.run(None, feeds)
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def essential_work(config: dict, threads: int, directory: str, ctx_len: int) -> tuple:
    """(session, prefill feeds, decode feeds) of the least arithmetic any export of the QEfficient
    interface must do in a step, on onnxruntime: a lower bound on a step's latency (same shapes, same
    run, same kernels for the same math).

    The graph holds the q, k, v, o, gate, up and down MatMuls of every layer and the head on the
    last row; both RMS norms of every layer (the chain onnxruntime fuses into one kernel) and the
    final one; the SiLU-gated MLP and both residual adds; and the attention of the grouped query
    heads over all ctx_len cache slots: the cache is a [1, kv_heads, ctx_len, head_dim] input and a
    static-shape graph cannot know which slots are live, so scores, additive mask, softmax, weighted
    sum and the head transposes cover them all. It leaves out RoPE, the cache write and read, the
    embedding and building the mask, so it is optimistic: up to run-to-run noise (a few percent on a
    shared machine), no export made of standard ONNX ops can run the step faster. The
    sequence length is symbolic, so one session times both steps. The random weights of the model's
    shapes stream to an external-data file in `directory` (a 1B model's would not fit in memory three
    times over next to the two exports' sessions)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    group, q, kv = heads // kv_heads, heads * head_dim, kv_heads * head_dim
    rng = np.random.default_rng(0)
    nodes, initializers, outputs = [], [], []
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq_len", hidden]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, "group_rows", ctx_len])]
    os.makedirs(directory, exist_ok=True)
    data = open(os.path.join(directory, "weights.bin"), "wb")

    def const(name: str, value) -> None:
        initializers.append(numpy_helper.from_array(np.asarray(value), name))

    def node(op: str, sources: list, out: str, **attributes) -> str:
        nodes.append(helper.make_node(op, sources, [out], **attributes))
        return out

    def matmul(source: str, rows: int, cols: int, tag: str) -> str:
        array = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(rows ** -0.5)
        tensor = TensorProto(name=f"w_{tag}", data_type=TensorProto.FLOAT, dims=[rows, cols],
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "weights.bin"), ("offset", str(data.tell())), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        data.write(array.tobytes())
        initializers.append(tensor)
        return node("MatMul", [source, f"w_{tag}"], f"y_{tag}")

    def rms_norm(source: str, tag: str) -> str:
        mean = node("ReduceMean", [node("Pow", [source, "two"], f"{tag}_power")], f"{tag}_mean", axes=[-1])
        root = node("Sqrt", [node("Add", [mean, "epsilon"], f"{tag}_eps")], f"{tag}_root")
        return node("Mul", [node("Div", [source, root], f"{tag}_div"), "norm_weight"], f"{tag}_out")

    def attention(queries: str, layer: int) -> str:
        """Query heads grouped per KV head, [1, kv_heads, group * seq_len, head_dim], against every slot."""
        grouped = node("Transpose", [node("Reshape", [queries, "q_split"], f"qs_{layer}")], f"qt_{layer}",
                       perm=[0, 2, 3, 1, 4])
        grouped = node("Reshape", [grouped, "q_grouped"], f"qg_{layer}")
        keys = node("Transpose", [f"cache_k{layer}"], f"kt_{layer}", perm=[0, 1, 3, 2])
        scores = node("Add", [node("MatMul", [grouped, keys], f"s_{layer}"), "mask"], f"sm_{layer}")
        mixed = node("MatMul", [node("Softmax", [scores], f"p_{layer}", axis=-1), f"cache_v{layer}"], f"pv_{layer}")
        mixed = node("Transpose", [node("Reshape", [mixed, "o_split"], f"os_{layer}")], f"ot_{layer}",
                     perm=[0, 3, 1, 2, 4])
        return node("Reshape", [mixed, "o_rows"], f"or_{layer}")

    const("two", np.float32(2))
    const("epsilon", np.float32(1e-5))
    const("norm_weight", np.ones(hidden, np.float32))
    for name, value in (("q_split", [0, 0, kv_heads, group, head_dim]), ("q_grouped", [0, 0, -1, head_dim]),
                        ("o_split", [0, 0, group, -1, head_dim]), ("o_rows", [0, 0, -1]),
                        ("last", [-1]), ("end", [2**62]), ("seq_axis", [1])):
        const(name, np.array(value, np.int64))
    x = "x"
    with data:
        for layer in range(config["num_hidden_layers"]):
            h = rms_norm(x, f"n1_{layer}")
            queries, *new_rows = [matmul(h, hidden, width, f"{layer}_{name}") for name, width in
                                  (("q", q), ("k", kv), ("v", kv))]
            outputs += new_rows  # the new K and V rows: what a cache write would store
            for name in ("k", "v"):
                inputs.append(helper.make_tensor_value_info(f"cache_{name}{layer}", TensorProto.FLOAT,
                                                            [1, kv_heads, ctx_len, head_dim]))
            x = node("Add", [x, matmul(attention(queries, layer), q, hidden, f"{layer}_o")], f"r1_{layer}")
            h = rms_norm(x, f"n2_{layer}")
            gate, up = matmul(h, hidden, inter, f"{layer}_gate"), matmul(h, hidden, inter, f"{layer}_up")
            gate = node("Mul", [gate, node("Sigmoid", [gate], f"sigmoid_{layer}")], f"silu_{layer}")
            x = node("Add", [x, matmul(node("Mul", [gate, up], f"act_{layer}"), inter, hidden, f"{layer}_down")],
                     f"r2_{layer}")
        last = node("Slice", [rms_norm(x, "final"), "last", "end", "seq_axis"], "last_row")
        outputs.insert(0, matmul(last, hidden, config["vocab_size"], "head"))
    graph = helper.make_graph(nodes, "essential", inputs, [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                                                           for name in outputs], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              os.path.join(directory, "model.onnx"))
    sess = session(directory, threads)  # the options the exports are timed with
    caches = {f"cache_{name}{layer}": rng.standard_normal((1, kv_heads, ctx_len, head_dim), dtype=np.float32)
              for layer in range(config["num_hidden_layers"]) for name in ("k", "v")}

    def feeds(seq_len: int, first_position: int) -> dict:
        # causal over the slots: query row i of each group sees slots 0 .. first_position + i
        seen = np.arange(ctx_len)[None, :] <= first_position + np.arange(seq_len)[:, None]
        mask = np.where(seen, np.float32(0), np.float32(-np.inf))
        return {"x": rng.standard_normal((1, seq_len, hidden), dtype=np.float32),
                "mask": np.tile(mask, (group, 1))[None, None], **caches}

    return sess, feeds(PREFILL, 0), feeds(1, PREFILL)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes per second numpy copies one large array to another (best of 5)."""
    source, target = np.ones(nbytes // 8), np.empty(nbytes // 8)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - start)
    return nbytes / best


def decode_bytes(config: dict, weight_bytes: int, ctx_len: int) -> int:
    """Bytes a decode step must read: every weight but the embedding rows it skips, and the live cache."""
    embedding = config["vocab_size"] * config["hidden_size"] * 4
    cache = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * ctx_len * config["head_dim"] * 4
    return weight_bytes - embedding + config["hidden_size"] * 4 + cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-ort-", dir=args.workdir)
    try:
        tree = baseline_tree(SESSION_START, workdir)
        bandwidth = copy_bandwidth()
        print(f"baseline: qtrace at {SESSION_START} (session start); copy bandwidth {bandwidth / 1e9:.1f} GB/s")
        for name in args.models:
            shape = MODELS[name]
            ctx_len = shape["ctx_len"]
            checkpoint = os.path.join(workdir, f"{name}-checkpoint")
            config, weight_bytes = write_checkpoint(checkpoint, shape)
            exports = {}
            for label, source in (("baseline", tree), ("qtrace", None)):
                out = os.path.join(workdir, f"{name}-{label}")
                seconds = run_export(source, checkpoint, out, ctx_len=ctx_len, prefill_seq_len=PREFILL,
                                     weights="reference")
                exports[label] = (out, seconds)
            import onnx

            print(f"\n== {name}: {weight_bytes / 2**30:.2f} GiB of float32 weights, ctx_len {ctx_len}")
            for label, (out, seconds) in exports.items():
                counts = node_counts(onnx.load(os.path.join(out, "model.onnx"), load_external_data=False))
                print(f"  {label:<9} export {seconds:6.2f} s   nodes: main {counts[0]}, layers inlined {counts[1]}, "
                      f"fully inlined {counts[2]}")
            floor = decode_bytes(config, weight_bytes, ctx_len) / bandwidth
            for threads in (1, 2):
                sessions = {label: session(out, threads) for label, (out, _) in exports.items()}
                feeds = {label: step_feeds(sess, config["vocab_size"], ctx_len) for label, sess in sessions.items()}
                essential_dir = os.path.join(workdir, f"{name}-essential")
                essential, essential_prefill, essential_decode = essential_work(config, threads, essential_dir, ctx_len)
                prefill = interleaved_medians({**{label: (sessions[label], feeds[label][0]) for label in sessions},
                                               "essential": (essential, essential_prefill)}, args.repeats)
                decode = interleaved_medians({**{label: (sessions[label], feeds[label][1]) for label in sessions},
                                              "essential": (essential, essential_decode)}, args.repeats)
                del essential
                shutil.rmtree(essential_dir)
                for step, times in (("prefill", prefill), ("decode ", decode)):
                    base, ours, least = times["baseline"], times["qtrace"], times["essential"]
                    floor_note = ""
                    if step == "decode ":
                        floor_note = f"; memory floor {floor * 1e3:.2f} ms: qtrace at {ours / floor:4.2f}x it"
                    print(f"  {threads} thread{'s' if threads > 1 else ' '} {step}: qtrace {ours * 1e3:8.2f} ms, "
                          f"baseline {base * 1e3:8.2f} ms: {base / ours:4.2f}x faster   essential work "
                          f"{least * 1e3:8.2f} ms: qtrace at {ours / least:4.2f}x it, at most {base / least:4.2f}x "
                          f"faster than the baseline is possible{floor_note}")
                del sessions, feeds  # before the next thread count's sessions: two models' weights at a time
        print("\nblocked attention (tiny Llama, ctx_len 128): main / layers inlined / fully inlined nodes")
        from qtrace.examples.checkpoint import export_model, load_checkpoint

        tiny_checkpoint = os.path.join(workdir, "tiny-checkpoint")
        if not os.path.isdir(tiny_checkpoint):  # `--models 1B` alone
            write_checkpoint(tiny_checkpoint, MODELS["tiny"])
        for blocks, q_blocks in ((0, 0), (4, 0), (16, 0), (4, 2), (1, 4)):
            out = os.path.join(workdir, "blocked")
            export_model(load_checkpoint(tiny_checkpoint), out, ctx_len=128, prefill_seq_len=32,
                         kv_blocks=blocks, q_blocks=q_blocks, weights="reference")
            counts = node_counts(onnx.load(os.path.join(out, "model.onnx"), load_external_data=False))
            flags = f"--kv-blocks {blocks}" + (f" --q-blocks {q_blocks}" if q_blocks else "")
            print(f"  {flags:<26} {counts[0]:5d} {counts[1]:6d} {counts[2]:6d}")
            shutil.rmtree(out)
        print("\nnode counts per family (2 layers, ctx_len 128): main / layers inlined / fully inlined")
        from qtrace.examples.checkpoint import random_model

        for arch, config in fixture_configs().items():
            out = os.path.join(workdir, "family")
            export_model(random_model(config), out, ctx_len=128, prefill_seq_len=32)
            counts = node_counts(onnx.load(os.path.join(out, "model.onnx"), load_external_data=False))
            print(f"  {arch:<26} {counts[0]:5d} {counts[1]:6d} {counts[2]:6d}")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
