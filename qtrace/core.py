"""Primitives, tracers and the trace that records them.

A `Primitive` owns a shape rule (abstract values in, abstract values out, `ShapeError`/`DTypeError`
on bad input) and a numpy reference implementation. `prim.bind(*arrays, **params)` runs the
reference when nothing is being traced, and records a `Node` in the current trace's `Graph` when
something is. User-facing functions (in `qtrace.primitives`) are thin wrappers around `bind`.

Every primitive is registered by name in `PRIMITIVES` with its traits (`commutative`, `elementwise`),
so passes can ask what an operation is without importing `qtrace.primitives`.

A `Tracer` stands for a value of the graph being built. Its operators and numpy protocols dispatch
through `TRACER_OPS`, a table that `qtrace.primitives` fills when imported: the core knows no
operation by name.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .dims import Dim, DimLike, dim_product
from .errors import ConcretizationError, QtraceError, TraceError, UnsupportedError, user_location
from .ir import Graph, ShapeDtype, Value
from .weights import ConvertedWeight


class UnsupportedAttributeError(UnsupportedError, AttributeError):
    """An ndarray attribute traced values do not have (an AttributeError too, so hasattr() is False)."""


# -- primitive traits -----------------------------------------------------------------------------------
# What a pass may rely on without knowing the operation (docs/architecture.md, "Primitives and traits").
COMMUTATIVE = "commutative"  # two operands; swapping them gives the same result
ELEMENTWISE = "elementwise"  # output element i reads only operand elements at i (operands broadcast numpy-style)
TRAITS = frozenset({COMMUTATIVE, ELEMENTWISE})


class Primitive:
    """An operation: a name, a shape rule, a numpy reference and its traits (see the module docstring)."""

    def __init__(self, name: str, shape_rule: Callable[..., Any], impl: Callable[..., Any], *,
                 multiple_results: bool = False, doc: str = "", traits: Iterable[str] = ()):
        self.name = name
        self.shape_rule = shape_rule
        self.impl = impl
        self.multiple_results = multiple_results
        self.traits = frozenset(traits)
        unknown = self.traits - TRAITS
        if unknown:
            raise AssertionError(f"primitive {name}: unknown trait(s) {sorted(unknown)}; known: {sorted(TRAITS)}")
        self.__doc__ = doc

    def __repr__(self) -> str:
        return f"Primitive({self.name})"

    def abstract_eval(self, avals: Sequence[ShapeDtype], params: dict[str, Any]) -> list[ShapeDtype]:
        """The output avals, with any rule error tagged with this primitive's name."""
        try:
            result = self.shape_rule(*avals, **params)
        except QtraceError as exc:
            raise exc.with_context(self.name, user_location()) from None
        return list(result) if self.multiple_results else [result]

    def bind(self, *args: Any, **params: Any) -> Any:
        trace = current_trace()
        if trace is None:
            for a in args:
                if isinstance(a, Tracer):
                    raise TraceError(f"{self.name}: a traced value escaped its trace (was it stored "
                                     "in a global or returned through a side channel?)",
                                     location=user_location())
            arrays = [np.asarray(a) if not isinstance(a, np.ndarray) else a for a in args]
            self.abstract_eval([ShapeDtype(a.shape, a.dtype) for a in arrays], params)
            return self.impl(*arrays, **params)
        return trace.record(self, args, params)


PRIMITIVES: dict[str, Primitive] = {}  # every registered primitive, by name: the one place each is defined


def register_primitive(prim: Primitive) -> Primitive:
    """Make a primitive known by name (once: a second definition with the same name is a bug)."""
    if prim.name in PRIMITIVES:
        raise AssertionError(f"primitive {prim.name} is defined twice")
    PRIMITIVES[prim.name] = prim
    return prim


def has_trait(op: str, trait: str) -> bool:
    """Does the primitive named `op` have `trait`? (False for a name nothing registered.)"""
    prim = PRIMITIVES.get(op)
    return prim is not None and trait in prim.traits


def primitives_with(trait: str) -> tuple[str, ...]:
    """Names of the registered primitives that have `trait`, sorted."""
    return tuple(sorted(name for name, prim in PRIMITIVES.items() if trait in prim.traits))


# -- the trace ----------------------------------------------------------------------------------------
_state = threading.local()


def _trace_stack() -> list["Trace"]:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack


def current_trace() -> "Trace | None":
    stack = _trace_stack()
    return stack[-1] if stack else None


class Trace:
    """Builds one `Graph` while a function runs on tracers."""

    def __init__(self, graph: Graph, root: "Trace | None" = None, scope: str = ""):
        self.graph = graph
        self.root = root or self
        self.scopes: list[str] = [scope] if scope else []
        self.constants: dict[int, tuple[Any, Value]] = {}  # id(array) -> (array kept alive, value)
        self.constant_names: dict[int, str] = {} if root is None else root.constant_names
        self.function_cache: dict[Any, Any] = {} if root is None else root.function_cache
        self.used_constant_names: set[str] = set()
        self.constant_counter = 0
        # numpy aliasing, for `x[...] = v`: values numpy would give as views (value -> its base, the region
        # of the base it shows or None for all of it, where it was taken) and the assignments recorded
        self.views: dict[Value, tuple[Value, Any, Any]] = {}
        self.assignments: list[tuple[Value, Any, tuple]] = []  # (value written over, index_put node, spec)

    @contextlib.contextmanager
    def active(self) -> Iterator["Trace"]:
        stack = _trace_stack()
        stack.append(self)
        try:
            yield self
        finally:
            stack.pop()

    @property
    def scope(self) -> str:
        return "/".join(self.scopes)

    def new_input(self, name: str, aval: ShapeDtype) -> "Tracer":
        return Tracer(self, self.graph.add_input(name, aval))

    def constant(self, array: Any) -> Value:
        """The graph value for a numpy array or scalar used by a traced op (one per array object)."""
        key = id(array)
        hit = self.constants.get(key)
        if hit is not None and hit[0] is array:
            return hit[1]
        # Keep ndarrays, memory maps of checkpoints and weights still to be converted as they are:
        # no copy, no read, source file intact.
        data = array if isinstance(array, (np.ndarray, ConvertedWeight)) else np.asarray(array)
        name = self._unique_constant_name(self.constant_names.get(key) or self._view_name(data))
        value = self.graph.add_constant(data, name)
        self.constants[key] = (array, value)
        return value

    def _view_name(self, array: np.ndarray) -> str | None:
        """`w.T` computed eagerly on a named weight is named `w.T` (any other view `w.view`)."""
        base = array.base if isinstance(array, np.ndarray) else None
        base_name = self.constant_names.get(id(base)) if base is not None else None
        if base_name is None:
            return None
        return f"{base_name}.T" if array.shape == base.shape[::-1] and array.ndim > 1 else f"{base_name}.view"

    def _unique_constant_name(self, wanted: str | None) -> str:
        if wanted and wanted not in self.used_constant_names:
            self.used_constant_names.add(wanted)
            return wanted
        base = wanted or (f"{self.scope}/const" if self.scope else "const")
        while True:
            name = f"{base}{self.constant_counter}" if not wanted else f"{base}_{self.constant_counter}"
            self.constant_counter += 1
            if name not in self.used_constant_names:
                self.used_constant_names.add(name)
                return name

    def value_of(self, x: Any) -> Value:
        if isinstance(x, Tracer):
            if x.trace is not self:
                if x.trace.root is self.root:
                    raise TraceError(
                        "a traced value from an enclosing trace is used inside a @qtrace.function body; "
                        "pass it to the function as an argument", location=user_location())
                raise TraceError("a traced value from another (finished) trace is used here; was it stored in "
                                 "a global or a closure by an earlier trace?", location=user_location())
            return x.value
        return self.constant(x)

    def record(self, primitive: Primitive, args: Sequence[Any], params: dict[str, Any]) -> Any:
        inputs = [self.value_of(a) for a in args]
        out_avals = primitive.abstract_eval([v.aval for v in inputs], params)
        node = self.graph.add_node(primitive, inputs, params, out_avals, user_location(), self.scope)
        outs = [Tracer(self, v) for v in node.outputs]
        return outs if primitive.multiple_results else outs[0]


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Prefix the names of values (and ONNX nodes) created inside: `with qtrace.scope("layers.0/attn"):`."""
    trace = current_trace()
    if trace is None:
        yield
        return
    trace.scopes.append(str(name))
    try:
        yield
    finally:
        trace.scopes.pop()


# -- tracers ------------------------------------------------------------------------------------------
TRACER_OPS: dict[str, Callable[..., Any]] = {}  # operation name -> user-facing function
NUMPY_UFUNCS: dict[Any, Callable[..., Any]] = {}  # np.ufunc -> qtrace function
NUMPY_FUNCTIONS: dict[Any, Callable[..., Any]] = {}  # numpy function -> qtrace function


def register_tracer_op(name: str, fn: Callable[..., Any]) -> None:
    TRACER_OPS[name] = fn


def _op(name: str) -> Callable[..., Any]:
    fn = TRACER_OPS.get(name)
    if fn is None:
        raise _primitives_not_loaded(f"operation {name!r} on traced values")
    return fn


def _primitives_not_loaded(what: str) -> UnsupportedError:
    return UnsupportedError(f"{what} needs qtrace.primitives, which is not imported (qtrace.trace and "
                            "qtrace.lower import it; so does `import qtrace.primitives`)", location=user_location())


def _binary(name: str, reflected: bool = False) -> Callable[..., Any]:
    if reflected:
        return lambda self, other: _op(name)(other, self)
    return lambda self, other: _op(name)(self, other)


def _unary(name: str) -> Callable[..., Any]:
    return lambda self: _op(name)(self)


def _method(name: str) -> Callable[..., Any]:
    return lambda self, *args, **kwargs: _op(name)(self, *args, **kwargs)


class Tracer:
    """A traced array: has `.shape`, `.dtype`, numpy operators and protocols; records primitives."""

    __slots__ = ("trace", "value")
    __array_priority__ = 1000

    def __init__(self, trace: Trace, value: Value):
        self.trace = trace
        self.value = value

    @property
    def aval(self) -> ShapeDtype:
        return self.value.aval

    @property
    def shape(self) -> tuple[DimLike, ...]:
        return self.value.shape

    @property
    def dtype(self) -> np.dtype:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return len(self.value.shape)

    @property
    def size(self) -> DimLike:
        return dim_product(self.shape)

    def __repr__(self) -> str:
        return f"Tracer<{self.aval}, %{self.value.name}>"

    # Python needs a concrete value for these: tracing cannot provide one.
    def _concretize(self, what: str) -> Any:
        raise ConcretizationError(
            f"{what} of a traced value {self.aval} needs its concrete value, which is unknown while "
            "tracing; use qtrace.primitives.where / maximum / ... for data-dependent choices, or "
            "branch on static Python values", location=user_location())

    def __bool__(self) -> bool:
        return self._concretize("Python control flow (`if`/`while`/`and`/`or`/bool())")

    def __int__(self) -> int:
        return self._concretize("int()")

    def __float__(self) -> float:
        return self._concretize("float()")

    def __index__(self) -> int:
        return self._concretize("use as a Python index (to index a numpy array with traced indices, use "
                                "qtrace.primitives.take(array, indices))")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._concretize("conversion to a numpy array (numpy indexing a numpy array with a traced "
                                "value, or np.asarray of one, needs it; index with qtrace.primitives.take"
                                "(array, indices))")

    def tolist(self) -> Any:
        return self._concretize("tolist()")

    def item(self) -> Any:
        return self._concretize("item()")

    def __len__(self) -> int:
        if not self.shape:
            raise TraceError("len() of a 0-d traced value", location=user_location())
        first = self.shape[0]
        if isinstance(first, Dim):
            raise ConcretizationError(f"len() of a traced value whose first dim is symbolic ({first})",
                                      location=user_location())
        return first

    def __iter__(self) -> Iterator["Tracer"]:
        for i in range(len(self)):
            yield self[i]

    __hash__ = object.__hash__

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes Tracer lacks: an ndarray method qtrace does not trace is named as
        # such (an AttributeError too, so hasattr() stays False).
        if not name.startswith("_") and hasattr(np.ndarray, name):
            methods = sorted(n for n in TRACER_OPS if not n.startswith("_") and hasattr(np.ndarray, n))
            raise UnsupportedAttributeError(
                f"ndarray.{name} is not supported on traced values {self.aval}; traced values have "
                f"{', '.join(methods)}, .shape, .dtype, .ndim, .size, .T and numpy's operators",
                op=name, location=user_location())
        raise AttributeError(f"{type(self).__name__} object has no attribute {name!r}")

    # numpy protocols: np.exp(tracer), np.concatenate([tracer, ...]) record qtrace primitives.
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        fn = NUMPY_UFUNCS.get(ufunc) if method == "__call__" else None
        if fn is not None and kwargs.get("out") is not None:
            raise UnsupportedError(f"numpy.{ufunc.__name__}: out= is not supported on traced values (they are "
                                   "not buffers); use the returned value", location=user_location())
        if fn is None:
            what = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
            if not NUMPY_UFUNCS:
                raise _primitives_not_loaded(f"numpy.{what} on traced values")
            raise UnsupportedError(
                f"numpy.{what} is not supported on traced values; supported ufuncs: "
                f"{', '.join(sorted(u.__name__ for u in NUMPY_UFUNCS))}", location=user_location())
        kwargs.pop("out", None)
        if kwargs:  # dtype=, where=, casting=, ...: numpy semantics qtrace does not reproduce
            raise UnsupportedError(f"numpy.{ufunc.__name__}: keyword arguments {sorted(kwargs)} are not supported "
                                   "on traced values; cast or select explicitly", location=user_location())
        return fn(*inputs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        fn = NUMPY_FUNCTIONS.get(func)
        if fn is None:
            if not NUMPY_FUNCTIONS:
                raise _primitives_not_loaded(f"numpy.{func.__name__} on traced values")
            raise UnsupportedError(
                f"numpy.{func.__name__} is not supported on traced values; use one of: "
                f"{', '.join(sorted(f.__name__ for f in NUMPY_FUNCTIONS))}", location=user_location())
        return fn(*args, **kwargs)


_BINARY_OPERATORS = {
    "add": "add", "sub": "subtract", "mul": "multiply", "truediv": "divide", "floordiv": "floor_divide",
    "mod": "mod", "pow": "power", "matmul": "matmul", "and": "logical_and_or_bitwise",
    "or": "logical_or_or_bitwise", "xor": "logical_xor_or_bitwise",
}
for _dunder, _name in _BINARY_OPERATORS.items():
    setattr(Tracer, f"__{_dunder}__", _binary(_name))
    setattr(Tracer, f"__r{_dunder}__", _binary(_name, reflected=True))
for _dunder, _name in {"lt": "less", "le": "less_equal", "gt": "greater", "ge": "greater_equal",
                       "eq": "equal", "ne": "not_equal"}.items():
    setattr(Tracer, f"__{_dunder}__", _binary(_name))
for _dunder, _name in {"neg": "negative", "pos": "positive", "abs": "abs", "invert": "invert"}.items():
    setattr(Tracer, f"__{_dunder}__", _unary(_name))
for _name in ("reshape", "transpose", "astype", "sum", "mean", "var", "std", "max", "min", "argmax", "squeeze",
              "swapaxes", "flatten", "__getitem__", "__setitem__", "take", "clip", "copy"):
    setattr(Tracer, _name, _method(_name))
Tracer.T = property(lambda self: _op("transpose")(self))  # type: ignore[attr-defined]
