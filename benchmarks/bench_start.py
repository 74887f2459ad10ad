"""Start-up cost of a fresh `qtrace export` of a tiny model, with a cold and a warm custom-op cache.

    python benchmarks/bench_start.py [--runs 5] [--checkpoint tests/fixtures/llama]

Each run is a new process: `python -m qtrace.cli export CHECKPOINT -o DIR --ctx-len 64
--prefill-seq-len 8`. Cold runs get an empty QTRACE_CACHE_DIR, so they compile the custom-op bodies
with onnxscript (what every export did before the cache); warm runs share a filled one. Cold and warm
runs alternate, and the median of each is reported (wall and CPU seconds), with the ratio cold / warm
and a bare `python -c pass` for scale. A last pair of runs with `-X importtime` splits the warm and
cold wall time into imports (top-level modules, largest first) and the rest. Asserts nothing.

The processes may write bytecode (PYTHONDONTWRITEBYTECODE is dropped from their environment), as an
installed package would have it: without it every start recompiles qtrace's own modules.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the child, stderr) of one process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), result.stderr


def import_split(stderr: str) -> tuple[float, list[tuple[str, float]]]:
    """Total seconds in top-level imports, and the top-level modules by cumulative seconds."""
    tops = []
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)  # no indent: a top-level import
        if match:
            tops.append((match[2].strip(), int(match[1]) / 1e6))
    tops.sort(key=lambda item: -item[1])
    return sum(seconds for _, seconds in tops), tops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--checkpoint", default=os.path.join("tests", "fixtures", "llama"))
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="bench_start.")
    export = [sys.executable, "-m", "qtrace.cli", "export", args.checkpoint, "-o", os.path.join(scratch, "out"),
              "--ctx-len", "64", "--prefill-seq-len", "8"]
    warm_cache = os.path.join(scratch, "warm")

    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

    def env_for(cold_run: int | None) -> dict[str, str]:
        cache = warm_cache if cold_run is None else os.path.join(scratch, f"cold{cold_run}")
        return dict(base_env, QTRACE_CACHE_DIR=cache)

    run(export, env_for(None))  # fills the warm cache, the bytecode caches and the OS file cache
    run(export, env_for(-1))  # and onnxscript's bytecode
    bare, cold, warm = [], [], []
    for i in range(args.runs):
        bare.append(run([sys.executable, "-c", "pass"], base_env))
        cold.append(run(export, env_for(i)))
        warm.append(run(export, env_for(None)))

    def median(samples: list[tuple[float, float, str]], field: int) -> float:
        return statistics.median(sample[field] for sample in samples)

    print(f"fresh-process `qtrace export {args.checkpoint}` (ctx 64, prefill 8), median of {args.runs}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'':26} {'wall s':>7} {'cpu s':>7}")
    print(f"{'python -c pass':26} {median(bare, 0):7.3f} {median(bare, 1):7.3f}")
    print(f"{'export, cold cache':26} {median(cold, 0):7.3f} {median(cold, 1):7.3f}")
    print(f"{'export, warm cache':26} {median(warm, 0):7.3f} {median(warm, 1):7.3f}")
    print(f"cold / warm: wall {median(cold, 0) / median(warm, 0):.2f}x, cpu {median(cold, 1) / median(warm, 1):.2f}x")

    for label, env in (("warm", env_for(None)), ("cold", env_for(args.runs))):
        wall, _, stderr = run([sys.executable, "-X", "importtime", *export[1:]], env)
        imports, tops = import_split(stderr)
        print(f"\n{label} cache under -X importtime: wall {wall:.3f} s, imports {imports:.3f} s "
              f"({imports / wall:.0%}), the rest {wall - imports:.3f} s")
        for name, seconds in tops[:6]:
            print(f"  {seconds:6.3f} s  {name}")


if __name__ == "__main__":
    main()
