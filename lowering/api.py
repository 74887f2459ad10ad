"""`qtrace.lower`: trace -> passes -> ONNX, and the `Lowered` result users save, run and verify."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from qtrace import pytree
from qtrace.errors import LoweringError, ShapeError, TraceError
from qtrace.ir import Graph
from qtrace.tracing import trace

from . import fp16  # noqa: F401  (registers the float16 pass)
from .model import RETAINED_STATE, ModelParts, attach_weights, build_model, retained_state_source
from .save import PROTOBUF_LIMIT, save_model

SUPPORTED_OPSETS = range(17, 22)


def onnxruntime_session(model: str | bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session for a model file or serialized model, as qtrace runs models to check
    them: warnings off, and idle threads sleep instead of spinning (onnxruntime's default spin-wait
    burns a core per thread between the small runs a check makes). `threads` caps the thread pools."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class Lowered:
    """A lowered function: `.model` (onnx.ModelProto), `.graph` (final IR), `.save(path)`,
    `.run(*args)` on onnxruntime and `.verify(*args)` against the eager numpy function."""

    def __init__(self, fn: Callable[..., Any], graph: Graph, parts: ModelParts, output_names: list[str],
                 pass_report: Any = None):
        self.fn = fn
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

    def save(self, path: str | os.PathLike, *, external_data: bool | None = None, size_threshold: int = 1024,
             reference_weights: bool = False, progress: Any = None, on_weight: Any = None) -> list[str]:
        """Write the model atomically (weights external when asked or past 2 GiB); returns the files.
        reference_weights: weights that are memory maps of a file (a checkpoint) are not copied; the
        external-data entries point into that file, linked next to the model. Weights of another
        dtype than their file's (`qtrace.weights.lazy_cast`) are converted as they are written.
        progress(done, total) follows the bytes; on_weight(StoredWeight) says how each weight was stored."""
        return save_model(self.parts, os.fspath(path), external_data=external_data, size_threshold=size_threshold,
                          reference_weights=reference_weights, progress=progress, on_weight=on_weight)

    # -- running ------------------------------------------------------------------------------------
    def feeds(self, *args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
        """onnxruntime feeds from the function's own arguments (static leaves are skipped)."""
        arrays = [np.asarray(a) for a in self.graph.input_arrays(args, kwargs)]
        # A float16 lowering of a float32 function takes float16 inputs: convert float arrays.
        arrays = [a.astype(v.dtype) if a.dtype != v.dtype and a.dtype.kind == v.dtype.kind == "f" else a
                  for a, v in zip(arrays, self.graph.inputs)]
        return dict(zip(self.input_names, arrays))

    def session(self) -> Any:
        if self._session is None:
            if sum(a.nbytes for a in self.parts.weights.values()) < PROTOBUF_LIMIT:
                self._session = onnxruntime_session(self.model.SerializeToString())
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(tmp, "model.onnx")
                    self.save(path, external_data=True)
                    self._session = onnxruntime_session(path)
        return self._session

    def run_named(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session().run(None, feeds)
        return dict(zip(self.output_names, outputs))

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Run on onnxruntime; returns the same pytree structure as the function."""
        named = self.run_named(self.feeds(*args, **kwargs))
        return pytree.unflatten(self.graph.out_tree, [named[n] for n in self.output_names])

    def check(self) -> None:
        """onnx's checker with strict shape inference (full_check) on the model, as a LoweringError."""
        model = self.model if sum(a.nbytes for a in self.parts.weights.values()) < PROTOBUF_LIMIT else self.parts.model
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
            raise LoweringError(f"the lowered model fails onnx's checker: {exc}") from None

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

    if opset not in SUPPORTED_OPSETS:
        raise LoweringError(f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}.."
                            f"{SUPPORTED_OPSETS.stop - 1}")
    graph = trace(fn, example_args, example_kwargs, input_names=input_names, output_names=output_names, name=name)
    pipeline = list(DEFAULT_PIPELINE if passes is None else passes)
    if dtype is not None:
        if np.dtype(dtype) != np.float16:
            raise LoweringError(f"dtype must be None or float16, got {dtype}")
        pipeline.insert(0, "float16")  # not optional: the model's dtype, whatever passes were asked for
    report = run_pipeline(graph, pipeline, dump_dir=dump_dir or os.environ.get("QTRACE_DUMP") or None, debug=debug)
    names = _output_names(graph, output_names, retained_state)
    parts = build_model(graph, names, opset=opset, local_domain=local_domain)
    return Lowered(fn, graph, parts, names, report)
