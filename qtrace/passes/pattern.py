"""Patterns as data: a tiny graph of primitive names with constraints, matched with networkx.

    x, eps, w = Var("x"), Var("eps", scalar_constant), Var("w")
    mean_square = Pat("reduce_mean", Pat("mul", x, x), axes=last_axis, keepdims=True)
    pattern = Pat("mul", Pat("mul", x, Pat("rsqrt", Pat("add", mean_square, eps))), w)

A `Pat` names a primitive, its operand patterns and constraints on its parameters (a value, or a
predicate `(param, node) -> bool`); a `Var` is a leaf that matches any value (optionally one passing
a predicate), and a Var used twice must bind the same value. A pattern becomes a rewrite rule with
`RuleSet.rule(pattern, ...)` (rewrite.py); its `size` (the number of operations it spans) orders
overlapping rules, largest first.

Matching is anchored: only nodes whose primitive is the pattern's root are tried, a cheap check of
the operator tree rejects most of them, the candidate region is the bounded upstream neighbourhood
of the node, and networkx's MultiDiGraphMatcher finds the embedding. Operands of primitives with
the `commutative` trait match in either order. Matching is a monomorphism (injective), so two
different Vars never bind the same value: spell a pattern with one Var where it may be one value.
A match whose intermediate values are used outside the pattern (or are graph outputs) is rejected,
since replacing it would not remove them.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import networkx as nx
from networkx.algorithms.isomorphism import MultiDiGraphMatcher

from ..core import COMMUTATIVE, has_trait
from ..ir import Graph, Node, Value

_ids = itertools.count()


def operand_port(op: str, port: int) -> int:
    """The port an operand edge is compared by: operands of commutative primitives are interchangeable."""
    return 0 if has_trait(op, COMMUTATIVE) else port


class Match(dict):
    """Bindings by name (Vars -> values, named Pats -> nodes) plus the matched nodes."""

    nodes: list[Node]


class Pat:
    """Matches a node of primitive `op` whose operands match `operands` and params match `params`;
    `name` binds the node, `port` says which of its outputs the pattern stands for."""

    def __init__(self, op: str, *operands: "Pat", name: str | None = None, port: int = 0, **params: Any):
        self.op = op
        self.operands = operands
        self.name = name
        self.port = port
        self.params = params
        self.predicate: Callable[[Value], bool] | None = None
        self.id = next(_ids)
        self._compiled: _Compiled | None = None

    @property
    def is_var(self) -> bool:
        return self.op == ""

    @property
    def depth(self) -> int:
        """Operations on the longest path from the root down to a leaf."""
        if self.is_var:
            return 0
        return 1 + max((o.depth for o in self.operands), default=0)

    @property
    def size(self) -> int:
        """How many distinct operations the pattern spans (what "largest match first" compares)."""
        seen: set[int] = set()
        stack = [self]
        while stack:
            pat = stack.pop()
            if not pat.is_var and pat.id not in seen:
                seen.add(pat.id)
                stack.extend(pat.operands)
        return len(seen)

    def op_depths(self) -> dict[str, frozenset[int]]:
        """For each primitive in the pattern, how many levels above the root it sits (root: 0)."""
        depths: dict[str, set[int]] = {}
        stack = [(self, 0)]
        while stack:
            pat, depth = stack.pop()
            if not pat.is_var:
                depths.setdefault(pat.op, set()).add(depth)
                stack.extend((operand, depth + 1) for operand in pat.operands)
        return {op: frozenset(ds) for op, ds in depths.items()}

    def match(self, graph: Graph, node: Node) -> Match | None:
        """The bindings if the pattern matches with its root at `node`, else None."""
        if not _plausible(self, node, 3):  # cheap: the operator tree, three levels deep
            return None
        # Compiled on the first plausible root: every primitive's traits are known by then, and a
        # process never pays for the patterns its graphs cannot match.
        if self._compiled is None:
            self._compiled = _Compiled(self)
        return self._compiled.match(graph, node)


def Var(name: str, predicate: Callable[[Value], bool] | None = None) -> Pat:  # noqa: N802  (reads as a type)
    """A pattern leaf: any value (passing `predicate(value)` if given), bound under `name`."""
    var = Pat("", name=name)
    var.predicate = predicate
    return var


def _plausible(pat: Pat, node: Node, depth: int) -> bool:
    """Could `node` root `pat`? Compares primitive names (and operand counts) `depth` levels down,
    each operand pattern against any operand: necessary for a match, not sufficient."""
    if node.op != pat.op or len(node.inputs) != len(pat.operands):
        return False
    if depth == 0:
        return True
    producers = [v.producer for v in node.inputs if v.producer is not None]
    return all(any(_plausible(operand, p, depth - 1) for p in producers)
               for operand in pat.operands if not operand.is_var)


class _Compiled:
    """A pattern as a networkx MultiDiGraph, built once and matched many times."""

    def __init__(self, root: Pat):
        self.root = root
        self.graph = nx.MultiDiGraph()
        self.depth = root.depth
        self._add(root)
        self.root_key = ("op", root.id)
        self.graph.nodes[self.root_key]["root"] = True  # anchors the match: only the tried node maps here

    def _add(self, pat: Pat) -> Any:
        if pat.is_var:
            key = ("var", pat.name)
            self.graph.add_node(key, kind="var", pat=pat)
            return key
        op_key, value_key = ("op", pat.id), ("value", pat.id)
        if op_key in self.graph:  # a sub-pattern used twice stands for one node
            return value_key
        self.graph.add_node(op_key, kind="op", pat=pat)
        self.graph.add_node(value_key, kind="value", pat=pat)
        self.graph.add_edge(op_key, value_key, port=pat.port)
        for port, operand in enumerate(pat.operands):
            self.graph.add_edge(self._add(operand), op_key, port=operand_port(pat.op, port))
        return value_key

    def _region(self, node: Node) -> nx.MultiDiGraph:
        """The upstream neighbourhood of `node` deep enough to hold the pattern, with ports."""
        region = nx.MultiDiGraph()
        frontier, seen = [node], {node}
        region.add_node(node, obj=node, root=True)
        for _ in range(self.depth):
            next_frontier = []
            for op_node in frontier:
                for out in op_node.outputs:
                    region.add_node(out, obj=out)
                    region.add_edge(op_node, out, port=out.port)
                for port, value in enumerate(op_node.inputs):
                    region.add_node(value, obj=value)
                    region.add_edge(value, op_node, port=operand_port(op_node.op, port))
                    producer = value.producer
                    if producer is not None and producer not in seen:
                        seen.add(producer)
                        region.add_node(producer, obj=producer)
                        next_frontier.append(producer)
            frontier = next_frontier
        for op_node in frontier:  # the last ring's outputs, so their value nodes exist
            for out in op_node.outputs:
                region.add_node(out, obj=out)
                region.add_edge(op_node, out, port=out.port)
        return region

    @staticmethod
    def _node_match(region_attrs: dict, pattern_attrs: dict) -> bool:
        obj, pat, kind = region_attrs["obj"], pattern_attrs["pat"], pattern_attrs["kind"]
        if region_attrs.get("root", False) != pattern_attrs.get("root", False):
            return False
        if kind == "op":
            if not isinstance(obj, Node) or obj.op != pat.op:
                return False
            for key, want in pat.params.items():
                have = obj.params.get(key)
                if callable(want) and not isinstance(want, type):
                    if not want(have, obj):
                        return False
                elif have != want:
                    return False
            return True
        if not isinstance(obj, Value):
            return False
        if kind == "var":
            return pat.predicate is None or bool(pat.predicate(obj))
        return True

    @staticmethod
    def _edge_match(region_edges: dict, pattern_edges: dict) -> bool:
        return sorted(e["port"] for e in region_edges.values()) == sorted(e["port"] for e in pattern_edges.values())

    def match(self, graph: Graph, node: Node) -> Match | None:
        matcher = MultiDiGraphMatcher(self._region(node), self.graph, node_match=self._node_match,
                                      edge_match=self._edge_match)
        for mapping in matcher.subgraph_monomorphisms_iter():
            if mapping.get(node) != self.root_key:
                continue
            result = self._bind(graph, mapping)
            if result is not None:
                return result
        return None

    def _bind(self, graph: Graph, mapping: dict) -> Match | None:
        result = Match()
        result.nodes = []
        for region_obj, key in mapping.items():
            attrs = self.graph.nodes[key]
            pat = attrs["pat"]
            if attrs["kind"] == "var":
                result[pat.name] = region_obj
            elif attrs["kind"] == "op":
                result.nodes.append(region_obj)
                if pat.name:
                    result[pat.name] = region_obj
            elif attrs["kind"] == "value" and key != ("value", self.root.id):
                # an intermediate: every use must be inside the pattern
                if graph.is_output(region_obj) or graph.use_count(region_obj) != self.graph.out_degree(key):
                    return None
        result.nodes.sort(key=lambda n: n.index)
        return result


__all__ = ["Pat", "Var", "Match", "operand_port"]
