"""`trace` (function -> Graph) and `@function` (a sub-function traced once per signature)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import linecache
import os
import sys
import types
from typing import Any, Callable, Sequence

import numpy as np

from . import pytree
from .core import Primitive, Trace, Tracer, current_trace
from .errors import QtraceError, SourceLocation, TraceError, is_library_frame, located, user_location
from .ir import Function, Graph, ShapeDtype
from .weights import ConvertedWeight

_ARRAYS = (np.ndarray, ConvertedWeight)  # what becomes a constant when a traced function reaches it


def _is_array_leaf(leaf: Any) -> bool:
    return isinstance(leaf, (*_ARRAYS, ShapeDtype, Tracer))


def _unwrap(fn: Callable[..., Any]) -> tuple[Callable[..., Any], list[tuple[str, Any]], int]:
    """The innermost function under functools.partial layers, the partials' bound arguments (named)
    and how many positional parameters they fill."""
    layers = []
    while isinstance(fn, functools.partial):
        layers.append(fn)
        fn = fn.func
    bound: list[tuple[str, Any]] = []
    positional = 0
    for layer in reversed(layers):  # the innermost partial binds the first parameters
        bound.extend(zip(_parameter_names(fn, len(layer.args), skip=positional), layer.args))
        positional += len(layer.args)
        bound.extend(layer.keywords.items())
    return fn, bound, positional


def _parameter_names(fn: Callable[..., Any], count: int, skip: int = 0) -> list[str]:
    """Names of the positional parameters skip..skip+count of fn (`arg{i}` beyond its signature)."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(skip, skip + count):
        if i < len(params) and params[i].kind != params[i].VAR_POSITIONAL:
            names.append(params[i].name)
        else:
            var = next((p.name for p in params if p.kind == p.VAR_POSITIONAL), "arg")
            names.append(f"{var}{i}")
    return names


def _named_leaves(named_args: Sequence[tuple[str, Any]]) -> list[str]:
    """A dotted name per leaf: a dict argument contributes its keys alone (so `{"past_key.0": x}` names
    an input `past_key.0`), any other argument is prefixed with its parameter name."""
    names: list[str] = []
    for name, value in named_args:
        names.extend(pytree.leaf_paths(value, "" if isinstance(value, dict) else name))
    return names


def _constant_names(fn: Callable[..., Any]) -> dict[int, str]:
    """Names for the arrays a function reaches without taking them as traced arguments:
    functools.partial arguments, closure cells and the globals its code names."""
    inner, bound, _ = _unwrap(fn)
    named: list[tuple[str, Any]] = list(bound)
    code = getattr(inner, "__code__", None)
    closure = getattr(inner, "__closure__", None) or ()
    if code is not None:
        for var, cell in zip(code.co_freevars, closure):
            try:
                named.append((var, cell.cell_contents))
            except ValueError:  # empty cell
                pass
        globals_ = getattr(inner, "__globals__", {})
        named.extend((g, globals_[g]) for g in code.co_names if g in globals_)
    names: dict[int, str] = {}
    for name, value in named:
        leaves = pytree.flatten(value)[0] if _is_container(value) else [value]
        for leaf, leaf_name in zip(leaves, _named_leaves([(name, value)])):
            if isinstance(leaf, _ARRAYS):
                names.setdefault(id(leaf), leaf_name)
    return names


def _is_container(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple)) or (
        hasattr(value, "__dataclass_fields__") and not isinstance(value, type))


def _function_name(fn: Callable[..., Any]) -> str:
    inner = _unwrap(fn)[0]
    return getattr(inner, "__name__", "main").replace("<", "").replace(">", "") or "main"


def _check_unique(names: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise TraceError(f"two {what} are both named {name!r}; rename one (dict keys or "
                             f"explicit {what.replace(' ', '_')}_names)", location=user_location())
        seen.add(name)


def _output_values(trace: Trace, leaves: Sequence[Any], names: Sequence[str]) -> list[Any]:
    values = []
    for leaf, name in zip(leaves, names):
        if isinstance(leaf, Tracer) and leaf.trace is trace:
            values.append(leaf.value)
        elif isinstance(leaf, _ARRAYS):
            values.append(trace.constant(leaf))
        else:
            raise TraceError(f"output {name!r} is {type(leaf).__name__} {leaf!r:.60}, not an array "
                             "computed by the traced function", location=user_location())
    return values


def check_view_writes(trace_: Trace, graph: Graph) -> None:
    """Refuse an assignment `x[...] = v` that numpy would see through a view read afterwards: a view
    of x taken before (`y = x[:2]`), or the array x is a view of (`x = base[1:]`), or another view of
    that array. qtrace values do not alias, so the model would compute what numpy does not."""
    if not trace_.assignments:
        return
    children: dict[Any, list[Any]] = {}
    for view, (base, _, _) in trace_.views.items():
        children.setdefault(base, []).append(view)
    for written, node, spec in trace_.assignments:
        root = written
        while root in trace_.views:
            root = trace_.views[root][0]
        stack = [root]
        while stack:
            value = stack.pop()
            if value is not written and _disjoint_view(trace_, value, written, spec):
                continue  # a view of another region of the written array, and so are its views
            stack.extend(children.get(value, []))
            if value is written:
                continue
            reader = _read_after(graph, value, node)
            if reader is not None:
                view = trace_.views.get(value)
                how = (f"a view of it taken at {view[2]}" if value in children.get(written, [])
                       else f"the array it is a view of" if value is root and root is not written
                       else f"an array sharing its data (taken at {view[2] if view else 'the start'})")
                raise TraceError(
                    f"this assignment changes, in numpy, {how}, which is read afterwards ({reader}); qtrace "
                    "arrays are values, so the model would not see the change. Copy the view before assigning "
                    "(`y = x[...].copy()`), or assign before taking it", op="index_put", location=node.location)


def _disjoint_view(trace_: Trace, value: Any, written: Any, spec: tuple) -> bool:
    """Whether `value` is a basic-indexing view of `written` over a region the assignment misses on
    some static axis."""
    view = trace_.views.get(value)
    if view is None or view[0] is not written or view[1] is None:
        return False
    for dim, taken, item in zip(written.shape, view[1], spec):
        if not isinstance(dim, int) or item[0] != "slice":
            continue
        if not set(range(*taken.indices(dim))) & set(range(*slice(*item[1:]).indices(dim))):
            return True
    return False


def _read_after(graph: Graph, value: Any, node: Any) -> str | None:
    """Where `value` is read after `node` was recorded (a later operation, or a graph output)."""
    for user, _ in graph.consumers(value):
        if user.index > node.index:
            return f"{user.op} at {user.location}" if user.location else user.op
    if graph.is_output(value):
        return "returned as an output"
    return None


def _check_has_outputs(fn: Callable[..., Any], out_leaves: list[Any], result: Any) -> None:
    """A model computes something: a function returning None or only empty containers is refused."""
    if out_leaves:
        return
    inner = _unwrap(fn)[0]
    code = getattr(inner, "__code__", None)
    where = f" (defined at {os.path.basename(code.co_filename)}:{code.co_firstlineno})" if code is not None else ""
    raise TraceError(f"{_function_name(fn)}{where} returned {result!r:.40}: a traced function must return at least "
                     "one array (a model with no outputs computes nothing; did it forget `return`?)",
                     location=user_location())


def _run_on_tracers(trace_: Trace, fn: Callable[..., Any], leaves: list[Any], mask: list[bool], in_tree: Any,
                    input_names: Sequence[str]) -> Any:
    """Call fn with the masked argument leaves replaced by new inputs of the trace (named in order).

    The numpy arrays fn reaches (closure, globals, partial arguments) are read-only meanwhile: they
    become constants of the model, so a function that writes into one would lower to a model that
    differs from the eager run. Such a write is reported at the user's line."""
    with trace_.active(), _ReadOnlyArrays(fn) as guarded:
        names = iter(input_names)
        traced = [trace_.new_input(next(names), ShapeDtype.of(leaf)) if m else leaf for leaf, m in zip(leaves, mask)]
        args, kwargs = pytree.unflatten(in_tree, traced)
        try:
            return fn(*args, **kwargs)
        except QtraceError:
            raise
        except (ValueError, TypeError) as exc:
            inner = exc.__cause__ or exc.__context__
            if isinstance(inner, QtraceError):  # numpy wrapped our error (float(tracer) in `a[0] = tracer`)
                raise inner.with_traceback(None) from None
            if isinstance(exc, ValueError) and guarded.arrays and "read-only" in str(exc):
                raise guarded.mutation_error(exc, trace_.constant_names) from None
            raise
        except RecursionError:
            raise TraceError(f"maximum recursion depth exceeded while tracing {_function_name(fn)}: a recursive "
                             "function needs a base case that static Python values reach",
                             location=_traceback_location(sys.exc_info()[2])) from None


def _innermost_user_frame(tb: Any) -> tuple[Any, SourceLocation] | None:
    """The innermost frame of a traceback that is the user's code, with where it stands."""
    found = None
    while tb is not None:
        if not is_library_frame(tb.tb_frame):
            found = tb.tb_frame, SourceLocation(tb.tb_frame.f_code.co_filename, tb.tb_lineno,
                                                tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return found


def _traceback_location(tb: Any) -> SourceLocation | None:
    found = _innermost_user_frame(tb)
    return found[1] if found is not None else None


def _reachable_arrays(fn: Any, depth: int = 3) -> list[np.ndarray]:
    """The numpy arrays a function reaches without taking them as arguments: partial arguments,
    closure cells, the globals its code (and nested code) names, a bound method's instance, and the
    same for the functions among those, `depth` levels deep."""
    found: dict[int, np.ndarray] = {}
    seen: set[int] = set()

    def visit(obj: Any, level: int) -> None:
        if id(obj) in seen or level < 0:
            return
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            found.setdefault(id(obj), obj)
        elif isinstance(obj, (dict, list, tuple)):
            for child in (obj.values() if isinstance(obj, dict) else obj):
                visit(child, level)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for field in dataclasses.fields(obj):
                visit(getattr(obj, field.name, None), level)
        elif isinstance(obj, functools.partial):
            visit(obj.func, level)
            visit(obj.args, level)
            visit(obj.keywords, level)
        elif isinstance(obj, types.MethodType):
            visit(obj.__func__, level)
            visit(getattr(obj.__self__, "__dict__", None), level - 1)
        elif isinstance(obj, types.FunctionType):
            visit(getattr(obj, "__wrapped__", None), level)  # a @qtrace.function's own function
            for cell in obj.__closure__ or ():
                try:
                    visit(cell.cell_contents, level - 1)
                except ValueError:  # an empty cell
                    pass
            globals_ = obj.__globals__
            for name in _code_names(obj.__code__):
                if name in globals_ and not isinstance(globals_[name], types.ModuleType):
                    visit(globals_[name], level - 1)

    visit(fn, depth)
    return list(found.values())


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:  # lambdas, comprehensions and inner functions
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


class _ReadOnlyArrays:
    """Make the arrays a function reaches read-only for the duration of a `with` block."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.arrays: list[np.ndarray] = []

    def __enter__(self) -> "_ReadOnlyArrays":
        for array in _reachable_arrays(self.fn):
            if array.flags.writeable:
                array.flags.writeable = False
                self.arrays.append(array)
        return self

    def __exit__(self, *exc: Any) -> None:
        pending = self.arrays
        while pending:  # a view can become writeable again only after its base has
            failed = []
            for array in pending:
                try:
                    array.flags.writeable = True
                except ValueError:
                    failed.append(array)
            if len(failed) == len(pending):
                break
            pending = failed

    def mutation_error(self, exc: ValueError, constant_names: dict[int, str]) -> TraceError:
        """The error for a write into one of the guarded arrays, naming it when the line does."""
        found = _innermost_user_frame(exc.__traceback__)
        guarded = {id(a) for a in self.arrays}
        names: list[str] = []
        location = None
        if found is not None:
            frame, location = found
            text = linecache.getline(location.file, location.line)
            scope = {**frame.f_globals, **frame.f_locals}
            names = sorted({constant_names.get(id(v), n) for n, v in scope.items()
                            if isinstance(v, np.ndarray) and id(v) in guarded and n in text})
        what = f"numpy array {', '.join(names)}" if names else "a numpy array"
        return TraceError(
            f"the traced function writes into {what}, which it reads from its closure, its globals or a "
            "partial argument: that array is a constant of the model, so the model would not compute what "
            "the function computes on its next call. Copy it first (`a = a.copy()`) or pass it as an argument "
            f"({exc})", location=location)


def argument_leaf_names(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> list[str]:
    """A dotted name per leaf of fn's arguments (parameter names, dict keys), in flatten order."""
    inner, _, bound_positional = _unwrap(fn)
    arg_names = _parameter_names(inner, len(args), skip=bound_positional)
    return _named_leaves(list(zip(arg_names, args)) + list(kwargs.items()))


@located
def trace(fn: Callable[..., Any], example_args: Sequence[Any] = (), example_kwargs: dict[str, Any] | None = None,
          *, input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
          name: str | None = None) -> Graph:
    """Trace `fn(*example_args, **example_kwargs)` into a Graph.

    Array and `ShapeDtype` leaves of the arguments become graph inputs (named by parameter names and
    dict keys, or by `input_names`); other leaves are static Python values. numpy arrays the function
    reaches through partial arguments, its closure or its globals become named constants.
    """
    if not callable(fn):
        raise TraceError(f"the function to trace is {type(fn).__name__} {fn!r:.60}, not a callable")
    if not isinstance(example_args, (tuple, list)):
        raise TraceError(f"example_args must be a tuple or list of arguments, got {type(example_args).__name__}")
    example_kwargs = dict(example_kwargs or {})
    leaves, in_tree = pytree.flatten((tuple(example_args), example_kwargs))
    leaf_names = argument_leaf_names(fn, example_args, example_kwargs)
    mask = [_is_array_leaf(leaf) for leaf in leaves]
    names = [n for n, m in zip(leaf_names, mask) if m]
    if input_names is not None:
        if len(input_names) != len(names):
            raise TraceError(f"input_names has {len(input_names)} names for {len(names)} array inputs "
                             f"({', '.join(names)})")
        names = list(input_names)
    _check_unique(names, "inputs")

    graph = Graph(name or _function_name(fn))
    tracer_trace = Trace(graph)
    tracer_trace.constant_names.update(_constant_names(fn))
    result = _run_on_tracers(tracer_trace, fn, leaves, mask, in_tree, names)
    out_leaves, out_tree = pytree.flatten(result)
    _check_has_outputs(fn, out_leaves, result)
    if output_names is not None:
        if len(output_names) != len(out_leaves):
            raise TraceError(f"output_names has {len(output_names)} names for {len(out_leaves)} outputs")
        out_names = list(output_names)
    else:
        out_names = pytree.leaf_paths(result, "" if isinstance(result, dict) else "output")
    _check_unique(out_names, "outputs")
    graph.set_outputs(_output_values(tracer_trace, out_leaves, out_names), out_names)
    check_view_writes(tracer_trace, graph)
    graph.in_tree, graph.input_leaf_mask, graph.out_tree = in_tree, mask, out_tree
    return graph


# -- @qtrace.function ---------------------------------------------------------------------------------
def _call_rule(*avals: ShapeDtype, function: Function) -> list[ShapeDtype]:
    expected = [v.aval for v in function.body.inputs]
    if list(avals) != expected:
        raise TraceError(f"function {function.name} expects {', '.join(map(str, expected))}, got "
                         f"{', '.join(map(str, avals))}")
    return [v.aval for v in function.body.outputs]


def _call_impl(*arrays: np.ndarray, function: Function) -> list[np.ndarray]:
    return function.body.eval_flat(arrays)


call_p = Primitive("call", _call_rule, _call_impl, multiple_results=True,
                   doc="Call a @qtrace.function body; lowered as an ONNX local function.")


_TRACING = object()  # function_cache marker: this signature's body is being traced right now


def _static_key(leaf: Any) -> Any:
    try:
        hash(leaf)
    except TypeError:
        raise TraceError(f"a non-array argument of a @qtrace.function must be hashable (it is part of "
                         f"the signature), got {type(leaf).__name__}", location=user_location()) from None
    return (type(leaf), leaf)


def function(fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
    """Trace `fn` once per signature (shapes, dtypes, static arguments) and call the shared body.

    Every array argument is a parameter of the body, even when it is a constant at the call site,
    so 32 layers that pass their own weights share one body. Values inside are scoped by `name`.
    Called outside a trace, `fn` simply runs (eagerly on numpy).
    """
    if fn is None:
        return functools.partial(function, name=name)
    if not callable(fn):
        raise TraceError(f"@qtrace.function needs a function, got {type(fn).__name__} {fn!r:.60}",
                         location=user_location())
    fn_name = name or _function_name(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        outer = current_trace()
        if outer is None:
            return fn(*args, **kwargs)
        leaves, in_tree = pytree.flatten((args, kwargs))
        mask = [isinstance(leaf, (*_ARRAYS, Tracer)) for leaf in leaves]
        arrays = [leaf for leaf, m in zip(leaves, mask) if m]
        key = (wrapper, in_tree, tuple(ShapeDtype.of(leaf) if m else _static_key(leaf)
                                       for leaf, m in zip(leaves, mask)))
        cached = outer.function_cache.get(key)
        if cached is _TRACING:
            raise TraceError(f"@qtrace.function {fn_name} calls itself with the same signature (argument shapes, "
                             "dtypes and static values) while it is being traced: this recursion never ends. "
                             "Recurse on a static argument that reaches a base case", location=user_location())
        if cached is None:
            outer.function_cache[key] = _TRACING
            try:
                cached = _trace_body(outer, fn, fn_name, args, kwargs, leaves, in_tree, mask)
            finally:
                del outer.function_cache[key]
            outer.function_cache[key] = cached
        function_obj, out_tree = cached
        results = call_p.bind(*arrays, function=function_obj)
        return pytree.unflatten(out_tree, results)

    wrapper.qtrace_function_name = fn_name  # type: ignore[attr-defined]
    return wrapper


def _trace_body(outer: Trace, fn: Callable[..., Any], fn_name: str, args: Sequence[Any],
                kwargs: dict[str, Any], leaves: list[Any], in_tree: Any, mask: list[bool]) -> tuple[Function, Any]:
    root_graph = outer.root.graph
    body = Graph(fn_name)
    body_trace = Trace(body, root=outer.root, scope=fn_name)
    for array_id, const_name in _constant_names(fn).items():
        body_trace.constant_names.setdefault(array_id, const_name)
    leaf_names = _named_leaves(list(zip(_parameter_names(fn, len(args)), args)) + list(kwargs.items()))
    input_names = [n for n, m in zip(leaf_names, mask) if m]
    _check_unique(input_names, "function inputs")
    result = _run_on_tracers(body_trace, fn, leaves, mask, in_tree, input_names)
    out_leaves, out_tree = pytree.flatten(result)
    _check_has_outputs(fn, out_leaves, result)
    out_names = pytree.leaf_paths(result, "" if isinstance(result, dict) else "output")
    body.set_outputs(_output_values(body_trace, out_leaves, out_names), out_names)
    check_view_writes(body_trace, body)
    # Named once the body is traced: a body that calls this function with another signature (bounded
    # recursion) registers its callee first, under the first free name.
    unique, suffix = fn_name, 1
    while unique in root_graph.functions:
        unique, suffix = f"{fn_name}_{suffix}", suffix + 1
    body.name = unique
    function_obj = Function(unique, body)
    root_graph.add_function(function_obj)
    return function_obj, out_tree


__all__ = ["trace", "function", "call_p", "QtraceError"]
