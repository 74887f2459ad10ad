"""Model assembly: lower every node of a graph (and of its @qtrace.function bodies) with its rule
and put the result together as an onnx.ModelProto whose weights are kept aside as numpy arrays
(they are written to the model only when it is saved or asked for)."""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import onnx
from onnx import helper

from qtrace.errors import DTypeError, LoweringError, ShapeError, TraceError, user_location
from qtrace.ir import Graph, Node, Value

from .context import LoweringContext, add_source, value_info
from .custom_ops import CUSTOM_OP_DOMAINS, custom_op_function
from .rules import RULES, check_dtypes

PRODUCER = "qtrace"
RETAINED_STATE = "_RetainedState"


@dataclass
class ModelParts:
    """A model without weight data, plus the weights by initializer name."""

    model: onnx.ModelProto
    weights: dict[str, np.ndarray] = field(default_factory=dict)


def check_rules(graph: Graph) -> None:
    """All primitives without a lowering rule, reported together."""
    missing: dict[str, list[str]] = {}
    for g in [graph] + [f.body for f in graph.functions.values()]:
        for node in g.nodes:
            if node.op not in RULES:
                missing.setdefault(node.op, []).append(str(node.location) if node.location else g.name)
    if missing:
        lines = [f"  {op} (used at {', '.join(sorted(set(where))[:3])})" for op, where in sorted(missing.items())]
        raise LoweringError(f"{len(missing)} primitive(s) have no ONNX lowering rule:\n" + "\n".join(lines))


_FLOAT64 = np.dtype(np.float64)
_KEEP_FLOAT32 = ("Cloud AI 100 has no float64. numpy 2 promotes float32 to float64 when the other operand is "
                 "float64 (a np.float64 scalar such as np.sqrt(2.0) or np.pi * 1.0, a float64 array, ones()/zeros() "
                 "without a dtype); keep float32 with a Python float (math.sqrt(2.0)), np.float32(...), "
                 "dtype=np.float32, or .astype(np.float32) on the float64 operand")


def check_float64(graph: Graph) -> None:
    """Refuse the first float64 value of the graph or of a function body, at the user's line."""
    for g in [graph] + [f.body for f in graph.functions.values()]:
        for value in g.inputs:
            if value.dtype == _FLOAT64:
                raise DTypeError(f"input {value.name} is {value.aval}: {_KEEP_FLOAT32}", location=user_location())
        for node in g.nodes:
            bad = [v for v in node.inputs + node.outputs if v.dtype == _FLOAT64]
            if not bad:
                continue
            raise DTypeError(f"{_describe_float64(g, node, bad[0])}: {_KEEP_FLOAT32}", op=node.op,
                             location=node.location or user_location())
        for name, value in zip(g.output_names, g.outputs):
            if value.dtype == _FLOAT64:  # a float64 constant returned as it is
                raise DTypeError(f"output {name} is {value.aval}: {_KEEP_FLOAT32}", location=user_location())


def _describe_float64(graph: Graph, node: Node, value: Value) -> str:
    def named(v: Value) -> str:
        return f"{v.name} {v.aval}" if v.is_constant or v.producer is None else f"%{v.name} {v.aval}"

    if node.op == "cast" and value is node.outputs[0] and node.inputs[0].dtype != _FLOAT64:
        users = graph.consumers(value)
        if users:  # numpy promotion inserted this cast for the operation that reads it
            user = users[0][0]
            others = ", ".join(named(v) for v in user.inputs if v is not value) or "itself"
            return f"{named(node.inputs[0])} is promoted to float64 for {user.op} with {others}"
        return f"{named(node.inputs[0])} is cast to float64"
    operands = ", ".join(named(v) for v in node.inputs) or "no operands"
    return f"{named(value)} is float64 ({node.op} of {operands})"


def _value_names(graph: Graph, output_names: list[str]) -> tuple[dict[Value, str], list[tuple[str, Value]]]:
    """ONNX names for the IR values; outputs that need their own Identity node (an input, a constant
    or a value returned twice) are listed separately."""
    names: dict[Value, str] = {}
    taken: set[str] = set()

    def claim(value: Value, name: str) -> None:
        base, n = name, 0
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names[value] = name

    for value in graph.inputs:
        claim(value, value.name)
    clashes = [name for name in output_names if name in taken]
    if clashes:
        raise TraceError(f"output {clashes[0]!r} has the name of an input of {graph.name}; an ONNX graph names "
                         "every value once: rename the output (its dict key, or output_names=...)")
    taken.update(output_names)
    for value in graph.constants:  # a constant named like an output gets a suffix
        claim(value, value.name)
    identities: list[tuple[str, Value]] = []
    for name, value in zip(output_names, graph.outputs):
        if value.producer is None or value in names:
            identities.append((name, value))
        else:
            names[value] = name
    for node in graph.nodes:
        for out in node.outputs:
            if out not in names:
                claim(out, out.name)
    return names, identities


def _function_output_names(body: Graph) -> list[str]:
    """A function's formal output names: its own, with a suffix where one repeats a parameter's name
    (`def f(output): return output + 1`), since a function names every value once too."""
    inputs = {v.name for v in body.inputs}
    return [f"{name}_out" if name in inputs else name for name in body.output_names]


def check_retained_state(graph: Graph, output_names: list[str]) -> None:
    """An output named `<input>_RetainedState` is that input's new value: same shape, same dtype."""
    inputs = {v.name: v for v in graph.inputs}
    for name, value in zip(output_names, graph.outputs):
        source = inputs.get(name[:-len(RETAINED_STATE)]) if name.endswith(RETAINED_STATE) else None
        if source is not None and source.aval != value.aval:
            location = value.producer.location if value.producer is not None else None
            raise ShapeError(f"output {name} is the retained state of input {source.name}, so it must be "
                             f"{source.aval} like the input, but it is {value.aval}", location=location)


def _rename(nodes: list[onnx.NodeProto], old: str, new: str) -> None:
    for node in nodes:
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def lower_body(graph: Graph, output_names: list[str], *, opset: int, in_function: bool,
               local_domain: str) -> tuple[LoweringContext, list[tuple[str, Value]]]:
    names, identities = _value_names(graph, output_names)
    ctx = LoweringContext(graph, opset=opset, in_function=in_function, local_domain=local_domain, names=names)
    ctx.reserve_names(output_names)
    if in_function:
        for value in graph.constants:  # functions hold no initializers
            node = helper.make_node("Constant", [], [names[value]], name=ctx.unique_node_name(f"{value.name}/Constant"),
                                    value=onnx.numpy_helper.from_array(np.asarray(value.const), names[value]))
            users = graph.consumers(value)
            add_source(node, users[0][0].location if users else None)
            ctx.nodes.append(node)
    for node in graph.nodes:
        check_dtypes(node)
        ctx.current = node
        start = len(ctx.nodes)
        results = RULES[node.op](ctx, node, *[names[v] for v in node.inputs])
        results = results if isinstance(results, list) else [results]
        emitted = ctx.nodes[start:]
        produced = {name for n in emitted for name in n.output}
        shared = ctx.shared_names()
        for value, result in zip(node.outputs, results):
            if result in produced and result not in shared:
                _rename(emitted, result, names[value])
            else:  # an existing or cached value (a shared constant): keep it, give this value its name
                ctx.op("Identity", result)
                ctx.nodes[-1].output[0] = names[value]
    ctx.current = None
    for name, value in identities:
        identity = helper.make_node("Identity", [names[value]], [name], name=ctx.unique_node_name(f"{name}/Identity"))
        add_source(identity, value.producer.location if value.producer is not None else None)
        ctx.nodes.append(identity)
    return ctx, identities


def _opset_imports(opset: int, custom_ops: set[str], local_domain: str | None) -> list[onnx.OperatorSetIdProto]:
    imports = [helper.make_opsetid("", opset)]
    imports += [helper.make_opsetid(domain, 1) for domain in sorted({CUSTOM_OP_DOMAINS[op] for op in custom_ops})]
    if local_domain:
        imports.append(helper.make_opsetid(local_domain, 1))
    return imports


def build_model(graph: Graph, output_names: list[str], *, opset: int = 17,
                local_domain: str = "qtrace.local") -> ModelParts:
    check_rules(graph)
    check_float64(graph)
    check_retained_state(graph, output_names)
    custom_ops: set[str] = set()
    functions: list[onnx.FunctionProto] = []
    for function in graph.functions.values():  # dependency order: callees are traced first
        body = function.body
        body_outputs = _function_output_names(body)
        ctx, _ = lower_body(body, body_outputs, opset=opset, in_function=True, local_domain=local_domain)
        custom_ops |= ctx.custom_ops
        functions.append(helper.make_function(
            local_domain, function.name, [ctx.names[v] for v in body.inputs], body_outputs, ctx.nodes,
            _opset_imports(opset, ctx.custom_ops, local_domain if ctx.functions_called else None)))
    ctx, _ = lower_body(graph, output_names, opset=opset, in_function=False, local_domain=local_domain)
    custom_ops |= ctx.custom_ops
    weights = {ctx.names[v]: v.const for v in graph.constants}
    weights.update(dict(ctx.initializers))
    onnx_graph = helper.make_graph(
        ctx.nodes, graph.name,
        [value_info(ctx.names[v], v) for v in graph.inputs],
        [value_info(name, v) for name, v in zip(output_names, graph.outputs)],
    )
    functions += [custom_op_function(op, opset) for op in sorted(custom_ops)]
    imports = _opset_imports(opset, custom_ops, local_domain if graph.functions else None)
    model = helper.make_model(onnx_graph, opset_imports=imports, functions=functions,
                              producer_name=PRODUCER, producer_version=_version())
    model.ir_version = _ir_version(opset)
    return ModelParts(model, weights)


def _ir_version(opset: int) -> int:
    """The lowest IR version that carries this opset (what onnxruntime and the compiler expect)."""
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)], ignore_unknown=True)


def _version() -> str:
    import qtrace

    return qtrace.__version__


def retained_state_source(graph: Graph, value: Value) -> Value | None:
    """The graph input a value is a chain of KV-cache writes of (through function calls), if any.

    The chain has at least one write: an input returned unchanged is not retained state."""
    source, writes = _scatter_chain(graph, value)
    return source if writes else None


def _scatter_chain(graph: Graph, value: Value) -> tuple[Value | None, int]:
    """(the graph input under a chain of ctx_scatter / call nodes, the number of writes in it)."""
    writes = 0
    while value.producer is not None:
        node = value.producer
        if node.op in ("ctx_scatter", "ctx_scatter_cb"):
            value = node.inputs[0]
            writes += 1
        elif node.op == "call":
            body = node.params["function"].body
            inner, inner_writes = _scatter_chain(body, body.outputs[value.port])
            if inner is None:
                return None, 0
            value = node.inputs[body.inputs.index(inner)]
            writes += inner_writes
        else:
            return None, 0
    return (value, writes) if value in graph.inputs else (None, 0)


def attach_weights(parts: ModelParts) -> onnx.ModelProto:
    """A copy of the model with every weight embedded (for models under protobuf's 2 GiB)."""
    model = onnx.ModelProto()
    model.CopyFrom(parts.model)
    for name, array in parts.weights.items():
        data = np.asarray(array)  # a ConvertedWeight converts here
        # np.ascontiguousarray would turn a 0-d array into shape [1]: keep the shape explicitly.
        data = data if data.flags.c_contiguous else np.ascontiguousarray(data).reshape(data.shape)
        model.graph.initializer.append(onnx.numpy_helper.from_array(data, name))
    return model
