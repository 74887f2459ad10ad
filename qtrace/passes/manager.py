"""Passes and the pipeline that runs them (docs/architecture.md, "Passes").

A pass edits a graph in place, through the Graph methods, and returns what it did: a Counter of
rule (or transform) labels to how often each fired, or simply a bool; either is falsy when nothing
changed. The pipeline records that per pass; the report and the IR dumps show it.
"""

from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

from ..errors import CheckError
from ..ir import Graph

PassResult = Union[bool, "collections.Counter[str]"]
Pass = Callable[[Graph], PassResult]
PASSES: dict[str, Pass] = {}


def register_pass(name: str) -> Callable[[Pass], Pass]:
    def register(fn: Pass) -> Pass:
        PASSES[name] = fn
        return fn

    return register


@dataclass
class PassRecord:
    name: str
    nodes_before: int
    nodes_after: int
    seconds: float
    changed: bool
    fired: collections.Counter = field(default_factory=collections.Counter)  # rule label -> times fired

    def header(self) -> str:
        """One line: the pass, node counts, time and whether it changed the graph."""
        return (f"{self.name:<16} nodes {self.nodes_before:>6} -> {self.nodes_after:<6} "
                f"{self.seconds * 1000:9.1f} ms{'' if self.changed else '  (no change)'}")

    def fired_lines(self) -> list[str]:
        """`fuse_rms_norm (fuse.py:97) x5`, most frequent first (ties by label)."""
        return [f"{label} x{count}" for label, count in sorted(self.fired.items(), key=lambda kv: (-kv[1], kv[0]))]


@dataclass
class PassReport:
    records: list[PassRecord] = field(default_factory=list)

    def summary(self) -> str:
        lines = []
        for i, record in enumerate(self.records):
            lines.append(f"{i + 1:02d} {record.header()}")
            lines.extend(f"     {line}" for line in record.fired_lines())
        return "\n".join(lines)

    def fired(self) -> collections.Counter:
        """How often each rule fired over the whole pipeline."""
        total: collections.Counter = collections.Counter()
        for record in self.records:
            total.update(record.fired)
        return total


def count_nodes(graph: Graph) -> int:
    return len(graph.nodes) + sum(len(f.body.nodes) for f in graph.functions.values())


def run_pipeline(graph: Graph, names: Sequence[str] | None = None, *, dump_dir: str | None = None,
                 debug: bool = False) -> PassReport:
    from . import DEFAULT_PIPELINE

    names = list(DEFAULT_PIPELINE if names is None else names)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise CheckError(f"unknown pass(es) {unknown}; registered: {sorted(PASSES)}")
    report = PassReport()
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        _dump(graph, dump_dir, 0, "trace", None)
    probe = _DebugProbe(graph) if debug else None
    for i, name in enumerate(names, start=1):
        before = count_nodes(graph)
        start = time.perf_counter()
        result = PASSES[name](graph)
        seconds = time.perf_counter() - start
        fired = result if isinstance(result, collections.Counter) else collections.Counter()
        record = PassRecord(name, before, count_nodes(graph), seconds, bool(result), fired)
        report.records.append(record)
        if probe is not None:
            probe.check(graph, name)
        if dump_dir:
            _dump(graph, dump_dir, i, name, record)
    if dump_dir:
        with open(os.path.join(dump_dir, "summary.txt"), "w") as f:
            f.write(report.summary() + "\n")
    return report


def dump_header(record: PassRecord | None) -> str:
    """The comment lines an IR dump starts with: which pass made it, how long it took, what fired."""
    if record is None:
        return "# trace\n"
    lines = [f"# after {record.header()}"] + [f"#   {line}" for line in record.fired_lines()]
    return "\n".join(lines) + "\n"


def _dump(graph: Graph, directory: str, index: int, name: str, record: PassRecord | None) -> None:
    base = os.path.join(directory, f"{index:02d}-{name}")
    with open(base + ".ir", "w") as f:
        f.write(dump_header(record) + str(graph))
    with open(base + ".dot", "w") as f:
        f.write(graph.to_dot())


class _DebugProbe:
    """Debug mode: after every pass, re-check the graph's invariants and compare `Graph.eval` on fixed
    random inputs with the results before any pass ran; name the pass that broke either."""

    SIZE = 3  # every symbolic dim takes this size

    def __init__(self, graph: Graph):
        import numpy as np

        from ..dims import substitute

        rng = np.random.default_rng(0)
        self.arrays = []
        for value in graph.inputs:
            sizes = {n: self.SIZE for d in value.shape if not isinstance(d, int) for n in d.names}
            shape = tuple(substitute(d, sizes) for d in value.shape)
            if value.dtype.kind == "f":
                self.arrays.append(rng.standard_normal(shape).astype(value.dtype))
            elif value.dtype.kind == "b":
                self.arrays.append(rng.random(shape) < 0.5)
            else:  # small non-negative integers are valid positions and indices for most models
                self.arrays.append(rng.integers(0, self.SIZE, shape).astype(value.dtype))
        try:
            self.expected = graph.eval_flat(self.arrays)
        except Exception:  # data-dependent failures (an index out of range): check invariants only
            self.expected = None

    def check(self, graph: Graph, pass_name: str) -> None:
        import numpy as np

        from ..dtypes import is_float, machine_epsilon
        from .shape_check import check_graph

        try:
            check_graph(graph)
        except CheckError as exc:
            raise CheckError(f"pass {pass_name} broke the graph: {exc.message}", op=exc.op,
                             location=exc.location) from None
        if self.expected is None:
            return
        got = graph.eval_flat(self.arrays)
        for name, want, have in zip(graph.output_names, self.expected, got):
            # a pass may change float rounding (a fused op rounds once where the chain rounded at each step):
            # a few units in the last place of the output's own dtype, which float16 makes about 1e-3
            ulps = 4 * machine_epsilon(want.dtype) if is_float(want.dtype) else 0.0
            rtol, atol = max(1e-4, ulps), max(1e-5, ulps)
            if want.shape != have.shape or not np.allclose(have, want, rtol=rtol, atol=atol, equal_nan=True):
                raise CheckError(f"pass {pass_name} changed the value of output {name}")
