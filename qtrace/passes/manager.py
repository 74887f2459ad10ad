"""Passes and the pipeline that runs them (design.md §4)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import CheckError
from ..ir import Graph

Pass = Callable[[Graph], bool]  # edits the graph in place; returns whether it changed anything
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


@dataclass
class PassReport:
    records: list[PassRecord] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join(f"{i + 1:02d} {r.name:<16} nodes {r.nodes_before:>6} -> {r.nodes_after:<6} "
                         f"{r.seconds * 1000:9.1f} ms{'' if r.changed else '  (no change)'}"
                         for i, r in enumerate(self.records))


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
        _dump(graph, dump_dir, 0, "trace")
    probe = _DebugProbe(graph) if debug else None
    for i, name in enumerate(names, start=1):
        before = count_nodes(graph)
        start = time.perf_counter()
        changed = bool(PASSES[name](graph))
        report.records.append(PassRecord(name, before, count_nodes(graph), time.perf_counter() - start, changed))
        if probe is not None:
            probe.check(graph, name)
        if dump_dir:
            _dump(graph, dump_dir, i, name)
    if dump_dir:
        with open(os.path.join(dump_dir, "summary.txt"), "w") as f:
            f.write(report.summary() + "\n")
    return report


def _dump(graph: Graph, directory: str, index: int, name: str) -> None:
    base = os.path.join(directory, f"{index:02d}-{name}")
    with open(base + ".ir", "w") as f:
        f.write(str(graph))
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
            if want.shape != have.shape or not np.allclose(have, want, rtol=1e-4, atol=1e-5, equal_nan=True):
                raise CheckError(f"pass {pass_name} changed the value of output {name}")
