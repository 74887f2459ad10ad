"""`qtrace export` on real-sized bfloat16 checkpoints: wall time against the disk's floor, and peak
anonymous memory.

The checkpoints have the tensor names, shapes and config of Llama-3.2-1B, Llama-3.1-8B and
Llama-3.1-70B in bfloat16, written sparse: real safetensors headers, then data regions made by
truncating each file to its full length (apparent size 2.5 / 16 / 141 GB, no disk used; the weights
read back as zeros). Like the published checkpoints, the 1B is one model.safetensors and the larger
ones are shards of at most 5 GB listed in model.safetensors.index.json. Each export runs
`qtrace export` in a child process, one mode at a time:

- copy-float32:   `--dtype float32 --weights copy`  (every weight converted bf16 -> f32 while written)
- copy-float16:   `--dtype float16 --weights copy`  (bf16 -> f16, clipped to float16's range)
- reference-ai200: `--hw ai200 --weights reference` (bfloat16 kept: the external data points into the
  checkpoint, only the graph is written)

Printed per export: wall time of the child and its CPU time (user + system); the floor, measured in
the same run right after it: the time `dd` takes to write the same number of bytes (all files the
export wrote) from /dev/zero into the same directory, wall and CPU, so time over floor is what the
export costs beyond the disk; both ratios (on a machine shared with other work, wall time is mostly
waiting for a CPU, and the CPU ratio is the steadier one); the bytes written;
and the peak anonymous memory of the child: the parent reads RssAnon from /proc/<pid>/status every
2 ms while the child runs (RssAnon excludes the checkpoint's memory-mapped file pages, which the
kernel reclaims at will; VmHWM would count them). The page cache is flushed (sync) before each
timed run, and every output is deleted as soon as it is measured. An export whose output does not
fit the free disk (less a 4 GiB margin) is skipped with a note. Only one export runs at a time.
Each export and its floor run --repeat times, alternating; the fastest of each is printed (the least
disturbed by other work on the machine) and the largest peak memory.

    python benchmarks/bench_scale.py [--models 1B 8B 70B] [--modes copy-float32 copy-float16 reference-ai200]
                                     [--repeat 2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_export import tensor_shapes  # noqa: E402  (the Llama checkpoint layout, tied head or not)

GIB = 2**30
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
MODELS: dict[str, dict[str, Any]] = {
    "1B": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
               rope_scaling=_LLAMA3_ROPE),
    "8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
               rope_scaling=dict(_LLAMA3_ROPE, factor=8.0)),
    "70B": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
                rope_scaling=dict(_LLAMA3_ROPE, factor=8.0)),
}
MODES: dict[str, tuple[list[str], int]] = {  # flags, bytes per weight element written
    "copy-float32": (["--dtype", "float32", "--weights", "copy"], 4),
    "copy-float16": (["--dtype", "float16", "--weights", "copy"], 2),
    "reference-ai200": (["--hw", "ai200", "--weights", "reference"], 0),
}
DISK_MARGIN = 4 * GIB
SAMPLE_SECONDS = 0.002


# -- sparse checkpoints ---------------------------------------------------------------------------------


def elements(cfg: dict[str, Any]) -> int:
    total = 0
    for shape in tensor_shapes(cfg).values():
        count = 1
        for d in shape:
            count *= d
        total += count
    return total


SHARD_BYTES = 5 * 10**9


def _write_sparse_safetensors(path: str, shapes: dict[str, tuple[int, ...]]) -> int:
    """A bfloat16 safetensors file whose data region is a hole; returns its apparent size."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        count = 1
        for d in shape:
            count *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * count]}
        offset += 2 * count
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


def write_sparse_checkpoint(directory: str, cfg: dict[str, Any]) -> int:
    """config.json and bfloat16 safetensors (sharded past SHARD_BYTES); returns the apparent size."""
    os.makedirs(directory, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
              "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001, **cfg}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, shape in tensor_shapes(cfg).items():
        count = 1
        for d in shape:
            count *= d
        if size and size + 2 * count > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += 2 * count
    if len(shards) == 1:
        return _write_sparse_safetensors(os.path.join(directory, "model.safetensors"), shards[0])
    total, weight_map = 0, {}
    for i, shapes in enumerate(shards):
        shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += _write_sparse_safetensors(os.path.join(directory, shard), shapes)
        weight_map.update(dict.fromkeys(shapes, shard))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return total


# -- measuring a child process --------------------------------------------------------------------------


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_measured(command: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds (user + system), peak RssAnon bytes, stdout) of a child process;
    raises if it fails. Its output goes to temporary files, so a full pipe never stalls it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        peak = 0
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _rss_anon(child.pid))
            time.sleep(SAMPLE_SECONDS)
        seconds = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({status}):\n{err.read()[-3000:]}")
        return seconds, usage.ru_utime + usage.ru_stime, peak, out.read()


def directory_bytes(directory: str) -> int:
    """Bytes the export wrote: hard links to the checkpoint (reference mode) are not counted."""
    total = 0
    for name in os.listdir(directory):
        info = os.stat(os.path.join(directory, name))
        if info.st_nlink == 1:
            total += info.st_size
    return total


def floor_seconds(directory: str, nbytes: int) -> tuple[float, float]:
    """(wall, CPU) seconds dd takes to write nbytes from /dev/zero into the directory (no fsync, like
    the export)."""
    path = os.path.join(directory, "floor.bin")
    os.sync()
    seconds, cpu, _, _ = run_measured(["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={nbytes}",
                                       "iflag=count_bytes", "status=none"])
    os.unlink(path)
    os.sync()
    return seconds, cpu


def export_command(checkpoint: str, out: str, flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "qtrace.cli", "export", checkpoint, "-o", out, "--ctx-len", "1024",
            "--prefill-seq-len", "128", *flags]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--workdir", default=None, help="where checkpoints and exports go (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each export and its floor (the fastest "
                                                              "of each is printed; peak memory is the largest)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="qtrace-bench-scale-", dir=args.workdir)
    print(f"{'model':<5} {'mode':<16} {'wall s':>8} {'cpu s':>7} {'floor s':>8} {'cpu s':>7} {'ratio':>6} "
          f"{'cpu r.':>6} {'out GiB':>8} {'anon GiB':>9}  stages of the fastest run")
    print(f"{'':<22} {'export':^16} {'floor (dd)':^16}")
    try:
        for name in args.models:
            cfg = MODELS[name]
            checkpoint = os.path.join(workdir, f"llama-{name}")
            apparent = write_sparse_checkpoint(checkpoint, cfg)
            for mode in args.modes:
                flags, out_itemsize = MODES[mode]
                needed = elements(cfg) * out_itemsize
                free = shutil.disk_usage(workdir).free
                if needed > free - DISK_MARGIN:
                    print(f"{name:<5} {mode:<16} skipped: writes {needed / GIB:.1f} GiB, {free / GIB:.1f} GiB free")
                    continue
                out = os.path.join(workdir, f"out-{name}-{mode}")
                runs, floors = [], []
                for _ in range(args.repeat):  # export and floor alternate, so both see the same machine
                    os.sync()
                    runs.append(run_measured(export_command(checkpoint, out, flags)))
                    written = directory_bytes(out)
                    shutil.rmtree(out)
                    floors.append(floor_seconds(workdir, written))
                seconds, cpu, _, stdout = min(runs)
                peak = max(run[2] for run in runs)
                stages = re.search(r"^time: (.*)$", stdout, re.M)
                floor, floor_cpu = min(floors)
                ratio = seconds / floor if floor > 0.05 else float("nan")
                cpu_ratio = min(r[1] for r in runs) / min(f[1] for f in floors) if floor > 0.05 else float("nan")
                print(f"{name:<5} {mode:<16} {seconds:8.1f} {cpu:7.1f} {floor:8.1f} {floor_cpu:7.1f} {ratio:6.2f} "
                      f"{cpu_ratio:6.2f} {written / GIB:8.2f} {peak / GIB:9.3f}  {stages.group(1) if stages else ''}",
                      flush=True)
            shutil.rmtree(checkpoint)
            print(f"       (checkpoint {name}: {apparent / GIB:.1f} GiB apparent, bfloat16)", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
