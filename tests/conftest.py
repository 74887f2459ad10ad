"""Shared helpers for the qtrace test suite: hypothesis settings, random arrays, and checks that an
error points at the user's line."""

from __future__ import annotations

import collections
import inspect
import os
import tempfile
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Fast in CI: few examples and no deadline (no timing in unit tests). QTRACE_HYPOTHESIS_PROFILE=thorough
# runs twenty times as many examples when hunting for bugs.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("qtrace", max_examples=25, deadline=None, suppress_health_check=_QUIET)
settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=_QUIET)
settings.load_profile(os.environ.get("QTRACE_HYPOTHESIS_PROFILE", "qtrace"))


def examples(fraction: float) -> int:
    """A share of the profile's example count, for the tests that run once per primitive."""
    return max(5, int(settings.default.max_examples * fraction))

INT32_MAX = 2147483647


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def line_of(fn, marker: str) -> int:
    """The absolute line number, in fn's file, of the line of fn's source that contains `marker`."""
    lines, first = inspect.getsourcelines(fn)
    hits = [first + i for i, text in enumerate(lines) if marker in text]
    assert len(hits) == 1, f"marker {marker!r} appears {len(hits)} times in {fn.__name__}"
    return hits[0]


def assert_located(error, fn, marker: str) -> None:
    """The error's location is fn's line holding `marker` (same file, same line, same function)."""
    location = error.location
    assert location is not None, f"{type(error).__name__} has no location: {error}"
    assert os.path.abspath(location.file) == os.path.abspath(inspect.getsourcefile(fn))
    assert location.line == line_of(fn, marker)
    assert location.function == fn.__name__
    assert f":{location.line} in {fn.__name__}" in str(error)


def optimized_op_counts(model: Any) -> collections.Counter:
    """op_type -> count in the graph onnxruntime runs after its optimizations (functions inlined), for a
    ModelProto or the path of a saved model (whose external data stays beside it)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(scratch, "optimized.onnx")
        options.log_severity_level = 3
        source = model if isinstance(model, str) else model.SerializeToString()
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
    return collections.Counter(node.op_type for node in optimized.graph.node)


def anonymous_memory() -> int:
    """RssAnon of this process: what a copy of the weights would take (mapped file pages excluded)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise KeyError("RssAnon")


class PeakAnonymousMemory:
    """Peak anonymous memory above the level on entry while the block runs (`.increase`, bytes),
    sampled every millisecond in a thread."""

    def __enter__(self) -> "PeakAnonymousMemory":
        self.start = self.peak = anonymous_memory()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, anonymous_memory())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.increase = max(self.peak, anonymous_memory()) - self.start
