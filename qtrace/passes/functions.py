"""Function hygiene for @qtrace.function bodies.

- merge_functions: bodies that are structurally identical (same inputs, operations, parameters and
  constants, up to value names) become one; their calls share it.
- hoist_invariants: work inside a body that does not depend on the per-call inputs — it reads only
  constants and inputs that every call passes the same value for (a RoPE table, a mask built from
  position_ids) — moves to the caller, is computed once, and enters the body as a new parameter.
  Parameters nothing reads any more are dropped, except one that alone gives the body a symbolic size.
- check_function_bodies: what the Cloud AI 100 compiler rejects inside a function (a Range or a
  constant fill whose size is symbolic, an Expand to a symbolic size the input does not carry) is
  reported with the user's line, after hoisting has moved whatever it could.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from ..dims import Dim, symbolic_names
from ..errors import CheckError
from ..ir import Function, Graph, Node, Value
from .manager import register_pass
from .rewrite import graphs_of, label_of
from .simplify import _hashable, eliminate_dead_code


# -- merging --------------------------------------------------------------------------------------------


def structural_key(body: Graph, canonical: dict[int, str]) -> str:
    """A digest of a body that ignores value names (`canonical` maps already-merged callees)."""
    numbering: dict[Value, int] = {}
    digest = hashlib.sha256()
    for value in body.inputs:
        numbering[value] = len(numbering)
        digest.update(repr(("in", str(value.aval))).encode())
    for value in body.constants:
        numbering[value] = len(numbering)
        digest.update(repr(("const", str(value.aval))).encode())
        digest.update(value.const.tobytes())
    for node in body.nodes:
        params = {k: canonical.get(id(v), v.name) if isinstance(v, Function) else _hashable(v)
                  for k, v in node.params.items()}
        digest.update(repr((node.op, sorted(params.items()), [numbering[v] for v in node.inputs])).encode())
        for out in node.outputs:
            numbering[out] = len(numbering)
    digest.update(repr(("out", [numbering[v] for v in body.outputs], body.output_names)).encode())
    return digest.hexdigest()


def merge_functions(graph: Graph) -> int:
    """Merge structurally identical bodies; returns how many functions merged into another."""
    canonical: dict[int, str] = {}  # id(Function) -> name of the function it merges into
    first_by_key: dict[str, Function] = {}
    for function in list(graph.functions.values()):  # callees come first
        key = structural_key(function.body, canonical)
        first = first_by_key.setdefault(key, function)
        canonical[id(function)] = first.name
    replacements = {fid: graph.functions[name] for fid, name in canonical.items()}
    for g in graphs_of(graph):
        for node in g.nodes:
            if node.op == "call":
                target = replacements[id(node.params["function"])]
                if target is not node.params["function"]:
                    g.set_param(node, "function", target)
    merged = [n for n, f in graph.functions.items() if canonical[id(f)] != n]
    for name in merged:
        graph.remove_function(name)
    return len(merged)


# -- hoisting -------------------------------------------------------------------------------------------


def _rebuild_call(graph: Graph, call: Node, inputs: list[Value]) -> None:
    """Replace a call node by one with new inputs (same function, same outputs)."""
    new = graph.add_node(call.primitive, inputs, call.params, [v.aval for v in call.outputs], call.location,
                         call.scope, out_names=[v.name for v in call.outputs])
    for old, out in zip(call.outputs, new.outputs):
        graph.replace_all_uses(old, out)
    graph.remove_node(call)


def _hoistable_nodes(body: Graph, invariant: set[Value]) -> list[Node]:
    known = set(invariant) | set(body.constants)
    hoisted = []
    for node in body.nodes:
        if node.op != "call" and all(v in known for v in node.inputs):
            hoisted.append(node)
            known.update(node.outputs)
    return hoisted


def hoist_invariants(graph: Graph) -> int:
    """Move call-invariant work out of function bodies; returns how many body nodes moved."""
    moved = 0
    for function in list(graph.functions.values()):
        body = function.body
        calls = [n for n in graph.nodes if n.op == "call" and n.params["function"] is function]
        nested = any(n.op == "call" and n.params["function"] is function
                     for f in graph.functions.values() for n in f.body.nodes)
        if len(calls) < 2 or nested:  # with one call, everything is computed once already
            continue
        eliminate_dead_code(body)  # dead code must not keep hoisted values (and their parameters) alive
        invariant = {v for i, v in enumerate(body.inputs) if all(c.inputs[i] is calls[0].inputs[i] for c in calls)}
        hoisted = _hoistable_nodes(body, invariant)
        if not hoisted:
            continue
        hoisted_set = set(hoisted)
        produced = {out for node in hoisted for out in node.outputs}
        frontier = [v for v in sorted(produced, key=lambda v: v.index)
                    if v in body.outputs or any(n not in hoisted_set for n, _ in body.consumers(v))]
        # Recreate the hoisted computation once in the caller, before the first call.
        outer: dict[Value, Value] = {v: calls[0].inputs[i] for i, v in enumerate(body.inputs) if v in invariant}
        for node in hoisted:
            for value in node.inputs:
                if value.is_constant and value not in outer:
                    outer[value] = graph.add_constant(value.const, value.name)  # lowering keeps names unique
            copy = graph.add_node(node.primitive, [outer[v] for v in node.inputs], node.params,
                                  [v.aval for v in node.outputs], node.location, calls[0].scope)
            outer.update(zip(node.outputs, copy.outputs))
        # The body reads the hoisted results as new parameters; each call passes what it read before
        # for the parameters that stay, and the caller's copies for the new ones.
        parameters, hoisted_arguments = list(body.inputs), {}
        for value in frontier:
            param = body.add_input(f"{value.name.replace('/', '.')}.hoisted", value.aval)
            body.replace_all_uses(value, param)
            hoisted_arguments[param] = outer[value]
        eliminate_dead_code(body)
        unused = {v for v in body.inputs if not body.is_used(v)}
        for value in sorted(unused - _sole_dim_carriers(body, unused), key=lambda v: v.index):
            body.remove_input(value)
        for call in calls:  # read its inputs now: rebuilding an earlier call may have renewed them
            by_param = {**dict(zip(parameters, call.inputs)), **hoisted_arguments}
            _rebuild_call(graph, call, [by_param[v] for v in body.inputs])
        moved += len(hoisted)
    return moved


def _single_dim_names(value: Value) -> set[str]:
    """Names of the symbolic dims `value` carries on their own (those a body reads sizes from)."""
    return {d.single_name for d in value.shape if isinstance(d, Dim) and d.single_name is not None}


def _sole_dim_carriers(body: Graph, unused: set[Value]) -> set[Value]:
    """Unused parameters to keep: the only ones giving the size of a symbolic dim a body parameter
    (a reshape's shape, an arange's bounds) still needs."""
    needed = {n for node in body.nodes for param in node.params.values() for n in symbolic_names(param)}
    carried = {n for v in body.inputs if v not in unused for n in _single_dim_names(v)}
    keep = set()
    for value in sorted(unused, key=lambda v: v.index):
        missing = (_single_dim_names(value) & needed) - carried
        if missing:
            keep.add(value)
            carried |= missing
    return keep


# -- what the compiler rejects inside functions ---------------------------------------------------------


def _needs_runtime_size(node: Node) -> bool:
    if node.op in ("arange", "full"):
        return any(symbolic_names(v) for v in node.params.values())
    if node.op == "broadcast_to":
        source, target = node.inputs[0].shape, node.params["shape"]
        offset = len(target) - len(source)
        return any(isinstance(d, Dim) and (i < offset or source[i - offset] != d) for i, d in enumerate(target))
    return False


def check_function_bodies(graph: Graph) -> None:
    for function in graph.functions.values():
        for node in function.body.nodes:
            if _needs_runtime_size(node):
                raise CheckError(
                    f"inside @qtrace.function {function.name}: the size of this {node.op} is symbolic and "
                    "depends on per-call arguments; the Cloud AI 100 compiler rejects a Range/Expand with "
                    "non-constant bounds in a function. Compute it outside and pass it in as an argument.",
                    op=node.op, location=node.location)


@register_pass("functions")
def function_hygiene(graph: Graph) -> Counter:
    changes: Counter = Counter()
    if not graph.functions:
        return changes
    for transform in (merge_functions, hoist_invariants):
        count = transform(graph)
        if count:
            changes[label_of(transform)] += int(count)
    check_function_bodies(graph)
    return changes
