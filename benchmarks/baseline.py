"""An earlier qtrace, importable side by side with this one, for benchmarks that print ratios against
the exporter as it was (measured in the same run, on the same machine, on the same checkpoint).

`baseline_tree(commit)` extracts the commit's tracked files with `git archive` into a scratch
directory and links `qtrace/primitives`, `qtrace/lowering` and `qtrace/examples` to the top-level
folders, as the editable install's package-dir mapping does, so `PYTHONPATH=<tree>` imports it
without installing anything. `run_export(tree, checkpoint, out, ...)` exports a checkpoint with that
tree in a child process (the old and new APIs of `export_model` are both understood).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SESSION_START = "96a30cb"  # main before the model zoo and the graph-quality work

_EXPORT = r"""
import json, sys, time
options = json.loads(sys.argv[1])
from qtrace.examples.checkpoint import export_model, load_checkpoint
start = time.perf_counter()
loaded = load_checkpoint(options.pop("checkpoint"))
out = options.pop("out")
if isinstance(loaded, tuple):   # before the model zoo: (cfg, params)
    export_model(*loaded, out, **options)
else:
    export_model(loaded, out, **options)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def baseline_tree(commit: str = SESSION_START, parent: str | None = None) -> str:
    tree = tempfile.mkdtemp(prefix=f"qtrace-{commit}-", dir=parent)
    archive = subprocess.run(["git", "-C", REPOSITORY, "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    for package in ("primitives", "lowering", "examples"):
        os.symlink(os.path.join("..", package), os.path.join(tree, "qtrace", package))
    return tree


def run_export(tree: str | None, checkpoint: str, out: str, **options: object) -> float:
    """Export in a child process with `tree` first on the path (None: this checkout); the seconds it took."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = tree + os.pathsep + env.get("PYTHONPATH", "")
    payload = json.dumps({"checkpoint": checkpoint, "out": out, **options})
    result = subprocess.run([sys.executable, "-c", _EXPORT, payload], env=env, capture_output=True, text=True,
                            cwd=tree or REPOSITORY)
    if result.returncode:
        raise RuntimeError(f"export with {tree or 'this checkout'} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]
