"""The state one graph (or one function body) is lowered with: the ONNX nodes emitted so far,
names, constants, and the runtime values of symbolic dims.

A lowering rule sees only this object and the IR node: it calls `ctx.op(...)` to emit ONNX nodes
and returns the names holding the node's results.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qtrace.dims import Dim, DimLike, quotient_of
from qtrace.errors import LoweringError, SourceLocation
from qtrace.ir import Graph, Node, Value

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


def onnx_dtype(dtype: np.dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def value_info(name: str, value: Value) -> onnx.ValueInfoProto:
    """A typed ONNX value: ints stay ints, symbolic dims become dim_params with their own names."""
    shape = [d if isinstance(d, int) else str(d) for d in value.shape]
    return helper.make_tensor_value_info(name, onnx_dtype(value.dtype), shape)


def add_source(node: onnx.NodeProto, location: SourceLocation | None) -> None:
    """Point an ONNX node back at the user's line (metadata key `qtrace.source`)."""
    if location is not None:
        entry = node.metadata_props.add()
        # An absolute path: the model's bytes must not depend on the working directory.
        entry.key = "qtrace.source"
        entry.value = f"{os.path.abspath(location.file)}:{location.line} in {location.function}"


class LoweringContext:
    """Emits the ONNX nodes for one IR graph; see the module docstring."""

    def __init__(self, graph: Graph, *, opset: int, in_function: bool, local_domain: str,
                 names: dict[Value, str]):
        self.graph = graph
        self.opset = opset
        self.in_function = in_function  # function bodies have no initializers: constants are nodes
        self.local_domain = local_domain
        self.names = names  # IR value -> ONNX name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[tuple[str, np.ndarray]] = []
        self.custom_ops: set[str] = set()
        self.functions_called: set[str] = set()
        self._taken_node_names: dict[str, int] = {}
        self._taken_value_names: set[str] = set(names.values())
        self._fresh = 0
        self._const_cache: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._dim_cache: dict[Any, str] = {}
        self._dim_sources = self._find_dim_sources()
        self.current: Node | None = None
        self._current_outputs: list[onnx.NodeProto] = []

    # -- names ----------------------------------------------------------------------------------------
    def reserve_names(self, names: Sequence[str]) -> None:
        """Names the emitted values must not take (the graph's output names)."""
        self._taken_value_names.update(names)

    def fresh_value(self, hint: str = "t") -> str:
        scope = self.current.scope if self.current is not None else ""
        while True:
            self._fresh += 1
            name = f"{scope}/{hint}_{self._fresh}" if scope else f"{hint}_{self._fresh}"
            if name not in self._taken_value_names:
                self._taken_value_names.add(name)
                return name

    def _node_name(self, op_type: str) -> str:
        scope = self.current.scope if self.current is not None else ""
        return self.unique_node_name(f"{scope}/{op_type}" if scope else op_type)

    def unique_node_name(self, base: str) -> str:
        """`base`, or `base_<n>` when a node already has that name (ONNX requires unique node names)."""
        count = self._taken_node_names.get(base, 0)
        name = base if count == 0 else f"{base}_{count}"
        while name in self._taken_node_names:  # `f_1` is also the base name of a function called f_1
            count += 1
            name = f"{base}_{count}"
        self._taken_node_names[base] = count + 1
        self._taken_node_names.setdefault(name, 1)
        return name

    # -- emitting -------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, domain: str = "", n_outputs: int = 1, **attrs: Any) -> Any:
        """Emit one node; returns its output name (or names when n_outputs > 1)."""
        outputs = [self.fresh_value(op_type) for _ in range(n_outputs)]
        node = helper.make_node(op_type, list(inputs), outputs, name=self._node_name(op_type), domain=domain,
                                **{k: v for k, v in attrs.items() if v is not None})
        add_source(node, self.current.location if self.current is not None else None)
        self.nodes.append(node)
        return outputs if n_outputs > 1 else outputs[0]

    def const(self, array: Any, dtype: Any = None, hint: str = "const") -> str:
        """A constant tensor (deduplicated by content): an initializer, or a Constant node in a function."""
        array = np.asarray(array, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        hit = self._const_cache.get(key)
        if hit is not None:
            return hit
        if self.in_function:
            name = self.fresh_value(hint)
            node = helper.make_node("Constant", [], [name], name=self._node_name("Constant"),
                                    value=numpy_helper.from_array(array, name))
            add_source(node, self.current.location if self.current is not None else None)
            self.nodes.append(node)
        else:
            name = self.fresh_value(hint)
            self.initializers.append((name, array))
        self._const_cache[key] = name
        return name

    def shared_names(self) -> set[str]:
        """Names later rules may reuse (cached constants and dim sizes): never renamed."""
        return set(self._const_cache.values()) | set(self._dim_cache.values())

    def ints(self, values: Sequence[int]) -> str:
        return self.const(np.asarray(list(values), dtype=np.int64), hint="ints")

    def scalar(self, value: Any, dtype: Any) -> str:
        return self.const(np.asarray(value, dtype=dtype), hint="scalar")

    # -- symbolic dims at run time --------------------------------------------------------------------
    def _find_dim_sources(self) -> dict[str, tuple[Value, int]]:
        """For each dim name: an input (and axis) that carries it, so its size can be read with Shape."""
        sources: dict[str, tuple[Value, int]] = {}
        for value in self.graph.inputs:
            for axis, dim in enumerate(value.shape):
                name = dim.single_name if isinstance(dim, Dim) else None
                if name is not None:
                    sources.setdefault(name, (value, axis))
        return sources

    def dim(self, dim: DimLike) -> str:
        """A 1-D int64 tensor [size] holding `dim` at run time (Shape ops only for symbolic parts)."""
        if isinstance(dim, int):
            return self.ints([dim])
        cached = self._dim_cache.get(dim)
        if cached is not None:
            return cached
        total = None
        for mono, coef in dim.terms:
            term = self.ints([coef]) if (coef != 1 or not mono) else None
            for name in mono:
                size = self._named_dim(name)
                term = size if term is None else self.op("Mul", term, size)
            total = term if total is None else self.op("Add", total, term)
        self._dim_cache[dim] = total
        return total

    def _named_dim(self, name: str) -> str:
        cached = self._dim_cache.get(name)
        if cached is None:
            source = self._dim_sources.get(name)
            quotient = quotient_of(name) if source is None else None
            if quotient is not None:  # a floor quotient no input carries: from its numerator
                numerator, divisor = quotient
                cached = self.op("Div", self.dim(numerator), self.ints([divisor]))  # int64 Div floors (>= 0)
                self._dim_cache[name] = cached
                return cached
            if source is None:
                node = self.current
                raise LoweringError(f"symbolic dim {name} is used but no input of {self.graph.name} carries it: a "
                                    "size must come from an input's shape", op=node.op if node else None,
                                    location=node.location if node else None)
            value, axis = source
            saved, self.current = self.current, None  # shared by all users: no scope in its name
            cached = self.op("Shape", self.names[value], start=axis, end=axis + 1)
            self.current = saved
            add_source(self.nodes[-1], saved.location if saved is not None else None)  # its first user's line
            self._dim_cache[name] = cached
        return cached

    def shape(self, dims: Sequence[DimLike]) -> str:
        """A 1-D int64 shape tensor; one constant when every dim is static."""
        if all(isinstance(d, int) for d in dims):
            return self.ints(dims)
        parts, static = [], []
        for d in dims:
            if isinstance(d, int):
                static.append(d)
                continue
            if static:
                parts.append(self.ints(static))
                static = []
            parts.append(self.dim(d))
        if static:
            parts.append(self.ints(static))
        return parts[0] if len(parts) == 1 else self.op("Concat", *parts, axis=0)

    def scalar_dim(self, dim: DimLike, dtype: Any = np.int64) -> str:
        """A 0-d tensor holding `dim` (for Range and the ctx ops' comp_ctx_len)."""
        if isinstance(dim, int):
            return self.scalar(dim, dtype)
        key = ("scalar", dim, np.dtype(dtype).str)
        cached = self._dim_cache.get(key)
        if cached is None:
            saved, self.current = self.current, None  # shared by all users: no scope in its name
            # Squeeze, not Reshape to []: with no constant input, onnxruntime's common-subexpression
            # elimination merges the copies that inlined layer functions bring
            cached = self.op("Squeeze", self.dim(dim))
            if np.dtype(dtype) != np.int64:
                cached = self.op("Cast", cached, to=onnx_dtype(dtype))
            self.current = saved
            add_source(self.nodes[-1], saved.location if saved is not None else None)  # its first user's line
            self._dim_cache[key] = cached
        return cached
