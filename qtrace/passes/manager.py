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


def register_pass(name: str, **_: object) -> Callable[[Pass], Pass]:
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
    for i, name in enumerate(names, start=1):
        before = count_nodes(graph)
        start = time.perf_counter()
        changed = bool(PASSES[name](graph))
        report.records.append(PassRecord(name, before, count_nodes(graph), time.perf_counter() - start, changed))
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
