"""simplify: dead-code elimination, common-subexpression elimination, constant folding (capped so
weights are not duplicated), cancelling transpose/reshape/cast pairs, dropping identity operations
and folding explicit broadcasts into the elementwise ops that broadcast anyway.

The algebraic rewrites are rules of the shared engine (rewrite.py); folding, CSE and DCE are single
sweeps. Each pass visits the graph and every function body and reports what it did, by name and
file:line, for the pass report and the IR dumps.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ..core import COMMUTATIVE, ELEMENTWISE, has_trait
from ..dims import symbolic_names
from ..errors import QtraceError
from ..ir import Graph, Node, Value
from ..weights import is_deferred
from .manager import register_pass
from .pattern import Match
from .rewrite import RuleSet, graphs_of, label_of, on_every_graph, remove_dead, rewrite, trait

FOLD_LIMIT_BYTES = 1 << 16  # fold results up to this size, or larger ones that free as many bytes


# -- dead code ------------------------------------------------------------------------------------------


def eliminate_dead_code(graph: Graph) -> int:
    """Remove nodes and constants no output depends on (one reverse walk from the outputs); returns
    how many it removed."""
    live: set[Any] = set()
    stack: list[Value] = list(graph.outputs)
    while stack:
        value = stack.pop()
        if value in live:
            continue
        live.add(value)
        if value.producer is not None and value.producer not in live:
            live.add(value.producer)
            stack.extend(value.producer.inputs)
    dead_nodes = [n for n in graph.nodes if n not in live]
    dead_constants = [c for c in graph.constants if c not in live]
    graph.remove_nodes(dead_nodes)
    for value in dead_constants:
        graph.remove_constant(value)
    return len(dead_nodes) + len(dead_constants)


def remove_uncalled_functions(graph: Graph) -> int:
    called = {n.params["function"].name for g in graphs_of(graph) for n in g.nodes if n.op == "call"}
    unused = [name for name in graph.functions if name not in called]
    for name in unused:
        graph.remove_function(name)
    return len(unused)


@register_pass("dce")
def dce(graph: Graph) -> Counter:
    changes = on_every_graph(eliminate_dead_code)(graph)
    removed = remove_uncalled_functions(graph)
    if removed:
        changes[label_of(remove_uncalled_functions)] += removed
    return changes


# -- common subexpressions ------------------------------------------------------------------------------


def _hashable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return (value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


_SMALL_CONSTANT = 1 << 12


def eliminate_common_subexpressions(graph: Graph) -> int:
    """One topological sweep: equal small constants merge, then equal (op, params, inputs) nodes
    (operands of a commutative primitive in either order); returns how many it merged."""
    merged = 0
    constants: dict[Any, Value] = {}
    for value in list(graph.constants):
        if value.const.nbytes > _SMALL_CONSTANT or is_deferred(value.const):  # comparing would read it
            continue
        key = (value.const.dtype.str, value.const.shape, value.const.tobytes())
        first = constants.setdefault(key, value)
        if first is not value:
            graph.replace_all_uses(value, first)
            graph.remove_constant(value)
            merged += 1
    seen: dict[Any, Node] = {}
    for node in list(graph.nodes):
        if node not in graph:
            continue
        operands = [v.index for v in node.inputs]
        if has_trait(node.op, COMMUTATIVE):
            operands.sort()
        key = (node.op, tuple(operands), tuple(sorted((k, _hashable(v)) for k, v in node.params.items())))
        first = seen.setdefault(key, node)
        if first is node:
            continue
        for old, new in zip(node.outputs, first.outputs):
            graph.replace_all_uses(old, new)
        remove_dead(graph, [node])
        merged += 1
    return merged


cse = register_pass("cse")(on_every_graph(eliminate_common_subexpressions))


# -- algebraic rules ------------------------------------------------------------------------------------
RULES = RuleSet()


def _constant_value(value: Value) -> np.ndarray | None:
    return value.const if value.is_constant else None


def _is_filled_with(value: Value, number: float) -> bool:
    const = _constant_value(value)
    if const is not None:  # only small constants in memory: a weight is never neutral
        return 0 < const.size <= 64 and not is_deferred(const) and bool(np.all(const == number))
    node = value.producer
    return node is not None and node.op == "full" and node.params["fill_value"] == number


def _same_type(a: Value, b: Value) -> bool:
    return a.aval == b.aval


_RIGHT_IDENTITY = {"add": 0, "sub": 0, "mul": 1, "div": 1, "pow": 1}


@RULES.rule(*_RIGHT_IDENTITY)
def drop_neutral_operand(graph: Graph, node: Node, m: Match) -> Value | None:
    """x + 0, 0 + x, x - 0, x * 1, 1 * x, x / 1, x ** 1 -> x (when that keeps the output's type)."""
    out = node.outputs[0]
    x, y = node.inputs
    neutral = _RIGHT_IDENTITY[node.op]
    if _is_filled_with(y, neutral) and _same_type(x, out):
        return x
    if has_trait(node.op, COMMUTATIVE) and _is_filled_with(x, neutral) and _same_type(y, out):
        return y
    return None


@RULES.rule("cast", "reshape", "broadcast_to", "transpose", "squeeze", "expand_dims", "slice")
def drop_identity(graph: Graph, node: Node, m: Match) -> Value | None:
    """cast to the same dtype, reshape/broadcast to the same shape, identity perm, empty axes."""
    x, out = node.inputs[0], node.outputs[0]
    if node.op == "transpose":
        return x if list(node.params["perm"]) == list(range(x.ndim)) else None
    if node.op in ("squeeze", "expand_dims") and not node.params["axes"]:
        return x
    if node.op == "slice" and not all(step == 1 for _, _, step in node.params["slices"]):
        return None  # with unit steps, a slice that keeps every dim's size keeps every element in order
    return x if _same_type(x, out) else None


@RULES.rule("transpose")
def compose_transposes(graph: Graph, node: Node, m: Match) -> list[Value] | None:
    inner = node.inputs[0].producer
    if inner is None or inner.op != "transpose":
        return None
    outer_perm, inner_perm = node.params["perm"], inner.params["perm"]
    perm = tuple(inner_perm[p] for p in outer_perm)
    return graph.apply(node.primitive, inner.inputs[0], perm=perm, location=node.location, scope=node.scope)


@RULES.rule("reshape")
def compose_reshapes(graph: Graph, node: Node, m: Match) -> list[Value] | None:
    inner = node.inputs[0].producer
    if inner is None or inner.op not in ("reshape", "squeeze", "expand_dims"):
        return None
    return graph.apply(node.primitive, inner.inputs[0], shape=node.params["shape"], location=node.location,
                       scope=node.scope)


def _lossless(source: np.dtype, target: np.dtype) -> bool:
    return bool(np.can_cast(source, target, casting="safe"))


@RULES.rule("cast")
def compose_casts(graph: Graph, node: Node, m: Match) -> list[Value] | None:
    """cast(cast(x, wider), t) -> cast(x, t): the first cast lost nothing, so skipping it is exact."""
    inner = node.inputs[0].producer
    if inner is None or inner.op != "cast" or not _lossless(inner.inputs[0].dtype, inner.params["dtype"]):
        return None
    return graph.apply(node.primitive, inner.inputs[0], dtype=node.params["dtype"], location=node.location,
                       scope=node.scope)


@RULES.rule(trait(ELEMENTWISE))
def fold_broadcast_into_consumer(graph: Graph, node: Node, m: Match) -> list[Value] | None:
    """An elementwise op broadcasts by itself: feed it the un-broadcast operand when that keeps its type."""
    for port, value in enumerate(node.inputs):
        producer = value.producer
        if producer is None or producer.op != "broadcast_to":
            continue
        inputs = list(node.inputs)
        inputs[port] = producer.inputs[0]
        try:  # the primitive's own shape rule says whether the operands still broadcast to the output
            (aval,) = node.primitive.abstract_eval([v.aval for v in inputs], node.params)
        except QtraceError:
            continue
        if aval == node.outputs[0].aval:
            return graph.apply(node.primitive, *inputs, location=node.location, scope=node.scope, **node.params)
    return None


# -- constant folding -----------------------------------------------------------------------------------


def _has_symbolic_param(node: Node) -> bool:
    return any(symbolic_names(v) for v in node.params.values())


def _freed_bytes(graph: Graph, node: Node) -> int:
    """Bytes that folding `node` removes: the constants only it reads."""
    return sum(v.const.nbytes for v in set(node.inputs)
               if not graph.is_output(v) and all(user is node for user, _ in graph.consumers(v)))


def fold_constants(graph: Graph) -> int:
    """Evaluate nodes whose inputs are all constants (within the size cap); returns how many."""
    folded_nodes = 0
    for node in list(graph.nodes):
        if node not in graph or node.op == "call" or _has_symbolic_param(node):
            continue
        if not all(v.is_constant for v in node.inputs):
            continue
        if any(is_deferred(v.const) for v in node.inputs):
            continue  # a checkpoint tensor (maybe still to convert) is read only when the model is saved
        if not all(isinstance(d, int) for v in node.outputs for d in v.shape):
            continue
        out_bytes = sum(int(np.prod(v.shape, dtype=np.int64)) * v.dtype.itemsize for v in node.outputs)
        if out_bytes > FOLD_LIMIT_BYTES and out_bytes > _freed_bytes(graph, node):
            continue  # folding would grow the model: a weight and its copy, or a fill made an array
        results = node.primitive.impl(*[v.const for v in node.inputs], **node.params)
        results = results if node.primitive.multiple_results else [results]
        for out, result in zip(node.outputs, results):
            # reshape: np.ascontiguousarray makes a 0-d result 1-d, and the rank must not change
            array = np.ascontiguousarray(np.asarray(result, dtype=out.dtype)).reshape(out.shape)
            # A transformed weight keeps the weight's name (lm_head.transpose); lowering keeps names unique.
            source = node.inputs[0].name if len(node.inputs) == 1 else out.name
            folded = graph.add_constant(array, f"{source}.{node.op}")
            graph.replace_all_uses(out, folded)
        remove_dead(graph, [node])
        folded_nodes += 1
    return folded_nodes


def canonicalize_graph(graph: Graph) -> Counter:
    return rewrite(graph, RULES)


fold = register_pass("fold")(on_every_graph(fold_constants))
canonicalize = register_pass("canonicalize")(on_every_graph(canonicalize_graph))


@register_pass("simplify")
def simplify(graph: Graph) -> Counter:
    """canonicalize, fold, cse and dce until nothing changes (at most a few rounds)."""
    changes: Counter = Counter()
    for _ in range(8):
        changed = canonicalize(graph) + fold(graph) + cse(graph) + dce(graph)
        changes.update(changed)
        if not changed:
            break
    return changes
