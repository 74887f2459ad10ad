"""Source locations (qtrace/errors.py, docs/architecture.md "Source locations"): every IR line and every
error points at the user's code, and the model zoo (`qtrace.examples`) is the user's code even where
a normal install puts it inside the qtrace package directory; only the core's own modules,
qtrace.primitives, qtrace.passes and qtrace.lowering (and numpy's dispatch) are library frames.

.ci/run runs this file a second time against a wheel installed into a fresh venv (`pip install .`),
where a directory-based rule would count the whole installed tree, zoo included, as library code.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import qtrace
import qtrace.examples
from qtrace import ShapeDtype, ShapeError
from qtrace.errors import is_library_frame
from qtrace.examples import numpy_decoder
from qtrace.examples.blocks.layers import linear
from qtrace.examples.checkpoint import random_model
from qtrace.examples.families.llama import tiny_config
from qtrace.passes import run_pipeline

from conftest import assert_located

ZOO_DIR = os.path.dirname(os.path.abspath(qtrace.examples.__file__))


def in_zoo(path: str) -> bool:
    return os.path.abspath(path).startswith(ZOO_DIR + os.sep)


def frame_in(module_name: str):
    """A live frame of code running as part of `module_name` (its globals, so its package)."""
    namespace = dict(vars(importlib.import_module(module_name)))
    exec("import sys\ndef capture():\n    return sys._getframe()\n", namespace)  # noqa: S102
    return namespace["capture"]()


@pytest.mark.parametrize("module", ["qtrace", "qtrace.core", "qtrace.tracing", "qtrace.ir", "qtrace.cli",
                                    "qtrace.primitives", "qtrace.primitives.elementwise", "qtrace.passes.fuse",
                                    "qtrace.lowering", "qtrace.lowering.rules", "numpy", "numpy._core.fromnumeric",
                                    "functools"])
def test_library_frames_are_the_core_primitives_passes_lowering_and_numpy(module):
    assert is_library_frame(frame_in(module))


@pytest.mark.parametrize("module", ["qtrace.examples", "qtrace.examples.families.llama", "qtrace.examples.blocks",
                                    "qtrace.examples.blocks.attention", "qtrace.examples.numpy_decoder", __name__])
def test_model_zoo_and_user_modules_are_user_frames(module):
    assert not is_library_frame(frame_in(module))


# -- what users see ----------------------------------------------------------------------------------------


def test_shape_error_in_numpy_decoder_points_at_its_line_with_symbolic_shapes():
    cfg = numpy_decoder.DecoderConfig(num_layers=1)
    params = numpy_decoder.init_params(cfg)
    params["layers"][0]["wq"] = np.ones((24, cfg.num_heads * cfg.head_dim), np.float32)  # the deliberate error
    fn, args = numpy_decoder.decoder_signature(cfg, params)
    with pytest.raises(ShapeError) as info:
        qtrace.trace(fn, args)
    assert_located(info.value, numpy_decoder.attention, 'q = (x @ p["wq"])')
    assert "f32[batch_size,seq_len,32]" in str(info.value) and "f32[24,32]" in str(info.value)


def test_shape_error_in_llama_example_points_at_its_line_with_symbolic_shapes():
    model = random_model(tiny_config(num_hidden_layers=1))
    model.params["layers"][0]["k_proj"] = model.params["layers"][0]["k_proj"][:, :48]  # the deliberate error
    fn, args = model.signature()
    with pytest.raises(ShapeError) as info:
        qtrace.trace(fn, args)
    assert_located(info.value, linear, "y = x @")
    assert "f32[batch_size,seq_len,64]" in str(info.value) and "48" in str(info.value)


def test_every_ir_line_of_a_zoo_model_names_a_model_file_line():
    fn, args = random_model(tiny_config()).signature()
    graph = qtrace.trace(fn, args)
    run_pipeline(graph)  # fusions and hoisting keep the line of what they replaced
    nodes = list(graph.nodes) + [n for f in graph.functions.values() for n in f.body.nodes]
    outside = [(n.op, str(n.location)) for n in nodes if n.location is None or not in_zoo(n.location.file)]
    assert not outside
    assert "# attention.py:" in str(graph) and "# causal_lm.py:" in str(graph)


def test_user_code_calling_the_zoo_is_not_where_zoo_operations_point():
    cfg = numpy_decoder.DecoderConfig(num_layers=1)
    fn, args = numpy_decoder.decoder_signature(cfg, numpy_decoder.init_params(cfg))
    graph = qtrace.trace(fn, args)  # this line is the caller: no node may point here
    assert {os.path.basename(n.location.file) for n in graph.nodes} == {"numpy_decoder.py"}


def test_qtrace_dump_command_prints_model_file_lines():
    """The installed console script, on a zoo file: each equation ends with the model file's line."""
    scripts = sysconfig.get_path("scripts")
    command = os.path.join(scripts, "qtrace")
    if not os.path.exists(command):  # pragma: no cover - an install without console scripts
        command = None
    target = os.path.join(ZOO_DIR, "numpy_decoder.py") + ":decoder"
    argv = [command] if command else [sys.executable, "-m", "qtrace.cli"]
    result = subprocess.run(argv + ["dump", target, "--after", "trace"], capture_output=True, text=True,
                            cwd=os.path.dirname(ZOO_DIR), timeout=120)
    assert result.returncode == 0, result.stderr
    equations = [line for line in result.stdout.splitlines() if " = " in line and line.startswith("  %")]
    assert equations and all("# numpy_decoder.py:" in line for line in equations)


def test_trace_of_a_user_function_points_at_the_user_line():
    def fn(x):
        return x @ np.ones((3, 5), np.float32)  # the user's line

    with pytest.raises(ShapeError) as info:
        qtrace.trace(fn, (ShapeDtype((2, 4)),))
    assert info.value.location.file == __file__
    assert "the user's line" in open(__file__).read().splitlines()[info.value.location.line - 1]
