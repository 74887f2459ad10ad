"""Export cost of a Hugging Face-layout Llama checkpoint, stage by stage, in both weight modes.

Three configs, each written as a safetensors checkpoint (random weights generated on the fly into a
temporary directory, deleted at the end):

- tiny: hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 256 (float32);
- 160M: hidden 1024, 8 layers, 16 heads / 8 kv heads, intermediate 2816, vocab 32000 (float32);
- 7B-shaped: hidden 4096, 32 layers, 32 heads / 32 kv heads, intermediate 11008, vocab 32000.
  Its weights are float16 and it is exported with --dtype float16: in float32 the checkpoint and a
  copying export would need 2 x 27 GB of disk, over this benchmark's 40 GB budget. If the machine
  has less free disk or memory than the float16 case needs, the layer count is scaled down and the
  output says so.

Each export runs in a fresh process (so peak memory is that export's alone) with `weights="copy"`
(the weights are streamed into model.onnx.data) and `weights="reference"` (the ONNX external data
points into the checkpoint; only the graph is written). Printed per export: seconds per stage —
load (open the checkpoint: header parse + memory maps), trace, passes, build (IR -> ONNX), save
(model.onnx + external data), side files — and the total; the files' size; peak resident memory
(ru_maxrss, which counts checkpoint pages mapped in while streaming them) and the peak growth of
anonymous memory (sampled RssAnon, over the process after its imports: what the export itself
allocates). The custom-op bodies are compiled with onnxscript once per process before the timed
export; that warm-up is printed apart. Baselines measured in the same run: copying
the checkpoint file with shutil.copyfile (the floor for a copying save) and, for the tiny config,
the eager numpy model against which one onnxruntime prefill and one decode step are timed.

    python benchmarks/bench_export.py [--configs tiny 160M 7B] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=512),
    "160M": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=2048),
    "7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096),
}
DTYPES = {"tiny": "float32", "160M": "float32", "7B": "float16"}
DISK_BUDGET = 40 << 30
MEMORY_BUDGET = 20 << 30
CTX_LEN, PREFILL_LEN = 128, 32


# -- checkpoints with weights generated on the fly ------------------------------------------------------


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
                       p + "mlp.gate_proj.weight": (i, d), p + "mlp.up_proj.weight": (i, d),
                       p + "mlp.down_proj.weight": (d, i)})
    return shapes


def weight_bytes(cfg: dict[str, Any], dtype: str) -> int:
    return sum(int(np.prod(s)) for s in tensor_shapes(cfg).values()) * np.dtype(dtype).itemsize


def write_checkpoint(directory: str, cfg: dict[str, Any], dtype: str) -> None:
    """config.json and one model.safetensors, streamed: random N(0, 1/fan_in) values (norms near 1)
    taken from a fixed random pool at moving offsets, so 13 GB take seconds, not minutes."""
    os.makedirs(directory, exist_ok=True)
    hf = {**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": dtype}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    code = {"float32": "F32", "float16": "F16"}[dtype]
    itemsize = np.dtype(dtype).itemsize
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in tensor_shapes(cfg).items():
        nbytes = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    pool = np.random.default_rng(0).standard_normal(1 << 23).astype(dtype)
    chunk = 1 << 22
    with open(os.path.join(directory, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        start = 0
        for name, shape in tensor_shapes(cfg).items():
            size = int(np.prod(shape))
            if len(shape) == 1:
                f.write((1.0 + 0.1 * pool[:size]).astype(dtype).tobytes())
                continue
            scale = np.asarray(1.0 / np.sqrt(shape[1]), dtype)
            for done in range(0, size, chunk):
                n = min(chunk, size - done)
                start = (start + 7919) % (len(pool) - chunk)
                f.write((pool[start:start + n] * scale).tobytes())


# -- one export, in a child process ---------------------------------------------------------------------


class AnonymousPeak:
    """Samples the process's RssAnon (Linux) every few milliseconds; keeps the maximum."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(0.005)

    def __enter__(self) -> "AnonymousPeak":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def child_export(checkpoint: str, out: str, weights: str, dtype: str) -> dict[str, Any]:
    """Export once, timing each stage (trace and build by wrapping the functions `qtrace.lower` calls)."""
    import qtrace.lowering.api as api
    from qtrace.examples.checkpoint import export_model, load_checkpoint
    from qtrace.lowering.custom_ops import custom_op_function

    start = time.perf_counter()
    custom_op_function("CtxScatter")  # compiles every custom-op body with onnxscript, once per process
    warm_up = time.perf_counter() - start
    baseline = AnonymousPeak()._sample()
    with AnonymousPeak() as anonymous:
        timings: dict[str, float] = {}

        def timed(name: str, fn: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
            return wrapper

        api.trace = timed("trace", api.trace)
        api.build_model = timed("build", api.build_model)
        start = time.perf_counter()
        model = load_checkpoint(checkpoint, dtype=np.float16 if dtype == "float16" else np.float32)
        load = time.perf_counter() - start
        start = time.perf_counter()
        report = export_model(model, out, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN, dtype=dtype,
                              weights=weights)
        total = time.perf_counter() - start
    passes = sum(r.seconds for r in report.lowered.pass_report.records)
    slowest = max(report.lowered.pass_report.records, key=lambda r: r.seconds)
    stages = {"load": load, "trace": timings["trace"], "passes": passes, "build": timings["build"],
              "save": report.stage_seconds["save"],
              "side files": total - report.stage_seconds["lower"] - report.stage_seconds["save"]}
    files = {os.path.basename(f): os.path.getsize(f) for f in report.files if not os.path.islink(f)}
    return {"stages": stages, "total": load + total, "slowest_pass": f"{slowest.name} {slowest.seconds:.2f}s",
            "files": files, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_anon": anonymous.peak - baseline, "warm_up": warm_up, "imports_anon": baseline}


def child_latency(checkpoint: str, out: str, repeats: int) -> dict[str, Any]:
    """onnxruntime: one prefill (1 x 32 tokens) and one decode step; the eager numpy model as baseline."""
    from qtrace.examples.checkpoint import load_checkpoint
    from qtrace.examples.generation import onnx_session

    model = load_checkpoint(checkpoint)
    cfg = model.cfg
    session = onnx_session(out)
    fn, _ = model.signature()
    cache = model.empty_cache(1, CTX_LEN)
    prompt = np.arange(1, PREFILL_LEN + 1, dtype=np.int64)[None] % cfg.vocab_size
    cases = {"prefill": (prompt, np.arange(PREFILL_LEN, dtype=np.int64)[None]),
             "decode": (np.array([[7]], np.int64), np.array([[PREFILL_LEN]], np.int64))}
    result = {}
    for name, (ids, positions) in cases.items():
        feeds = {"input_ids": ids, "position_ids": positions, **cache}
        for label, run in (("onnxruntime", lambda: session.run(None, feeds)),
                           ("eager numpy", lambda: fn(ids, positions, cache))):
            run()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            result[f"{name} {label}"] = float(np.median(times))
    return result


def run_child(*args: str) -> dict[str, Any]:
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True,
                            text=True)
    if result.returncode != 0:  # a failing export is a result too: report its last error line
        lines = result.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the report -----------------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 28 else f"{n / (1 << 20):.1f} MiB"


def scaled_7b(workdir: str) -> tuple[dict[str, Any], str | None]:
    """The 7B-shaped config, with fewer layers if the disk or memory budget is short."""
    cfg = dict(CONFIGS["7B"])
    free_disk = shutil.disk_usage(workdir).free
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        memory = MEMORY_BUDGET
    disk = min(DISK_BUDGET, free_disk - (2 << 30))
    layers = cfg["num_hidden_layers"]
    while layers > 1 and 2 * weight_bytes({**cfg, "num_hidden_layers": layers}, DTYPES["7B"]) > disk:
        layers //= 2
    note = None
    if layers != cfg["num_hidden_layers"]:
        note = (f"scaled to {layers} of 32 layers: a checkpoint plus a copying export need "
                f"{gib(2 * weight_bytes(cfg, DTYPES['7B']))}, {gib(disk)} of disk available")
    if memory < MEMORY_BUDGET // 4:
        note = (note + "; " if note else "") + f"only {gib(memory)} of memory free"
    cfg["num_hidden_layers"] = layers
    return cfg, note


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--workdir", help="where the temporary checkpoints and exports go (default: $TMPDIR)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "export":
            print(json.dumps(child_export(*rest)))
        elif kind == "latency":
            print(json.dumps(child_latency(rest[0], rest[1], int(rest[2]))))
        elif kind == "checkpoint":
            write_checkpoint(rest[0], json.loads(rest[1]), rest[2])
            print("{}")
        return 0

    print(f"qtrace export benchmark: ctx_len {CTX_LEN}, prefill length {PREFILL_LEN}, batch 1; "
          f"{os.cpu_count()} CPUs; each export in a fresh process")
    stage_names = ["load", "trace", "passes", "build", "save", "side files"]
    with tempfile.TemporaryDirectory(prefix="qtrace-bench-", dir=args.workdir) as workdir:
        latency_checkpoint = None
        for name in args.configs:
            cfg, note = scaled_7b(workdir) if name == "7B" else (dict(CONFIGS[name]), None)
            dtype = DTYPES[name]
            params = sum(int(np.prod(s)) for s in tensor_shapes(cfg).values())
            checkpoint = os.path.join(workdir, f"{name}-checkpoint")
            start = time.perf_counter()
            made_checkpoint = run_child("checkpoint", checkpoint, json.dumps(cfg), dtype)
            if "error" in made_checkpoint:
                raise RuntimeError(f"writing the {name} checkpoint failed: {made_checkpoint['error']}")
            made = time.perf_counter() - start
            size = os.path.getsize(os.path.join(checkpoint, "model.safetensors"))
            print(f"\n== {name}: {params / 1e6:,.1f}M parameters, {cfg['num_hidden_layers']} layers, hidden "
                  f"{cfg['hidden_size']}, {dtype} weights ({gib(size)}, generated in {made:.1f}s)")
            if note:
                print(f"   note: {note}")
            if name == "7B":
                print("   note: float16 weights, exported with --dtype float16 (float32 would need 2 x "
                      f"{gib(weight_bytes(CONFIGS['7B'], 'float32'))} of disk, over the 40 GB budget)")
            print(f"   {'weights':<10}" + "".join(f"{s:>11}" for s in stage_names) +
                  f"{'total':>9}  {'written':>11}  {'peak RSS':>11}  {'anon +':>11}  slowest pass")
            results = {}
            for weights in ("copy", "reference"):
                out = os.path.join(workdir, f"{name}-{weights}")
                r = run_child("export", checkpoint, out, weights, dtype)
                results[weights] = r
                if "error" in r:
                    print(f"   {weights:<10}FAILED: {r['error']}")
                    shutil.rmtree(out, ignore_errors=True)
                    continue
                print(f"   {weights:<10}" + "".join(f"{r['stages'][s]:10.2f}s" for s in stage_names) +
                      f"{r['total']:8.2f}s  {gib(sum(r['files'].values())):>11}  {gib(r['peak_rss']):>11}  "
                      f"{gib(r['peak_anon']):>11}  {r['slowest_pass']}  (custom-op warm-up {r['warm_up']:.2f}s)")
                if name == "tiny" and weights == "copy":
                    latency_checkpoint = (checkpoint, out)
                else:
                    shutil.rmtree(out)
            start = time.perf_counter()
            shutil.copyfile(os.path.join(checkpoint, "model.safetensors"), os.path.join(workdir, "copy-baseline"))
            copy_seconds = time.perf_counter() - start
            os.unlink(os.path.join(workdir, "copy-baseline"))
            figures = [f"baseline: shutil.copyfile of the checkpoint {copy_seconds:.2f}s"]
            copied, referenced = results["copy"], results["reference"]
            if "error" not in copied:
                figures.append(f"copy-mode save / file copy = {copied['stages']['save'] / max(copy_seconds, 1e-9):.1f}x")
                figures.append(f"anon growth / weights = {copied['peak_anon'] / size:.2f}x (copy)")
            if "error" not in referenced:
                figures.append(f"{referenced['peak_anon'] / size:.2f}x (reference)")
                if "error" not in copied:
                    figures.append(f"reference total / copy total = {referenced['total'] / copied['total']:.2f}x")
            print("   " + "; ".join(figures))
            if name != "tiny":
                shutil.rmtree(checkpoint)
        if latency_checkpoint is not None:
            r = run_child("latency", *latency_checkpoint, "200")
            print("\n== tiny on onnxruntime (CPU), median of 200 runs; baseline: the eager numpy model, same step")
            for step in ("prefill", "decode"):
                ort_seconds, numpy_seconds = r[f"{step} onnxruntime"], r[f"{step} eager numpy"]
                shape = f"1 x {PREFILL_LEN}" if step == "prefill" else "1 x 1"
                print(f"   {step:<8} ({shape:>6} tokens, ctx {CTX_LEN}): onnxruntime {ort_seconds * 1e3:7.3f} ms, "
                      f"eager numpy {numpy_seconds * 1e3:7.3f} ms, ratio {numpy_seconds / ort_seconds:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
