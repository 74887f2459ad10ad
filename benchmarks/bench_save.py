"""Peak memory while saving a model with ~2.5 GiB of weights as external data.

    python benchmarks/bench_save.py [--gib 2.5] [--source strided|memmap] [--dir DIR]

The weights are generated lazily so that they cost (almost) no memory before saving:
- `strided` (default): each table is a strided view of a small random vector (row i is
  `base[i : i + width]`), so every byte written has to be produced by copying from a view;
- `memmap`: each table is a read-only memory map of a sparse file, as a checkpoint on disk would be.
  Pages read from a map count in RSS as file-backed memory the kernel can drop at any time; the
  anonymous (heap) figure shows what saving itself allocates.

Prints the weights' size, the peak RSS increase during `Lowered.save` (the kernel's high-water mark,
reset just before saving, and a 2 ms sampling thread that also splits anonymous from file-backed
memory), the Python-heap peak seen by tracemalloc, the ratio to the weights' size, and the time taken.
It asserts nothing: the figures are for reading. The budget is a peak below weights + 25%.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc

import numpy as np
from numpy.lib.stride_tricks import as_strided

import qtrace
import qtrace.primitives as qp

GIB = 2**30
WIDTH = 4096
TABLES = 3


def status(key: str) -> int:
    """A /proc/self/status memory field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class MemoryWatch:
    """Peak RSS (total and anonymous) above the starting point while the block runs."""

    def __enter__(self) -> "MemoryWatch":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.start_rss, self.start_anon = status("VmRSS"), status("RssAnon")
        self.peak_rss, self.peak_anon = self.start_rss, self.start_anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        tracemalloc.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak_rss = max(self.peak_rss, status("VmRSS"))
            self.peak_anon = max(self.peak_anon, status("RssAnon"))

    def __exit__(self, *exc: object) -> None:
        self.heap_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        self._stop.set()
        self._thread.join()
        if self.hwm_reset:
            self.peak_rss = max(self.peak_rss, status("VmHWM"))
        self.rss_increase = self.peak_rss - self.start_rss
        self.anon_increase = self.peak_anon - self.start_anon


def strided_tables(rows: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    bases = [rng.standard_normal(rows + WIDTH).astype(np.float32) for _ in range(TABLES)]
    return [as_strided(base, shape=(rows, WIDTH), strides=(4, 4), writeable=False) for base in bases]


def memmap_tables(rows: int, directory: str) -> list[np.ndarray]:
    tables = []
    for k in range(TABLES):
        path = os.path.join(directory, f"checkpoint{k}.bin")
        with open(path, "wb") as f:
            f.truncate(rows * WIDTH * 4)  # sparse: no disk blocks, reads as zeros
        tables.append(np.memmap(path, dtype=np.float32, mode="r", shape=(rows, WIDTH)))
    return tables


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.5, help="total weight size in GiB (default 2.5)")
    parser.add_argument("--source", choices=["strided", "memmap"], default="strided")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory, removed)")
    args = parser.parse_args(argv)

    directory = args.dir or tempfile.mkdtemp(prefix="qtrace-bench-save-")
    os.makedirs(directory, exist_ok=True)
    try:
        rows = int(args.gib * GIB / (TABLES * WIDTH * 4))
        tables = strided_tables(rows) if args.source == "strided" else memmap_tables(rows, directory)

        def model(ids: object) -> object:
            rows = [qp.take(table, ids, axis=0) for table in tables]
            return rows[0] + rows[1] + rows[2]

        lowered = qtrace.lower(model, (qtrace.ShapeDtype(("batch",), "int64"),))
        weights = sum(a.nbytes for a in lowered.parts.weights.values())
        path = os.path.join(directory, "model.onnx")
        start = time.perf_counter()
        with MemoryWatch() as memory:
            files = lowered.save(path)
        seconds = time.perf_counter() - start
        written = sum(os.path.getsize(f) for f in files)

        print(f"source                     {args.source}")
        print(f"weights                    {weights / GIB:8.3f} GiB in {len(lowered.parts.weights)} arrays")
        print(f"files written              {written / GIB:8.3f} GiB ({', '.join(os.path.basename(f) for f in files)})")
        print(f"RSS before save            {memory.start_rss / GIB:8.3f} GiB")
        print(f"peak RSS increase          {memory.rss_increase / GIB:8.3f} GiB"
              f"{'' if memory.hwm_reset else '  (sampled only: VmHWM could not be reset)'}")
        print(f"  of which anonymous       {memory.anon_increase / GIB:8.3f} GiB")
        print(f"python heap peak           {memory.heap_peak / GIB:8.3f} GiB (tracemalloc)")
        print(f"increase / weights         {memory.rss_increase / weights:8.3f}   (budget: peak below weights + 25%)")
        print(f"peak RSS / weights         {(memory.start_rss + memory.rss_increase) / weights:8.3f}")
        print(f"save time                  {seconds:8.2f} s ({written / GIB / seconds:.2f} GiB/s)")
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
