"""`trace` (function -> Graph) and `@function` (a sub-function traced once per signature)."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Sequence

import numpy as np

from . import pytree
from .core import Primitive, Trace, Tracer, current_trace
from .errors import QtraceError, TraceError, user_location
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


def _run_on_tracers(trace_: Trace, fn: Callable[..., Any], leaves: list[Any], mask: list[bool], in_tree: Any,
                    input_names: Sequence[str]) -> Any:
    """Call fn with the masked argument leaves replaced by new inputs of the trace (named in order)."""
    with trace_.active():
        names = iter(input_names)
        traced = [trace_.new_input(next(names), ShapeDtype.of(leaf)) if m else leaf for leaf, m in zip(leaves, mask)]
        args, kwargs = pytree.unflatten(in_tree, traced)
        return fn(*args, **kwargs)


def trace(fn: Callable[..., Any], example_args: Sequence[Any] = (), example_kwargs: dict[str, Any] | None = None,
          *, input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
          name: str | None = None) -> Graph:
    """Trace `fn(*example_args, **example_kwargs)` into a Graph.

    Array and `ShapeDtype` leaves of the arguments become graph inputs (named by parameter names and
    dict keys, or by `input_names`); other leaves are static Python values. numpy arrays the function
    reaches through partial arguments, its closure or its globals become named constants.
    """
    if not isinstance(example_args, (tuple, list)):
        raise TraceError(f"example_args must be a tuple or list of arguments, got {type(example_args).__name__}")
    example_kwargs = dict(example_kwargs or {})
    inner, _, bound_positional = _unwrap(fn)
    arg_names = _parameter_names(inner, len(example_args), skip=bound_positional)
    leaves, in_tree = pytree.flatten((tuple(example_args), example_kwargs))
    leaf_names = _named_leaves(list(zip(arg_names, example_args)) + list(example_kwargs.items()))
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
    if output_names is not None:
        if len(output_names) != len(out_leaves):
            raise TraceError(f"output_names has {len(output_names)} names for {len(out_leaves)} outputs")
        out_names = list(output_names)
    else:
        out_names = pytree.leaf_paths(result, "" if isinstance(result, dict) else "output")
    _check_unique(out_names, "outputs")
    graph.set_outputs(_output_values(tracer_trace, out_leaves, out_names), out_names)
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
        if cached is None:
            cached = _trace_body(outer, fn, fn_name, args, kwargs, leaves, in_tree, mask)
            outer.function_cache[key] = cached
        function_obj, out_tree = cached
        results = call_p.bind(*arrays, function=function_obj)
        return pytree.unflatten(out_tree, results)

    wrapper.qtrace_function_name = fn_name  # type: ignore[attr-defined]
    return wrapper


def _trace_body(outer: Trace, fn: Callable[..., Any], fn_name: str, args: Sequence[Any],
                kwargs: dict[str, Any], leaves: list[Any], in_tree: Any, mask: list[bool]) -> tuple[Function, Any]:
    root_graph = outer.root.graph
    unique = fn_name
    suffix = 1
    while unique in root_graph.functions:
        unique, suffix = f"{fn_name}_{suffix}", suffix + 1
    body = Graph(unique)
    body_trace = Trace(body, root=outer.root, scope=fn_name)
    for array_id, const_name in _constant_names(fn).items():
        body_trace.constant_names.setdefault(array_id, const_name)
    leaf_names = _named_leaves(list(zip(_parameter_names(fn, len(args)), args)) + list(kwargs.items()))
    input_names = [n for n, m in zip(leaf_names, mask) if m]
    _check_unique(input_names, "function inputs")
    result = _run_on_tracers(body_trace, fn, leaves, mask, in_tree, input_names)
    out_leaves, out_tree = pytree.flatten(result)
    out_names = pytree.leaf_paths(result, "" if isinstance(result, dict) else "output")
    body.set_outputs(_output_values(body_trace, out_leaves, out_names), out_names)
    function_obj = Function(unique, body)
    root_graph.add_function(function_obj)
    return function_obj, out_tree


__all__ = ["trace", "function", "call_p", "QtraceError"]
