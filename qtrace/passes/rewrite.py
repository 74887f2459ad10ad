"""The rewrite engine every transforming pass uses (in the manner of tinygrad's graph_rewrite).

A `Rule` is anchored on root primitive names and holds a function `fn(graph, node)` that returns
the replacement value(s) for the node's outputs, or None for "no match". Rule sets compose with `+`.
`rewrite` applies them over a worklist until nothing fires (with a guard against loops), removes
what becomes dead, and counts which rule fired how often (each rule remembers where it was defined).
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from ..errors import CheckError
from ..ir import Graph, Node, Value

RuleFn = Callable[[Graph, Node], "Value | Sequence[Value] | None"]


@dataclass(frozen=True)
class Rule:
    name: str
    roots: tuple[str, ...]
    fn: RuleFn
    defined_at: str = ""


@dataclass
class RuleSet:
    rules: list[Rule] = field(default_factory=list)

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(self.rules + other.rules)

    def by_root(self) -> dict[str, list[Rule]]:
        table: dict[str, list[Rule]] = collections.defaultdict(list)
        for rule in self.rules:
            for root in rule.roots:
                table[root].append(rule)
        return table

    def rule(self, *roots: str, name: str | None = None) -> Callable[[RuleFn], RuleFn]:
        """Decorator: register `fn(graph, node)` as a rule anchored on the given primitives."""

        def register(fn: RuleFn) -> RuleFn:
            caller = sys._getframe(1)
            where = f"{caller.f_code.co_filename.rsplit('/', 1)[-1]}:{fn.__code__.co_firstlineno}"
            self.rules.append(Rule(name or fn.__name__, roots, fn, where))
            return fn

        return register


def remove_dead(graph: Graph, nodes: Iterable[Node]) -> None:
    """Remove these nodes if nothing uses their outputs, then their producers in turn."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in graph.nx:
            continue
        if any(graph.nx.out_degree(v) or graph.is_output(v) for v in node.outputs):
            continue
        producers = [v.producer for v in node.inputs if v.producer is not None]
        constants = [v for v in node.inputs if v.is_constant]
        graph.remove_node(node)
        stack.extend(producers)
        for value in constants:
            if value in graph.nx and graph.nx.out_degree(value) == 0 and not graph.is_output(value):
                graph.remove_constant(value)


def rewrite(graph: Graph, rules: RuleSet, *, max_steps: int | None = None) -> collections.Counter:
    """Apply rules to a fixed point; returns how often each rule fired."""
    table = rules.by_root()
    fired: collections.Counter = collections.Counter()
    worklist = collections.deque(graph.nodes)
    queued = set(worklist)
    budget = max_steps if max_steps is not None else 20 * (len(worklist) + 10)
    while worklist:
        node = worklist.popleft()
        queued.discard(node)
        if node not in graph.nx:
            continue
        for rule in table.get(node.op, ()):
            result = rule.fn(graph, node)
            if result is None:
                continue
            budget -= 1
            if budget < 0:
                raise CheckError(f"rewriting did not converge: rule {rule.name} ({rule.defined_at}) keeps firing")
            fired[f"{rule.name} ({rule.defined_at})"] += 1
            replacements = [result] if isinstance(result, Value) else list(result)
            touched: list[Node] = []
            for old, new in zip(node.outputs, replacements):
                if old is new:
                    continue
                graph.replace_all_uses(old, new)
                touched.extend(n for n, _ in graph.consumers(new))
                if new.producer is not None:
                    touched.append(new.producer)
            remove_dead(graph, [node])
            for other in touched:
                if other in graph.nx and other not in queued:
                    worklist.append(other)
                    queued.add(other)
            break
    return fired


def on_every_graph(transform: Callable[[Graph], bool]) -> Callable[[Graph], bool]:
    """A pass that applies `transform` to the graph and to every function body."""
    def run(graph: Graph) -> bool:
        return any([transform(g) for g in graphs_of(graph)])  # a list: visit them all

    run.__name__ = run.__qualname__ = transform.__name__
    return run


def graphs_of(graph: Graph) -> list[Graph]:
    """The graph and every function body (a model-wide pass visits them all)."""
    return [graph] + [f.body for f in graph.functions.values()]
