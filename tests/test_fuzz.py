"""Differential fuzzer: random numpy-style programs (tests/fuzz_programs.py) are traced, run through
every pass (in debug mode, which re-checks the graph and its values after each pass), lowered,
checked by onnx's full checker, run on onnxruntime (through qtrace's own session) at one or two
sizes of their symbolic dims and compared with the eager numpy run; lowering twice must give
identical bytes.

300 programs per run by default, the same ones every run (derandomized) so CI is reproducible.
`QTRACE_FUZZ=5000 python -m pytest tests/test_fuzz.py -s` is the nightly size: that many programs,
new ones each run. The statistics (programs per family and dtype, steps per kind, fused ops,
onnxruntime runs) print at the end with `-s`, and go to $QTRACE_FUZZ_STATS as JSON when set.
"""

from __future__ import annotations

import collections
import json
import os

import numpy as np
from hypothesis import HealthCheck, given, settings

import qtrace
from qtrace.dims import Dim

from fuzz_programs import Program, programs

PROGRAMS = int(os.environ.get("QTRACE_FUZZ", "300"))
STATS: collections.Counter = collections.Counter()
FUSED_OPS = ("rms_norm", "softmax", "silu", "gelu", "sigmoid")


def tolerance(program: Program) -> float:
    return 2e-2 if program.computes_in_float16 else 2e-5


def assert_close(name: str, got: np.ndarray, want: np.ndarray, tol: float) -> None:
    want = np.asarray(want)
    assert got.shape == want.shape, f"{name}: onnxruntime shape {got.shape}, numpy {want.shape}"
    assert got.dtype == want.dtype, f"{name}: onnxruntime dtype {got.dtype}, numpy {want.dtype}"
    if want.dtype.kind != "f":
        np.testing.assert_array_equal(got, want, err_msg=name)
        return
    wide_got, wide_want = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(wide_want)
    assert np.array_equal(np.isnan(wide_got), np.isnan(wide_want)), f"{name}: NaNs differ"
    assert np.array_equal(wide_got[np.isinf(wide_want)], wide_want[np.isinf(wide_want)]), f"{name}: infinities differ"
    scale = max(1.0, float(np.abs(wide_want[finite]).max())) if finite.any() else 1.0
    # relative to each value, with an absolute floor relative to the largest value (cancellation)
    np.testing.assert_allclose(wide_got[finite], wide_want[finite], rtol=tol, atol=tol * scale, err_msg=name)


def check_program(program: Program) -> None:
    fn = program.function()
    names = [i.name for i in program.inputs]
    # Debug mode compares every pass's result with the traced graph's at float32 tolerances, too tight
    # for a float16 program whose fused ops round once where the written-out form rounds at every step.
    lowered = qtrace.lower(fn, program.specs(), input_names=names, debug=not program.computes_in_float16)
    lowered.check()
    again = qtrace.lower(fn, program.specs(), input_names=names)
    assert again.model.SerializeToString() == lowered.model.SerializeToString(), "lowering twice differs"
    rng = np.random.default_rng(program.seed)
    for sizes in program.size_sets:
        arrays = program.arrays(rng, sizes)
        want = fn(*[a.copy() for a in arrays])
        got = lowered.run(*arrays)
        for k, (g, w) in enumerate(zip(got, want)):
            assert_close(f"output {k} at sizes {sizes}", g, w, tolerance(program))
        STATS["onnxruntime runs"] += 1
    record(program, lowered)


def record(program: Program, lowered) -> None:
    STATS["programs"] += 1
    STATS[f"family {program.family}"] += 1
    STATS[f"dtype {program.dtype.name}"] += 1
    symbolic = any(isinstance(d, Dim) for i in program.inputs for d in i.shape)
    STATS["symbolic inputs" if symbolic else "static inputs"] += 1
    for step in program.steps:
        STATS[f"step {step.kind}"] += 1
    ops = collections.Counter(n.op for g in [lowered.graph] + [f.body for f in lowered.graph.functions.values()]
                              for n in g.nodes)
    for op in FUSED_OPS:
        if ops[op]:
            STATS[f"graph has {op}"] += 1
    for op in ("ctx_scatter", "ctx_scatter_cb", "ctx_gather", "ctx_gather_cb", "call", "index_put"):
        if ops[op]:
            STATS[f"graph has {op}"] += 1
    if any(n.op == "gather" and n.params.get("batch_dims") for g in [lowered.graph] for n in g.nodes):
        STATS["graph has a batched gather"] += 1


@settings(max_examples=PROGRAMS, deadline=None, derandomize="QTRACE_FUZZ" not in os.environ, database=None,
          suppress_health_check=list(HealthCheck), print_blob=True)
@given(programs)
def run_programs(program: Program) -> None:
    check_program(program)


def test_random_programs_lower_to_models_that_compute_what_numpy_computes():
    STATS.clear()
    run_programs()
    report = "\n".join(f"  {key:<28} {count}" for key, count in sorted(STATS.items()))
    print(f"\nfuzzer statistics ({PROGRAMS} programs asked):\n{report}")
    if os.environ.get("QTRACE_FUZZ_STATS"):
        with open(os.environ["QTRACE_FUZZ_STATS"], "w") as f:
            json.dump(dict(STATS), f, indent=1, sort_keys=True)
    # hypothesis runs the last example again after a failure; without one, every program was checked
    assert STATS["programs"] >= PROGRAMS
