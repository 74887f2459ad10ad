"""The IR dump: one equation per line, readable without a manual (docs/architecture.md, "The IR"), and Graphviz
DOT."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import dtypes
from .ir import Function, Graph, Node, ShapeDtype, Value

_COMMENT_COLUMN = 88


def format_param(value: Any) -> str:
    if isinstance(value, Function):
        return value.name
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return dtypes.short_name(np.dtype(value))
    if isinstance(value, ShapeDtype):
        return str(value)
    if isinstance(value, tuple):
        return "(" + ",".join(format_param(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, np.ndarray):
        return f"array{list(value.shape)}"
    return str(value)


def _is_inline(value: Value) -> bool:
    return value.is_constant and value.const.ndim == 0


def _operand(value: Value) -> str:
    if _is_inline(value):  # scalars print as literals: mul(%1, 2.0:f32)
        return f"{value.const[()]}:{dtypes.short_name(value.dtype)}"  # shortest repr in its own dtype
    return value.name if value.is_constant or value.producer is None else f"%{value.name}"


def _equation(graph: Graph, node: Node) -> str:
    results = []
    for out in node.outputs:
        if not graph.is_used(out):
            results.append("_")
        else:
            results.append(f"%{out.name}: {out.aval}")
    params = ", ".join(f"{k}={format_param(v)}" for k, v in node.params.items() if v is not None)
    text = f"  {', '.join(results)} = {node.op}({', '.join(_operand(v) for v in node.inputs)})"
    if params:
        text += f" {{{params}}}"
    if node.location is not None:
        text = f"{text.ljust(_COMMENT_COLUMN)}  # {node.location.brief()}"
    return text


def _signature(graph: Graph) -> str:
    args = ", ".join(f"{v.name}: {v.aval}" for v in graph.inputs)
    return f"{graph.name}({args})"


def _body(graph: Graph, kind: str) -> list[str]:
    lines = [f"{kind} {_signature(graph)} {{"]
    for value in graph.constants:
        if not _is_inline(value):
            lines.append(f"  const {value.name}: {value.aval}")
    lines.extend(_equation(graph, node) for node in graph.nodes)
    outs = ", ".join(f"{name}: {_operand(v)}" for name, v in zip(graph.output_names, graph.outputs))
    lines.append(f"  return {{{outs}}}")
    lines.append("}")
    return lines


def print_graph(graph: Graph) -> str:
    """Functions first (each body once), then the graph itself."""
    lines: list[str] = []
    for function in graph.functions.values():
        lines.extend(_body(function.body, "function"))
        lines.append("")
    lines.extend(_body(graph, "graph"))
    return "\n".join(lines) + "\n"


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def graph_to_dot(graph: Graph) -> str:
    """Graphviz DOT: boxes for operations, ellipses for inputs and constants, edges labelled by type."""
    lines = [f'digraph "{_dot_escape(graph.name)}" {{', "  rankdir=TB;", '  node [fontname="monospace"];']
    ids: dict[object, str] = {}
    for i, value in enumerate(graph.inputs + graph.constants):
        ids[value] = f"v{i}"
        shape = "ellipse" if value in graph.inputs else "note"
        lines.append(f'  v{i} [shape={shape}, label="{_dot_escape(value.name)}\\n{value.aval}"];')
    for i, node in enumerate(graph.nodes):
        ids[node] = f"n{i}"
        label = node.op + "".join(f"\\n{k}={_dot_escape(format_param(v))}" for k, v in node.params.items())
        lines.append(f'  n{i} [shape=box, label="{label}"];')
    for node in graph.nodes:
        for value in node.inputs:
            source = ids[value.producer] if value.producer is not None else ids[value]
            lines.append(f'  {source} -> {ids[node]} [label="{value.aval}"];')
    for i, (name, value) in enumerate(zip(graph.output_names, graph.outputs)):
        lines.append(f'  o{i} [shape=ellipse, style=bold, label="{_dot_escape(name)}"];')
        source = ids[value.producer] if value.producer is not None else ids[value]
        lines.append(f'  {source} -> o{i} [label="{value.aval}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
