"""`qtrace.lower`: trace -> passes -> ONNX, and the `Lowered` result users save, run and verify."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Sequence

import numpy as np
import onnx

import qtrace.primitives  # noqa: F401  (the traced function's values learn numpy's operators from it)
from qtrace import dtypes, pytree
from qtrace.dims import Dim, substitute
from qtrace.errors import DTypeError, FileError, LoweringError, RunError, ShapeError, TraceError, UsageError, located
from qtrace.ir import Graph
from qtrace.tracing import argument_leaf_names, trace

from . import fp16  # noqa: F401  (registers the float16 pass)
from .model import RETAINED_STATE, ModelParts, attach_weights, build_model, retained_state_source
from .save import PROTOBUF_LIMIT, save_model
from .session import inference_session

SUPPORTED_OPSETS = range(17, 22)


class Lowered:
    """A lowered function: `.model` (onnx.ModelProto), `.graph` (final IR), `.save(path)`,
    `.run(*args)` on onnxruntime and `.verify(*args)` against the eager numpy function."""

    def __init__(self, fn: Callable[..., Any], graph: Graph, parts: ModelParts, output_names: list[str],
                 pass_report: Any = None, *, converted_float16: bool = False):
        self.fn = fn
        self.converted_float16 = converted_float16  # float32 arguments are fed as float16
        self.static_leaves: list[tuple[str, Any]] | None = None  # traced non-array arguments (name, value)
        self.graph = graph
        self.parts = parts
        self.output_names = output_names
        self.pass_report = pass_report
        self._session: Any = None
        self._model: onnx.ModelProto | None = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.parts.model.graph.input]

    @property
    def model(self) -> onnx.ModelProto:
        """The model with weights embedded (use `.save` for models past protobuf's 2 GiB)."""
        if self._model is None:
            if sum(a.nbytes for a in self.parts.weights.values()) >= PROTOBUF_LIMIT:
                raise LoweringError("the weights exceed protobuf's 2 GiB limit: use .save(path), which writes "
                                    "them as external data")
            self._model = attach_weights(self.parts)
        return self._model

    @located
    def save(self, path: str | os.PathLike, *, external_data: bool | None = None, size_threshold: int = 1024,
             reference_weights: bool = False, progress: Any = None, on_weight: Any = None) -> list[str]:
        """Write the model atomically (weights external when asked or past 2 GiB); returns the files.
        reference_weights: weights that are memory maps of a file (a checkpoint) are not copied; the
        external-data entries point into that file, linked next to the model. Weights of another
        dtype than their file's (`qtrace.weights.lazy_cast`) are converted as they are written.
        progress(done, total) follows the bytes; on_weight(StoredWeight) says how each weight was stored."""
        if not isinstance(path, (str, os.PathLike)):
            raise UsageError(f"save needs a file path, got {type(path).__name__} {path!r:.60}")
        try:
            return save_model(self.parts, os.fspath(path), external_data=external_data,
                              size_threshold=size_threshold, reference_weights=reference_weights, progress=progress,
                              on_weight=on_weight)
        except OSError as exc:  # a full disk, a read-only directory: say which file and why
            where = exc.filename or os.fspath(path)
            raise FileError(f"saving the model to {os.fspath(path)} failed: {exc.strerror or exc} ({where}); "
                            "nothing was written under the final names") from None

    # -- running ------------------------------------------------------------------------------------
    @located
    def feeds(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """onnxruntime feeds from the function's own arguments (static leaves are skipped), checked
        against the traced signature."""
        arrays = self.graph.input_arrays(args, kwargs)
        self._check_static_arguments(args, kwargs)
        return dict(zip(self.input_names, check_feeds(self.graph, arrays, self.converted_float16)))

    def _check_static_arguments(self, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """Non-array arguments were constants when the model was traced: another value would be ignored."""
        if self.static_leaves is None or self.graph.in_tree is None:
            return
        leaves = pytree.flatten_like(self.graph.in_tree, (tuple(args), dict(kwargs)))
        given = [leaf for leaf, is_input in zip(leaves, self.graph.input_leaf_mask) if not is_input]
        for leaf, (path, traced) in zip(given, self.static_leaves):
            try:
                same = type(leaf) is type(traced) and bool(leaf == traced)
            except Exception:  # a value without a plain equality: nothing to compare
                continue
            if not same:
                raise UsageError(f"argument {path} is {leaf!r:.40}, but the model was traced with {traced!r:.40}: "
                                 "non-array arguments are constants of the model; lower again for another value")

    def session(self) -> Any:
        if self._session is None:
            if sum(a.nbytes for a in self.parts.weights.values()) < PROTOBUF_LIMIT:
                self._session = inference_session(self.model.SerializeToString())
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(tmp, "model.onnx")
                    self.save(path, external_data=True)
                    self._session = inference_session(path)
        return self._session

    @located
    def run_named(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run on onnxruntime with feeds by ONNX input name (checked like `run`'s arguments)."""
        names = self.input_names
        if set(feeds) != set(names):
            missing, unknown = sorted(set(names) - set(feeds)), sorted(set(feeds) - set(names))
            raise TraceError(f"feeds do not match the model's inputs {names}: "
                             + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                                           f"unknown {unknown}" if unknown else "") if part))
        arrays = check_feeds(self.graph, [feeds[n] for n in names], self.converted_float16)
        session = self.session()
        try:
            outputs = session.run(None, dict(zip(names, arrays)))
        except Exception as exc:  # onnxruntime's own exception types; types and shapes were checked above
            raise RunError(f"onnxruntime could not run the model on these inputs: {str(exc).strip()[:400]}") from None
        return dict(zip(self.output_names, outputs))

    @located
    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run on onnxruntime; returns the same pytree structure as the function."""
        named = self.run_named(self.feeds(*args, **kwargs))
        return pytree.unflatten(self.graph.out_tree, [named[n] for n in self.output_names])

    def nonfinite_weights(self) -> list[str]:
        """Names of the float weights holding NaN or inf (see `nonfinite_weights`)."""
        return nonfinite_weights(self.parts.weights)

    @located
    def check(self) -> None:
        """onnx's checker with strict shape inference (full_check) on the model, as a LoweringError."""
        model = self.model if sum(a.nbytes for a in self.parts.weights.values()) < PROTOBUF_LIMIT else self.parts.model
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise LoweringError(f"the lowered model fails onnx's checker: {exc}") from None

    @located
    def verify(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        """Check the model with onnx's checker, then return the max absolute error per output between
        onnxruntime and the eager numpy function on these arguments."""
        self.check()
        got = self.run_named(self.feeds(*args, **kwargs))
        expected, _ = pytree.flatten(self.fn(*args, **kwargs))
        errors = {}
        for name, ref in zip(self.output_names, expected):
            ref, out = np.asarray(ref), got[name]
            if ref.shape != out.shape:
                raise ShapeError(f"output {name}: onnxruntime gives shape {out.shape}, numpy {ref.shape}")
            diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
            errors[name] = float(np.nanmax(diff)) if diff.size else 0.0
        return errors


def nonfinite_weights(weights: dict[str, np.ndarray], chunk_bytes: int = 64 << 20) -> list[str]:
    """Names of the float weights that hold a NaN or an infinity. Each weight is read in pieces of
    about `chunk_bytes`, so a memory-mapped checkpoint is never copied whole."""
    bad = []
    for name, array in weights.items():
        if not dtypes.is_float(array.dtype) or array.size == 0:
            continue
        flat = array.reshape(-1) if array.flags.c_contiguous else None
        if flat is None:
            finite = bool(np.isfinite(array).all())
        else:
            step = max(1, chunk_bytes // array.itemsize)
            finite = all(np.isfinite(flat[i:i + step]).all() for i in range(0, flat.size, step))
        if not finite:
            bad.append(name)
    return bad


def warn_nonfinite_weights(weights: dict[str, np.ndarray], *, stacklevel: int = 2) -> list[str]:
    """Warn (NonFiniteWeightsWarning) naming the weights that hold NaN or inf; returns their names."""
    import warnings

    from qtrace.errors import NonFiniteWeightsWarning

    bad = nonfinite_weights(weights)
    if bad:
        shown = ", ".join(bad[:8]) + (f", ... ({len(bad)} in all)" if len(bad) > 8 else "")
        warnings.warn(NonFiniteWeightsWarning(
            f"{len(bad)} weight tensor(s) hold NaN or inf: {shown}; the model will compute NaN (greedy decoding "
            "then picks token 0 forever). Check the checkpoint"), stacklevel=stacklevel + 1)
    return bad


def check_feeds(graph: Graph, arrays: Sequence[Any], converted_float16: bool = False) -> list[np.ndarray]:
    """The arrays for the graph inputs, checked against the traced signature: dtypes, ranks, static
    dims, and one size per symbolic dim (at least 1) across all inputs. A float16 lowering of a float32
    function also takes float32 arrays (converted here)."""
    sizes: dict[str, tuple[int, str]] = {}  # dim name -> (size, the input that set it)
    checked = []
    for value, array in zip(graph.inputs, arrays):
        array = np.asarray(array)
        want = value.aval

        def got() -> str:
            return f"{dtypes.short_name(array.dtype)}[{','.join(map(str, array.shape))}]"

        if array.dtype != want.dtype:
            if converted_float16 and want.dtype == np.float16 and array.dtype == np.float32:
                array = array.astype(np.float16)
            else:
                raise DTypeError(f"input {value.name} expects {want}, got {got()}: convert it with "
                                 f".astype(np.{want.dtype.name})")
        if array.ndim != want.ndim:
            raise ShapeError(f"input {value.name} expects {want} (rank {want.ndim}), got {got()} (rank {array.ndim})")
        for axis, (dim, size) in enumerate(zip(want.shape, array.shape)):
            if isinstance(dim, int):
                if dim != size:
                    raise ShapeError(f"input {value.name} expects {want}, got {got()}: dim {axis} must be {dim}")
                continue
            name = dim.single_name
            if name is None:
                continue  # a product or sum of dims: checked once every name has a size
            if size < 1:
                raise ShapeError(f"input {value.name} expects {want}, got {got()}: symbolic dim {name} must be at "
                                 "least 1")
            first = sizes.setdefault(name, (size, value.name))
            if first[0] != size:
                raise ShapeError(f"symbolic dim {name} is {first[0]} in input {first[1]} but {size} in input "
                                 f"{value.name} ({got()}, expects {want})")
        checked.append(array)
    concrete = {name: size for name, (size, _) in sizes.items()}
    for value, array in zip(graph.inputs, checked):
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, Dim) and dim.single_name is None:
                try:
                    expected = substitute(dim, concrete)
                except KeyError:
                    continue
                if expected != array.shape[axis]:
                    raise ShapeError(f"input {value.name} expects {value.aval}, got shape {array.shape}: dim {axis} "
                                     f"is {dim} = {expected} with {', '.join(f'{k}={v}' for k, v in concrete.items())}")
    return checked


def _output_names(graph: Graph, explicit: Sequence[str] | None, retained_state: bool) -> list[str]:
    names = list(graph.output_names)
    if explicit is not None or not retained_state:
        return names
    for i, value in enumerate(graph.outputs):
        source = retained_state_source(graph, value)
        if source is not None:  # build_model checks it has the input's type
            names[i] = source.name + RETAINED_STATE
    if len(set(names)) != len(names):
        raise TraceError(f"output names collide after retained-state naming: {names}")
    return names


@located
def lower(fn: Callable[..., Any], example_args: Sequence[Any] = (), example_kwargs: dict[str, Any] | None = None, *,
          opset: int = 17, dtype: Any = None, passes: Sequence[str] | None = None, dump_dir: str | None = None,
          input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
          retained_state: bool = True, local_domain: str = "qtrace.local", name: str | None = None,
          debug: bool = False) -> Lowered:
    """Trace `fn` on example arguments, optimize the IR and lower it to ONNX.

    opset: ONNX default-domain opset (17 by default, 18..21 selectable). dtype="float16" runs the
    `float16` pass first, converting float32 weights and activations to float16. passes: pass names
    (default: qtrace.passes.DEFAULT_PIPELINE, shape_check canonicalize fuse simplify functions
    simplify shape_check); dump_dir (or $QTRACE_DUMP) writes the IR after every pass. Outputs that are
    ctx_scatter chains of an input are named `<input>_RetainedState` unless `retained_state=False`
    or `output_names` is given.
    """
    from qtrace.passes import DEFAULT_PIPELINE, run_pipeline

    dump_dir = dump_dir or os.environ.get("QTRACE_DUMP") or None
    _check_lower_arguments(opset, dtype, passes, input_names, output_names, dump_dir)
    graph = trace(fn, example_args, example_kwargs, input_names=input_names, output_names=output_names, name=name)
    pipeline = list(DEFAULT_PIPELINE if passes is None else passes)
    if dtype is not None:
        pipeline.insert(0, "float16")  # not optional: the model's dtype, whatever passes were asked for
    try:
        report = run_pipeline(graph, pipeline, dump_dir=dump_dir, debug=debug)
    except OSError as exc:
        raise FileError(f"writing the IR dumps to {dump_dir} failed: {exc}") from None
    names = _output_names(graph, output_names, retained_state)
    parts = build_model(graph, names, opset=opset, local_domain=local_domain)
    lowered = Lowered(fn, graph, parts, names, report, converted_float16=dtype is not None)
    leaves, _ = pytree.flatten((tuple(example_args), dict(example_kwargs or {})))
    names = argument_leaf_names(fn, example_args, dict(example_kwargs or {}))
    lowered.static_leaves = [(name, leaf) for name, leaf, is_input in zip(names, leaves, graph.input_leaf_mask)
                             if not is_input]
    return lowered


def _check_lower_arguments(opset: Any, dtype: Any, passes: Any, input_names: Any, output_names: Any,
                           dump_dir: Any) -> None:
    """The keyword arguments of `lower`, checked before any work."""
    if dump_dir is not None and os.path.exists(dump_dir) and not os.path.isdir(dump_dir):
        raise FileError(f"the IR dump directory {dump_dir} (dump_dir or $QTRACE_DUMP) is a file")
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise LoweringError(f"opset must be an int in {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}, got "
                            f"{type(opset).__name__} {opset!r}")
    if opset not in SUPPORTED_OPSETS:
        raise LoweringError(f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}.."
                            f"{SUPPORTED_OPSETS.stop - 1}")
    if dtype is not None:
        try:
            ok = dtypes.canonical_dtype(dtype) == np.float16
        except DTypeError:
            ok = False
        if not ok:
            raise LoweringError(f"dtype must be None or float16, got {dtype!r}")
    for what, names in (("passes", passes), ("input_names", input_names), ("output_names", output_names)):
        if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
            raise TraceError(f"{what} must be a list of strings, got {names!r:.80}")
