"""The IR: a typed, first-order graph of primitive applications, backed by networkx.

A `Graph` is bipartite in networkx terms: `Value` and `Node` objects are both networkx nodes, an
edge `value -> node` says the node reads the value (edge key = input port), an edge
`node -> value` says the node produces it (key = output port). Consumers of a value are its
successors, the producer its predecessor, and networkx's algorithms (topological order, ancestors,
isomorphism matching) apply directly. Order is always topological with ties broken by creation
index, so the same function prints and lowers identically every time.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import networkx as nx
import numpy as np

from . import dtypes
from .dims import DimLike, canonical_shape, shape_str
from .errors import CheckError, DTypeError, ShapeError, SourceLocation, TraceError, located

if TYPE_CHECKING:  # pragma: no cover
    from .core import Primitive


class ShapeDtype:
    """The abstract value of an array: a shape (ints and symbolic dims) and a dtype.

    `ShapeDtype(("batch_size", "seq_len"), "int64")` is also how users describe a symbolic input.
    """

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: Iterable[object] | object, dtype: object = "float32"):
        self.shape: tuple[DimLike, ...] = canonical_shape(shape)  # type: ignore[arg-type]
        self.dtype: np.dtype = dtypes.canonical_dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShapeDtype) and self.shape == other.shape and self.dtype == other.dtype

    def __hash__(self) -> int:
        return hash((self.shape, self.dtype))

    def __str__(self) -> str:
        return f"{dtypes.short_name(self.dtype)}[{shape_str(self.shape)}]"

    def __repr__(self) -> str:
        return f"ShapeDtype({tuple(str(d) if not isinstance(d, int) else d for d in self.shape)}, {self.dtype.name!r})"

    @staticmethod
    def of(array: Any) -> "ShapeDtype":
        """The abstract value of an array, tracer or ShapeDtype."""
        if isinstance(array, ShapeDtype):
            return array
        aval = getattr(array, "aval", None)
        if isinstance(aval, ShapeDtype):
            return aval
        array = np.asarray(array)
        return ShapeDtype(array.shape, array.dtype)


_ids = itertools.count()


class Value:
    """An SSA value: a graph input, a constant, or an output of a node."""

    __slots__ = ("index", "name", "aval", "producer", "port", "const")

    def __init__(self, name: str, aval: ShapeDtype, producer: "Node | None" = None, port: int = 0,
                 const: np.ndarray | None = None):
        self.index = next(_ids)
        self.name = name
        self.aval = aval
        self.producer = producer
        self.port = port
        self.const = const

    @property
    def shape(self) -> tuple[DimLike, ...]:
        return self.aval.shape

    @property
    def dtype(self) -> np.dtype:
        return self.aval.dtype

    @property
    def ndim(self) -> int:
        return len(self.aval.shape)

    @property
    def is_constant(self) -> bool:
        return self.const is not None

    def __repr__(self) -> str:
        return f"%{self.name}"


class Node:
    """One application of a primitive: `outputs = primitive(*inputs, **params)`."""

    __slots__ = ("index", "primitive", "params", "inputs", "outputs", "location", "scope")

    def __init__(self, primitive: "Primitive", inputs: list[Value], params: dict[str, Any],
                 location: SourceLocation | None, scope: str):
        self.index = next(_ids)
        self.primitive = primitive
        self.params = params
        self.inputs = inputs
        self.outputs: list[Value] = []
        self.location = location
        self.scope = scope

    @property
    def op(self) -> str:
        return self.primitive.name

    def __repr__(self) -> str:
        return f"<{self.op} -> {', '.join(map(repr, self.outputs))}>"


@dataclass
class Function:
    """A reusable sub-graph made by `@qtrace.function`: one body, called from many places."""

    name: str
    body: "Graph"

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other


class Graph:
    """Inputs, constants, nodes and named outputs; see the module docstring for the networkx view.

    Passes read the graph freely but change it only through the methods below (building, editing):
    they keep the networkx edges, the cached topological order and the output set consistent.
    """

    def __init__(self, name: str = "main"):
        self.name = name
        self._nx = nx.MultiDiGraph()
        self.inputs: list[Value] = []
        self.constants: list[Value] = []
        self.outputs: list[Value] = []
        self.output_names: list[str] = []
        self.functions: dict[str, Function] = {}  # only on the outermost graph
        self.in_tree: Any = None  # pytree structure of the traced function's arguments
        self.input_leaf_mask: list[bool] = []  # which argument leaves are graph inputs
        self.out_tree: Any = None
        self._counter = itertools.count()
        self._order: list[Node] | None = None
        self._output_set: set[Value] = set()
        self._output_set_of: list[Value] | None = None
        self._changed: set[Node] | None = None  # while tracking: nodes an edit touched

    @property
    def nx(self) -> nx.MultiDiGraph:
        """A read-only view of the networkx graph, for networkx's algorithms (edit through Graph methods)."""
        return self._nx.copy(as_view=True)

    # -- building ---------------------------------------------------------------------------------
    def fresh_name(self, scope: str = "") -> str:
        n = next(self._counter)
        return f"{scope}/{n}" if scope else str(n)

    def add_input(self, name: str, aval: ShapeDtype) -> Value:
        value = Value(name, aval)
        self.inputs.append(value)
        self._nx.add_node(value)
        return value

    def add_constant(self, array: np.ndarray, name: str) -> Value:
        value = Value(name, ShapeDtype(array.shape, array.dtype), const=array)
        self.constants.append(value)
        self._nx.add_node(value)
        return value

    def add_node(self, primitive: "Primitive", inputs: Sequence[Value], params: dict[str, Any],
                 out_avals: Sequence[ShapeDtype], location: SourceLocation | None = None,
                 scope: str = "", out_names: Sequence[str] | None = None) -> Node:
        node = Node(primitive, list(inputs), dict(params), location, scope)
        self._nx.add_node(node)
        for port, value in enumerate(node.inputs):
            self._nx.add_edge(value, node, key=port)
            self._touch(value.producer)
        for port, aval in enumerate(out_avals):
            name = out_names[port] if out_names else self.fresh_name(scope)
            out = Value(name, aval, producer=node, port=port)
            node.outputs.append(out)
            self._nx.add_edge(node, out, key=port)
        self._order = None
        return node

    def apply(self, primitive: "Primitive", *inputs: Value, location: SourceLocation | None = None,
              scope: str = "", **params: Any) -> list[Value]:
        """Add a node whose output types come from the primitive's shape rule (for passes and for
        graphs built by hand); returns its output values."""
        out_avals = primitive.abstract_eval([v.aval for v in inputs], params)
        return self.add_node(primitive, inputs, params, out_avals, location, scope).outputs

    def set_outputs(self, values: Sequence[Value], names: Sequence[str]) -> None:
        if len(values) != len(names):
            raise TraceError(f"{len(values)} outputs but {len(names)} output names")
        for value in self.outputs + list(values):
            self._touch(value.producer)
        self.outputs, self.output_names = list(values), list(names)

    def add_function(self, function: Function) -> None:
        """Register a @qtrace.function body (on the outermost graph)."""
        self.functions[function.name] = function

    # -- reading ----------------------------------------------------------------------------------
    def __contains__(self, item: object) -> bool:
        """Is this node or value (still) part of the graph?"""
        return item in self._nx

    def is_output(self, value: Value) -> bool:
        """O(1): the set is rebuilt only when `outputs` is assigned a new list."""
        if self._output_set_of is not self.outputs:
            self._output_set, self._output_set_of = set(self.outputs), self.outputs
        return value in self._output_set

    def use_count(self, value: Value) -> int:
        """How many node operands read `value` (graph outputs not counted)."""
        return self._nx.out_degree(value)

    def is_used(self, value: Value) -> bool:
        """Does a node or a graph output read `value`?"""
        return self._nx.out_degree(value) > 0 or self.is_output(value)

    def consumers(self, value: Value) -> list[tuple[Node, int]]:
        """(node, input port) for every use of `value`, in deterministic order."""
        uses = [(node, port) for _, node, port in self._nx.out_edges(value, keys=True)]
        return sorted(uses, key=lambda np_: (np_[0].index, np_[1]))

    @property
    def nodes(self) -> list[Node]:
        """Nodes in topological order, ties broken by creation index."""
        if self._order is None:
            order = nx.lexicographical_topological_sort(self._nx, key=lambda n: n.index)
            self._order = [n for n in order if isinstance(n, Node)]
        return self._order

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    # -- editing (used by passes) -----------------------------------------------------------------
    @contextlib.contextmanager
    def track_changes(self) -> Iterator[set[Node]]:
        """Collect, while the block runs, every node an edit touched: removed, given other inputs or
        parameters, or whose outputs gained or lost a use (a rewrite engine re-checks matches on them)."""
        outer, self._changed = self._changed, set()
        try:
            yield self._changed
        finally:
            if outer is not None:
                outer.update(self._changed)
            self._changed = outer

    def _touch(self, node: Node | None) -> None:
        if self._changed is not None and node is not None:
            self._changed.add(node)

    def set_input(self, node: Node, port: int, value: Value) -> None:
        old = node.inputs[port]
        self._nx.remove_edge(old, node, key=port)
        node.inputs[port] = value
        self._nx.add_edge(value, node, key=port)
        self._order = None
        for touched in (node, old.producer, value.producer):
            self._touch(touched)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every consumer of `old` (and the graph outputs) read `new` instead."""
        for node, port in self.consumers(old):
            self.set_input(node, port, new)
        if self.is_output(old):
            self.outputs = [new if v is old else v for v in self.outputs]
            self._touch(old.producer)
            self._touch(new.producer)

    def set_param(self, node: Node, name: str, value: Any) -> None:
        """Change one static parameter of a node (the caller keeps its output types right)."""
        node.params[name] = value
        self._touch(node)

    def set_type(self, value: Value, aval: ShapeDtype) -> None:
        """Record a new type for a value (a pass that retypes the graph, e.g. to float16)."""
        value.aval = aval
        self._touch(value.producer)

    def set_constant_data(self, value: Value, array: np.ndarray) -> None:
        """Replace a constant's data; its type follows the new array."""
        if not value.is_constant:
            raise CheckError(f"{value!r} is not a constant")
        value.const = array
        value.aval = ShapeDtype(array.shape, array.dtype)

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs are no longer used."""
        self.remove_nodes([node])

    def remove_nodes(self, nodes: Iterable[Node]) -> None:
        """Remove nodes whose outputs are used only by each other (a dead region, in any order)."""
        doomed = set(nodes)
        for node in doomed:
            for out in node.outputs:
                if self.is_output(out) or any(user not in doomed for user in self._nx.successors(out)):
                    raise CheckError(f"cannot remove {node.op}: its output {out!r} is still used")
        for node in doomed:
            self._nx.remove_nodes_from(node.outputs)
            self._nx.remove_node(node)
            self._touch(node)
            for value in node.inputs:
                self._touch(value.producer)
        if doomed:
            self._order = None

    def remove_constant(self, value: Value) -> None:
        self.constants.remove(value)
        self._nx.remove_node(value)

    def remove_input(self, value: Value) -> None:
        """Drop an input nothing reads (a function parameter that hoisting made unnecessary)."""
        if self.is_used(value):
            raise CheckError(f"cannot remove input {value!r}: it is still used")
        self.inputs = [v for v in self.inputs if v is not value]
        self._nx.remove_node(value)

    def remove_function(self, name: str) -> None:
        del self.functions[name]

    # -- evaluation -------------------------------------------------------------------------------
    def eval_flat(self, arrays: Sequence[Any]) -> list[np.ndarray]:
        """Run the numpy references on one array per graph input; returns one array per output."""
        if len(arrays) != len(self.inputs):
            raise TraceError(f"graph {self.name} takes {len(self.inputs)} inputs, got {len(arrays)}")
        env: dict[Value, Any] = {}
        for value, array in zip(self.inputs, arrays):
            array = np.asarray(array)
            _check_runtime_value(value, array)
            env[value] = array
        for value in self.constants:
            env[value] = np.asarray(value.const)  # a memory map or ConvertedWeight is read here
        sizes = map_symbols(self.inputs, arrays)
        for node in self.nodes:
            params = {k: concrete_param(v, sizes) for k, v in node.params.items()}
            results = node.primitive.impl(*[env[v] for v in node.inputs], **params)
            if not node.primitive.multiple_results:
                results = (results,)
            for out, result in zip(node.outputs, results):
                env[out] = np.asarray(result)
        return [env[v] for v in self.outputs]

    @located
    def eval(self, *args: Any, **kwargs: Any) -> Any:
        """Run the graph on the traced function's arguments (same pytree; static leaves ignored)."""
        from . import pytree

        if self.in_tree is None:
            return self.eval_flat(args)
        arrays = self.input_arrays(args, kwargs)
        results = self.eval_flat(arrays)
        return pytree.unflatten(self.out_tree, results) if self.out_tree is not None else results

    def input_arrays(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
        """The arrays for the graph inputs, taken from arguments shaped like the traced ones (keyword
        arguments and dict entries matched by name; static leaves skipped)."""
        from . import pytree

        try:
            leaves = pytree.flatten_like(self.in_tree, (tuple(args), dict(kwargs)))
        except ValueError as exc:
            raise TraceError(f"graph {self.name}: arguments do not match the traced ones: {exc}") from None
        return [leaf for leaf, is_input in zip(leaves, self.input_leaf_mask) if is_input]

    # -- printing ---------------------------------------------------------------------------------
    def __str__(self) -> str:
        from .printer import print_graph

        return print_graph(self)

    def to_dot(self) -> str:
        from .printer import graph_to_dot

        return graph_to_dot(self)


def _check_runtime_value(value: Value, array: np.ndarray) -> None:
    if array.dtype != value.dtype:
        raise DTypeError(f"input {value.name} expects {value.aval}, got {dtypes.short_name(array.dtype)}"
                         f"[{shape_str(array.shape)}]")
    if len(array.shape) != len(value.shape) or any(
        isinstance(d, int) and d != s for d, s in zip(value.shape, array.shape)
    ):
        raise ShapeError(f"input {value.name} expects {value.aval}, got shape {array.shape}")


def concrete_param(value: Any, sizes: dict[str, int]) -> Any:
    """A node parameter with its symbolic dims replaced by the sizes of this evaluation."""
    from .dims import Dim, substitute

    if isinstance(value, Dim):
        try:
            return substitute(value, sizes)
        except KeyError as exc:
            raise ShapeError(f"symbolic dim {exc.args[0]} has no size: no graph input carries it") from None
    if isinstance(value, tuple):
        return tuple(concrete_param(v, sizes) for v in value)
    return value


def map_symbols(graph_inputs: Sequence[Value], arrays: Sequence[np.ndarray]) -> dict[str, int]:
    """Concrete sizes of the symbolic dims, read off arrays fed to the graph inputs."""
    from .dims import Dim

    sizes: dict[str, int] = {}
    for value, array in zip(graph_inputs, arrays):
        for dim, size in zip(value.shape, np.shape(array)):
            name = dim.single_name if isinstance(dim, Dim) else None
            if name is not None:
                if sizes.setdefault(name, size) != size:
                    raise ShapeError(f"symbolic dim {name} is {sizes[name]} in one input and {size} in "
                                     f"{value.name}")
    return sizes
