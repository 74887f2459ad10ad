"""The rewrite engine every rewriting pass uses (in the manner of tinygrad's graph_rewrite).

Three concepts (docs/architecture.md, "The rewrite engine"):

- a `Rule`: where it applies (a pattern, see pattern.py, or just the names of root primitives), and
  a function `fn(graph, root, match) -> replacement value(s) | None` that builds the replacement or
  declines ("None": a constraint the pattern cannot express failed). A rule remembers the file:line
  where its function was written, which is how reports and dumps name it.
- a `RuleSet`: rules registered with the `@rules.rule(...)` decorator; sets compose with `+`.
- `rewrite(graph, rules)`: applies the rules to a fixed point and returns how often each fired.

Overlapping rules are ordered, never left to visiting order: in every round all matches are found
first, then applied by rank, highest first: the declared `priority`, then the pattern's size
(largest match first), then definition order; a match that an earlier rewrite invalidated is
re-checked before it is applied. Rewrites run in rounds until nothing fires, with a budget that
turns a pair of rules undoing each other into an error instead of a hang.
"""

from __future__ import annotations

import collections
import functools
import heapq
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from ..core import primitives_with
from ..errors import CheckError
from ..ir import Graph, Node, Value
from .pattern import Match, Pat

RuleFn = Callable[[Graph, Node, Match], "Value | Sequence[Value] | None"]


@dataclass(frozen=True)
class Rule:
    """One way to rewrite a node; see the module docstring."""

    name: str
    roots: tuple[str, ...]  # primitive names, or "trait:<name>" for every primitive with that trait
    fn: RuleFn
    defined_at: str  # "file.py:line" of fn
    pattern: Pat | None = None
    priority: int = 0
    order: int = 0  # definition order within its RuleSet: the last tie-breaker

    @property
    def label(self) -> str:
        """How reports name the rule: `fuse_rms_norm (fuse.py:97)`."""
        return f"{self.name} ({self.defined_at})"

    @functools.cached_property
    def op_depths(self) -> dict[str, frozenset[int]]:
        """Where each primitive of the pattern sits, in levels above the root."""
        return self.pattern.op_depths() if self.pattern is not None else {}

    def may_match_after(self, changes: set[tuple[str, int]] | None) -> bool:
        """Could a change near the root make this rule match where it did not? `changes` holds
        ("*", d) for a changed value d levels up (its producer: 0, its readers: 1), and (op, d) for a
        new node of primitive `op` d levels up; None means "anything may have changed"."""
        return changes is None or any(op == "*" or depth in self.op_depths.get(op, ()) for op, depth in changes)

    @functools.cached_property
    def rank(self) -> tuple[int, int, int]:
        """Sort key, smallest first: higher priority, then larger pattern, then earlier definition."""
        return (-self.priority, -(self.pattern.size if self.pattern is not None else 1), self.order)

    def match(self, graph: Graph, node: Node) -> Match | None:
        if self.pattern is None:
            match = Match()
            match.nodes = [node]
            return match
        return self.pattern.match(graph, node)


def trait(name: str) -> str:
    """A root for rules that apply to every primitive with this trait: `@rules.rule(trait("elementwise"))`."""
    return f"trait:{name}"


def _where(fn: Callable) -> str:
    code = fn.__code__
    return f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}"


def label_of(fn: Callable) -> str:
    """How reports name a transform that is not a rule: `eliminate_dead_code (simplify.py:25)`."""
    return f"{fn.__name__} ({_where(fn)})"


@dataclass
class RuleSet:
    rules: list[Rule] = field(default_factory=list)

    def __add__(self, other: "RuleSet") -> "RuleSet":
        return RuleSet(self.rules + other.rules)

    def rule(self, *anchors: str | Pat, name: str | None = None, priority: int = 0) -> Callable[[RuleFn], RuleFn]:
        """Decorator: `fn(graph, root, match)` becomes one rule per anchor. An anchor is a pattern
        (the rule applies where it matches; its root primitive anchors it) or a primitive name /
        `trait(...)` (the rule sees every such node; `match` then holds no bindings)."""
        patterns = [a for a in anchors if isinstance(a, Pat)]
        names = tuple(a for a in anchors if isinstance(a, str))
        if not anchors or (patterns and names) or any(p.is_var for p in patterns):
            raise TypeError("RuleSet.rule takes patterns rooted at a primitive, or primitive names (not both)")

        def register(fn: RuleFn) -> RuleFn:
            label, where = name or fn.__name__, _where(fn)
            if names:
                self.rules.append(Rule(label, names, fn, where, None, priority, len(self.rules)))
            for pattern in patterns:
                self.rules.append(Rule(label, (pattern.op,), fn, where, pattern, priority, len(self.rules)))
            return fn

        return register

    def by_root(self) -> dict[str, list[Rule]]:
        """Rules per root primitive name, best rank first (traits resolved against the registry now)."""
        table: dict[str, list[Rule]] = collections.defaultdict(list)
        for rule in self.rules:
            for root in rule.roots:
                ops = primitives_with(root[len("trait:"):]) if root.startswith("trait:") else (root,)
                for op in ops:
                    table[op].append(rule)
        for rules in table.values():
            rules.sort(key=lambda r: r.rank)
        return table

    def depth_of(self, op: str) -> int:
        """How far above a root any rule's pattern holds `op` (0 when none does)."""
        return max((max(r.op_depths.get(op, (0,))) for r in self.rules), default=0)


def remove_dead(graph: Graph, nodes: Iterable[Node]) -> None:
    """Remove these nodes if nothing uses their outputs, then their producers in turn."""
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in graph or any(graph.is_used(v) for v in node.outputs):
            continue
        producers = [v.producer for v in node.inputs if v.producer is not None]
        constants = [v for v in node.inputs if v.is_constant]
        graph.remove_node(node)
        stack.extend(producers)
        for value in constants:
            if value in graph and not graph.is_used(value):
                graph.remove_constant(value)


def _affected(graph: Graph, rules: RuleSet, new_values: Iterable[Value]) -> dict[Node, set[tuple[str, int]]]:
    """Where a rule may now match that did not: the producers of the new values and their readers
    (any rule), and the nodes further below a new node as far as some pattern holds its primitive."""
    changes: dict[Node, set[tuple[str, int]]] = collections.defaultdict(set)
    depth_of: dict[str, int] = {}
    for value in new_values:
        if value not in graph:
            continue
        producer = value.producer
        if producer is not None:
            changes[producer].add(("*", 0))
        op = producer.op if producer is not None else ""
        if op not in depth_of:
            depth_of[op] = rules.depth_of(op) if op else 0
        frontier = [value]
        for distance in range(1, max(1, depth_of[op]) + 1):
            next_frontier = []
            for v in frontier:
                for node, _ in graph.consumers(v):
                    changes[node].add(("*", 1) if distance == 1 else (op, distance))
                    next_frontier.extend(node.outputs)
            frontier = next_frontier
    return changes


def _next_match(graph: Graph, node: Node, rules: list[Rule], start: int,
                changes: set[tuple[str, int]] | None) -> tuple[int, Match] | None:
    """The first of `rules[start:]` (best rank first) that may newly match at `node` and does."""
    for i in range(start, len(rules)):
        if not rules[i].may_match_after(changes):
            continue
        match = rules[i].match(graph, node)
        if match is not None:
            return i, match
    return None


def rewrite(graph: Graph, rules: RuleSet, *, max_steps: int | None = None) -> collections.Counter:
    """Apply rules to a fixed point; returns how often each rule fired, by `Rule.label`."""
    table = rules.by_root()
    fired: collections.Counter = collections.Counter()
    budget = max_steps if max_steps is not None else 20 * (len(graph.nodes) + 10)
    pending: list[tuple[Node, set | None]] = [(node, None) for node in graph.nodes]  # (node, changes near it)
    while pending:
        # All matches first (the best-ranked rule at each node), then apply them best rank first.
        queue = []
        for position, (node, near) in enumerate(pending):
            found = _next_match(graph, node, table.get(node.op, []), 0, near)
            if found is not None:
                i, match = found
                queue.append((table[node.op][i].rank, position, i, match))
        heapq.heapify(queue)
        new_values: list[Value] = []
        with graph.track_changes() as changed:
            while queue:
                _, position, i, match = heapq.heappop(queue)
                node, near = pending[position]
                if node not in graph:
                    continue
                candidates = table[node.op]
                if node in changed or any(n in changed for n in match.nodes):
                    match = candidates[i].match(graph, node)  # an earlier rewrite touched it: check again
                result = None if match is None else candidates[i].fn(graph, node, match)
                if result is None:  # declined: the next rule that matches here takes its place in the queue
                    found = _next_match(graph, node, candidates, i + 1, near)
                    if found is not None:
                        heapq.heappush(queue, (candidates[found[0]].rank, position, found[0], found[1]))
                    continue
                rule = candidates[i]
                budget -= 1
                if budget < 0:
                    raise CheckError(f"rewriting did not converge: rule {rule.label} keeps firing "
                                     f"(rules fired so far: {dict(fired.most_common(4))})")
                fired[rule.label] += 1
                for old, new in zip(node.outputs, [result] if isinstance(result, Value) else list(result)):
                    if old is not new:
                        graph.replace_all_uses(old, new)
                        new_values.append(new)
                remove_dead(graph, [node])
        # Next round: where the rewrites may have made a rule match (see _affected).
        affected = _affected(graph, rules, new_values)
        pending = [(n, affected[n]) for n in graph.nodes if n in affected] if affected else []
    return fired


def on_every_graph(transform: Callable[[Graph], object]) -> Callable[[Graph], collections.Counter]:
    """A pass that applies `transform` to the graph and to every function body; what it reports
    (a Counter of what fired, or a bool) is summed over them."""
    label = label_of(transform)

    def run(graph: Graph) -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for g in graphs_of(graph):
            result = transform(g)
            if isinstance(result, collections.Counter):
                total.update(result)
            elif result:  # a count of changes (True counts as one)
                total[label] += int(result)
        return total

    run.__name__ = run.__qualname__ = transform.__name__
    return run


def graphs_of(graph: Graph) -> list[Graph]:
    """The graph and every function body (a model-wide pass visits them all)."""
    return [graph] + [f.body for f in graph.functions.values()]
