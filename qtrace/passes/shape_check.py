"""shape_check: re-derive every value's shape and dtype from the primitive rules and check the
graph's invariants, for traced graphs and for graphs built or edited by hand.

The first problem found is reported with the node's source line and a few equations of context.
"""

from __future__ import annotations

from ..errors import CheckError, QtraceError
from ..ir import Graph, Node, Value
from .manager import register_pass


def _context(graph: Graph, node: Node, radius: int = 2) -> str:
    from ..printer import _equation

    order = graph.nodes
    i = order.index(node)
    lines = []
    for j in range(max(0, i - radius), min(len(order), i + radius + 1)):
        marker = ">>" if j == i else "  "
        lines.append(marker + _equation(graph, order[j]))
    return "\n".join(lines)


def _fail(graph: Graph, node: Node, message: str) -> CheckError:
    return CheckError(f"{message}\n{_context(graph, node)}", op=node.op, location=node.location)


def check_graph(graph: Graph, *, _checked: set[int] | None = None) -> None:
    """Raise CheckError at the first node whose recorded types disagree with its primitive's rule,
    or that reads a value the graph does not define."""
    defined: set[Value] = set(graph.inputs) | set(graph.constants)
    for value in graph.constants:
        if value.const is None or value.const.shape != tuple(value.shape) or value.const.dtype != value.dtype:
            raise CheckError(f"constant {value.name} holds data that does not match its type {value.aval}")
    for node in graph.nodes:
        for port, value in enumerate(node.inputs):
            if value not in defined:
                raise _fail(graph, node, f"input {port} ({value!r}) is not defined before this node")
        try:
            expected = node.primitive.abstract_eval([v.aval for v in node.inputs], node.params)
        except QtraceError as exc:
            raise _fail(graph, node, f"the shape rule rejects this node: {exc.message}") from None
        if len(expected) != len(node.outputs):
            raise _fail(graph, node, f"has {len(node.outputs)} outputs, its rule gives {len(expected)}")
        for out, aval in zip(node.outputs, expected):
            if out.aval != aval:
                raise _fail(graph, node, f"output {out!r} is recorded as {out.aval} but the rule gives {aval}")
            if out.producer is not node:
                raise _fail(graph, node, f"output {out!r} does not point back to its producer")
            defined.add(out)
        if node.op == "call":  # each function body once, however many layers call it
            checked = _checked if _checked is not None else set()
            body = node.params["function"].body
            if id(body) not in checked:
                checked.add(id(body))
                check_graph(body, _checked=checked)
                _checked = checked
    for name, value in zip(graph.output_names, graph.outputs):
        if value not in defined:
            raise CheckError(f"output {name} ({value!r}) is not computed by graph {graph.name}")


@register_pass("shape_check")
def shape_check(graph: Graph) -> bool:
    check_graph(graph)
    return False
