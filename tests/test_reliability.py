"""Regression tests for the defects of issue #12 (silent wrong models, unchecked inputs, raw
tracebacks, onnxruntime optimizer defects, stale files): each runs the case that was wrong and
checks it against an independent truth (the eager numpy run, onnxruntime, onnx's checker, or the
error the user must see at their own line)."""

from __future__ import annotations

import math
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype

from conftest import assert_located

F32 = np.float32


def lower_and_compare(fn, *args, atol=1e-6):
    """Lower fn on these concrete arguments, check the model, run it and compare with the eager run:
    same shapes (ranks included), same values."""
    lowered = qtrace.lower(fn, args)
    lowered.check()
    got = lowered.run(*args)
    want = fn(*args)
    got_leaves, want_leaves = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    for g, w in zip(got_leaves, want_leaves):
        w = np.asarray(w)
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol)
    return lowered


# -- constant folding keeps the rank -----------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: qp.ones(3, F32)[1],
    lambda: qp.zeros((2, 3), F32).sum(),
    lambda: qp.arange(4)[2],
    lambda: qp.ones_like(np.zeros(3, F32)).max(),
    lambda: qp.full((2, 2), 3.0, F32)[0, 1],
], ids=["ones-index", "zeros-sum", "arange-index", "ones_like-max", "full-index"])
def test_folded_scalar_keeps_rank_zero(make):
    def fn(x):
        scalar = make()
        return x + scalar.astype(x.dtype), scalar

    x = np.arange(3, dtype=F32)
    lowered = lower_and_compare(fn, x)
    assert [v.shape for v in lowered.graph.outputs] == [(3,), ()]


# -- slicing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [np.s_[-3::-1], np.s_[-5::-2], np.s_[5::-1], np.s_[:-5:-1], np.s_[1:-7:-1],
                                 np.s_[-1::-3], np.s_[::-2], np.s_[3:0:-1], np.s_[-2:-9:-2], np.s_[7:2]])
@pytest.mark.parametrize("size", [1, 2, 5])
def test_static_slices_with_any_bounds_select_what_python_selects(key, size):
    x = np.arange(size, dtype=F32) + 1
    lower_and_compare(lambda x: x[key], x)


# -- a closure array written while tracing ------------------------------------------------------------

STATE = np.array([1.0, 2.0, 3.0], F32)


def writes_a_global(x):
    STATE[...] = STATE + 1  # marker: global write
    return x * STATE


def test_writing_a_global_array_while_tracing_is_refused_at_that_line():
    before = STATE.copy()
    with pytest.raises(qtrace.TraceError, match="writes into numpy array STATE") as info:
        qtrace.lower(writes_a_global, (ShapeDtype((3,)),))
    assert_located(info.value, writes_a_global, "marker: global write")
    np.testing.assert_array_equal(STATE, before)  # refused before the write took effect
    assert STATE.flags.writeable  # and writeable again afterwards


def test_in_place_update_of_a_closure_array_is_refused():
    table = np.ones(3, F32)

    def fn(x):
        np.multiply(table, x.shape[0], out=table)  # marker: in-place
        return x + table

    with pytest.raises(qtrace.TraceError, match="writes into numpy array table") as info:
        qtrace.trace(fn, (ShapeDtype((3,)),))
    assert_located(info.value, fn, "marker: in-place")


def test_closure_array_written_inside_a_function_body_is_refused():
    import functools

    scale = np.ones(3, F32)

    @qtrace.function
    def layer(x):
        scale[0] = 5.0  # marker: body write
        return x * scale

    params = {"w": np.ones(3, F32)}
    with pytest.raises(qtrace.TraceError, match="writes into numpy array scale") as info:
        qtrace.trace(functools.partial(lambda p, x: layer(x * p["w"]), params), (ShapeDtype((3,)),))
    assert_located(info.value, layer.__wrapped__, "marker: body write")
    assert scale.flags.writeable and scale[0] == 1.0 and params["w"].flags.writeable


def test_arrays_made_inside_the_function_stay_writeable():
    base = np.zeros(4, F32)

    def fn(x):
        mask = base.copy()
        mask[1:] = -1.0
        return x + mask

    x = np.arange(4, dtype=F32)
    lower_and_compare(fn, x)


# -- float64 ------------------------------------------------------------------------------------------


def gelu_with_a_float64_scalar(x):
    return 0.5 * x * (1 + qp.erf(x / np.sqrt(2.0)))  # marker: float64 scalar


def test_float64_promotion_is_refused_at_the_line_that_promotes():
    with pytest.raises(qtrace.DTypeError) as info:
        qtrace.lower(gelu_with_a_float64_scalar, (ShapeDtype(("n",)),))
    message = str(info.value)
    assert "x f32[n] is promoted to float64 for div" in message and "np.float32" in message
    assert_located(info.value, gelu_with_a_float64_scalar, "marker: float64 scalar")


def test_the_float32_spelling_lowers_and_runs():
    def fn(x):
        return 0.5 * x * (1 + qp.erf(x / math.sqrt(2.0)))

    lower_and_compare(fn, np.linspace(-3, 3, 7, dtype=F32), atol=1e-6)


def test_float64_input_is_refused_naming_it():
    with pytest.raises(qtrace.DTypeError, match="input x is f64"):
        qtrace.lower(lambda x: x + 1, (ShapeDtype((3,), "float64"),))


def test_float64_computation_folded_to_float32_is_accepted():
    def fn(x):
        return x * (qp.ones(3) * 2).astype(F32)  # float64 only between constants: folded away

    lower_and_compare(fn, np.arange(3, dtype=F32))


# -- outputs ------------------------------------------------------------------------------------------


def returns_nothing(x):
    y = x + 1  # noqa: F841 - the missing return is the point


@pytest.mark.parametrize("fn", [returns_nothing, lambda x: {}, lambda x: ()], ids=["None", "empty-dict", "empty-tuple"])
def test_function_with_no_outputs_is_refused(fn):
    with pytest.raises(qtrace.TraceError, match="must return at least one array") as info:
        qtrace.lower(fn, (ShapeDtype((3,)),))  # marker: lower call
    assert info.value.location is not None and info.value.location.line > 0


def test_zero_size_assignment_is_a_no_op_that_runs():
    def fn(x):
        x[0:0] = 1.0
        x[:, 3:1] = 2.0
        return x * 2

    lower_and_compare(fn, np.ones((2, 3), F32))


def test_zero_size_assignment_still_checks_broadcasting():
    def fn(x):
        x[0:0] = np.ones(3, F32)  # marker: bad updates
        return x

    with pytest.raises(qtrace.ShapeError, match="do not broadcast"):
        qtrace.trace(fn, (ShapeDtype((3,)),))


# -- @qtrace.function recursion -----------------------------------------------------------------------


@qtrace.function
def halve_until(x, steps):
    return x if steps == 0 else halve_until(x * 0.5 + 1, steps - 1)


@qtrace.function
def forever(x):
    return forever(x + 1)  # marker: recursion


def test_bounded_recursion_of_a_function_gives_one_body_per_depth():
    def fn(x):
        return halve_until(x, 3)

    lowered = lower_and_compare(fn, np.arange(4, dtype=F32))
    assert sorted(lowered.graph.functions) == ["halve_until", "halve_until_1", "halve_until_2", "halve_until_3"]


def test_unbounded_recursion_of_a_function_is_refused_at_the_call():
    with pytest.raises(qtrace.TraceError, match="calls itself with the same signature") as info:
        qtrace.trace(lambda x: forever(x), (ShapeDtype((3,)),))
    assert_located(info.value, forever.__wrapped__, "marker: recursion")


def test_unbounded_plain_recursion_is_a_trace_error():
    def deeper(x, n):
        return deeper(x + 1, n + 1)  # marker: plain recursion

    with pytest.raises(qtrace.TraceError, match="maximum recursion depth") as info:
        qtrace.trace(lambda x: deeper(x, 0), (ShapeDtype((3,)),))
    assert_located(info.value, deeper, "marker: plain recursion")


# -- saving -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0, 1, 16])
def test_tiny_size_threshold_writes_a_model_onnxruntime_loads(tmp_path, threshold):
    weight = np.arange(8, dtype=F32)

    def fn(x, cache, position_ids):
        h = qp.rms_norm(x, weight)
        cache = qp.ctx_scatter(cache, position_ids, h[:, None])
        rows = qp.ctx_gather(cache, qp.arange(cache.shape[2])[None, None, :])
        return {"out": rows.reshape(rows.shape[0], -1)[:, 1:], "cache": cache}

    args = (ShapeDtype(("b", "s", 8)), ShapeDtype(("b", 1, "c", 8)), ShapeDtype(("b", "s"), "int64"))
    lowered = qtrace.lower(fn, args)
    path = str(tmp_path / "model.onnx")
    lowered.save(path, external_data=True, size_threshold=threshold)
    onnx.checker.check_model(path, full_check=True)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 2, 8)).astype(F32)
    cache = np.zeros((1, 1, 4, 8), F32)
    positions = np.array([[0, 1]])
    out, new_cache = session.run(None, {"x": x, "cache": cache, "position_ids": positions})
    want = fn(x, cache, positions)
    np.testing.assert_allclose(out, want["out"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_cache, want["cache"], rtol=1e-5, atol=1e-6)
    external = [t.name for t in onnx.load(path, load_external_data=False).graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert "weight" in external  # the threshold still applies to the weights


# -- onnxruntime optimizer defects met through qtrace's own sessions -----------------------------------


def test_last_two_axes_transpose_then_matmul_with_a_vector_runs_right():
    # onnxruntime's MatmulTransposeFusion turns this into a FusedMatMul that computes wrong values.
    rng = np.random.default_rng(0)
    vector = rng.standard_normal(3).astype(F32)
    x = rng.standard_normal((2, 3, 4)).astype(F32)
    lower_and_compare(lambda x: np.swapaxes(x, -1, -2) @ vector, x, atol=1e-5)


def test_float16_batch_transpose_then_matmul_with_a_constant_runs(tmp_path):
    # With MatmulTransposeFusion on, onnxruntime crashes the process (SIGSEGV): run it in a child.
    import subprocess
    import sys

    script = """
import numpy as np, qtrace
rng = np.random.default_rng(0)
w = rng.standard_normal((4, 5)).astype(np.float16)
x = rng.standard_normal((2, 3, 4)).astype(np.float16)
f = lambda x: np.transpose(x, (1, 0, 2)) @ w
got = qtrace.lower(f, (x,)).run(x)
want = f(x)
assert got.shape == want.shape, (got.shape, want.shape)
assert np.allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-2), np.abs(got - want).max()
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-2000:])


def test_qtrace_sessions_disable_the_faulty_optimizer():
    from qtrace.lowering import inference_session

    model = qtrace.lower(lambda x: x @ x.T, (ShapeDtype((2, 3)),)).model.SerializeToString()
    session = inference_session(model)
    assert "MatmulTransposeFusion" in qtrace.lowering.session.DISABLED_OPTIMIZERS
    x = np.arange(6, dtype=F32).reshape(2, 3)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ x.T)


# -- Lowered.run checks its feeds against the traced signature ----------------------------------------


def _two_inputs():
    return qtrace.lower(lambda x, ids: {"y": x * 2, "i": ids + 1},
                        (ShapeDtype(("batch", "seq", 4)), ShapeDtype(("batch", "seq"), "int64")))


def test_one_symbolic_dim_fed_two_sizes_is_refused():
    lowered = _two_inputs()
    with pytest.raises(qtrace.ShapeError, match=r"symbolic dim seq is 3 in input x but 5 in input ids") as info:
        lowered.run(np.zeros((2, 3, 4), F32), np.zeros((2, 5), np.int64))  # marker: two sizes
    assert info.value.location is not None and info.value.location.file == __file__


def test_int32_array_for_an_int64_input_is_refused_naming_both():
    lowered = _two_inputs()
    with pytest.raises(qtrace.DTypeError, match=r"input ids expects i64\[batch,seq\], got i32\[2,3\]"):
        lowered.run(np.zeros((2, 3, 4), F32), np.zeros((2, 3), np.int32))


@pytest.mark.parametrize("x_shape, message", [
    ((2, 3, 5), r"input x expects f32\[batch,seq,4\], got f32\[2,3,5\]: dim 2 must be 4"),
    ((2, 3), r"rank 3\), got f32\[2,3\] \(rank 2\)"),
    ((0, 3, 4), r"symbolic dim batch must be at least 1"),
])
def test_wrong_shapes_are_refused_before_onnxruntime_runs(x_shape, message):
    lowered = _two_inputs()
    with pytest.raises(qtrace.ShapeError, match=message):
        lowered.run(np.zeros(x_shape, F32), np.zeros((2, 3), np.int64))


def test_run_named_checks_names():
    lowered = _two_inputs()
    with pytest.raises(qtrace.TraceError, match=r"missing \['ids'\]; unknown \['idz'\]"):
        lowered.run_named({"x": np.zeros((1, 1, 4), F32), "idz": np.zeros((1, 1), np.int64)})


def test_float16_lowering_still_takes_the_function_float32_arguments():
    lowered = qtrace.lower(lambda x: x * 2, (ShapeDtype((3,)),), dtype="float16")
    out = lowered.run(np.arange(3, dtype=F32))
    assert out.dtype == np.float16 and out.tolist() == [0, 2, 4]
    with pytest.raises(qtrace.DTypeError, match="got f64"):
        lowered.run(np.arange(3, dtype=np.float64))


# -- raw tracebacks and vague errors ------------------------------------------------------------------


@pytest.mark.parametrize("fn", [lambda x: x.var(), lambda x: x.var(axis=1, ddof=1), lambda x: np.var(x, axis=(0, 1)),
                                lambda x: np.std(x, axis=0, keepdims=True), lambda x: x.std(ddof=2)])
def test_var_and_std_match_numpy(fn):
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(F32)
    lower_and_compare(fn, x, atol=1e-5)


def test_var_with_ddof_over_a_symbolic_dim_is_refused():
    with pytest.raises(qtrace.UnsupportedError, match="ddof=1 over the symbolic dim n"):
        qtrace.trace(lambda x: x.var(ddof=1), (ShapeDtype(("n",)),))


def test_an_ndarray_method_without_a_traced_form_is_named():
    def fn(x):
        return x.cumsum()  # marker: cumsum

    with pytest.raises(qtrace.UnsupportedError, match=r"ndarray.cumsum is not supported on traced values f32\[3\]") as info:
        qtrace.trace(fn, (ShapeDtype((3,)),))
    assert_located(info.value, fn, "marker: cumsum")
    assert isinstance(info.value, AttributeError)  # hasattr(tracer, "cumsum") stays False


@pytest.mark.parametrize("fn, op", [(lambda x: x + 2**70, "add"), (lambda x: x * -2**64, "mul"),
                                    (lambda x: qp.where(x > 0, 2**63, x), "where"),
                                    (lambda x: qp.full((2,), 2**64, np.int64), "full"),
                                    (lambda x: x.astype(np.int32) + 2**40, "add")])
def test_python_int_past_the_dtype_is_a_dtype_error_naming_the_op(fn, op):
    with pytest.raises(qtrace.DTypeError, match=f"^{op}: the Python int -?\\d+ does not fit int"):
        qtrace.trace(fn, (ShapeDtype((3,), "int64"),))


def test_disk_full_during_save_names_the_file(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if "w" in mode and str(tmp_path) in str(path) else f

    lowered = qtrace.lower(lambda x: x * np.arange(4, dtype=F32), (ShapeDtype((4,)),))
    monkeypatch.setattr(builtins, "open", fake_open)
    target = tmp_path / "model.onnx"
    with pytest.raises(qtrace.FileError, match=f"saving the model to {target} failed: No space left on device"):
        lowered.save(target)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # nothing half-written, no temp file left


# -- temporary files of a killed save -----------------------------------------------------------------


def test_temporary_files_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    import signal
    import subprocess
    import sys

    # A child saves a model with two 4 MiB weights and is killed (SIGKILL) after writing the first.
    script = f"""
import os, signal, numpy as np, qtrace
first, second = np.ones((1024, 1024), np.float32), np.full((1024, 1024), 2.0, np.float32)
lowered = qtrace.lower(lambda x: x @ first @ second, (qtrace.ShapeDtype((1, 1024)),))
def progress(done, total):
    if 0 < done < total:
        os.kill(os.getpid(), signal.SIGKILL)
lowered.save({str(tmp_path / 'model.onnx')!r}, external_data=True, progress=progress)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    leftovers = sorted(os.listdir(tmp_path))
    assert leftovers and all(name.startswith(".model.onnx") and name.endswith(".tmp") for name in leftovers)
    assert sum(os.path.getsize(tmp_path / name) for name in leftovers) > 0

    # A save in progress elsewhere (this process is alive) keeps its temporary file.
    in_progress = tmp_path / f".model.onnx.{os.getpid()}.abc123.tmp"
    in_progress.write_bytes(b"partial")
    lowered = qtrace.lower(lambda x: x + 1, (ShapeDtype((2,)),))
    lowered.save(tmp_path / "model.onnx", external_data=True)
    assert sorted(os.listdir(tmp_path)) == sorted(["model.onnx", "model.onnx.data", in_progress.name])


# -- NaN / inf weights ----------------------------------------------------------------------------------


def test_nonfinite_weights_are_named(tmp_path):
    from qtrace.lowering import nonfinite_weights, warn_nonfinite_weights

    path = tmp_path / "w.bin"
    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(300, 7))
    mapped[:] = 1.0
    mapped[299, 6] = np.inf  # in the last piece when read 1 KiB at a time
    weights = {"ok": np.ones(4, F32), "nan": np.array([1.0, np.nan], F32), "ids": np.arange(3),
               "mapped": mapped, "strided": np.full((4, 4), -np.inf, F32)[:, ::2], "empty": np.zeros(0, F32)}
    assert nonfinite_weights(weights, chunk_bytes=1024) == ["nan", "mapped", "strided"]
    with pytest.warns(qtrace.NonFiniteWeightsWarning, match=r"3 weight tensor\(s\) hold NaN or inf: nan, mapped, strided"):
        warn_nonfinite_weights(weights)
    lowered = qtrace.lower(lambda x: x * weights["nan"], (ShapeDtype((2,)),))
    assert lowered.nonfinite_weights() == ["nan"]


# -- ONNX node names ------------------------------------------------------------------------------------


def test_two_functions_with_one_name_give_unique_node_names():
    # Found by the fuzzer: functions `weighted` and `weighted_1` (a second function named `weighted`)
    # gave two call nodes named weighted_1, and onnxruntime refused the model.
    def make(scale):
        @qtrace.function
        def weighted(x):
            return x * scale + 1.0

        return weighted

    first, second = make(2.0), make(3.0)  # different bodies: not merged

    def fn(x):
        return second(first(first(x)))

    lowered = lower_and_compare(fn, np.arange(3, dtype=F32))
    names = [n.name for n in lowered.model.graph.node]
    assert len(names) == len(set(names)) and sorted(lowered.graph.functions) == ["weighted", "weighted_1"]


def test_argmax_over_all_axes_with_keepdims_keeps_every_axis():
    # Found by the fuzzer: numpy gives shape (1, 1, 1), qtrace gave (1,).
    x = np.random.default_rng(2).standard_normal((2, 3, 4)).astype(F32)
    lowered = lower_and_compare(lambda x: np.argmax(x, keepdims=True), x)
    assert lowered.graph.outputs[0].shape == (1, 1, 1)


def test_export_removes_scratch_directories_of_killed_exports(tmp_path):
    import subprocess
    import sys

    from qtrace import cli

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)  # that process is gone
    stale = tmp_path / f".out.{dead}.x1y2z3.tmp"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"\0" * 1024)
    running = tmp_path / f".out.{os.getpid()}.a1b2c3.tmp"  # an export in progress (this process is alive)
    running.mkdir()
    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "llama")
    assert cli.main(["export", fixture, "-o", str(tmp_path / "out"), "--ctx-len", "16", "--prefill-seq-len", "4"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["out", running.name])


# -- numpy views and assignments ---------------------------------------------------------------------


def view_then_assign(x):
    first_columns = x[:, :2]
    x[:, 0] = 0.0  # marker: assignment seen through the view
    return first_columns * 1.0


def assign_through_a_view(x):
    tail = x[1:]
    tail[0] = 5.0  # marker: assignment into a view
    return x * 1.0


def transpose_then_assign(x):
    flipped = x.T
    x[0] = 9.0  # marker: assignment seen through the transpose
    return flipped + 1.0


@pytest.mark.parametrize("fn, marker", [(view_then_assign, "marker: assignment seen through the view"),
                                        (assign_through_a_view, "marker: assignment into a view"),
                                        (transpose_then_assign, "marker: assignment seen through the transpose")])
def test_assignment_numpy_would_see_through_a_view_is_refused(fn, marker):
    with pytest.raises(qtrace.TraceError, match="changes, in numpy,.*read afterwards") as info:
        qtrace.lower(fn, (ShapeDtype((2, 3)),))
    assert_located(info.value, fn, marker)


@pytest.mark.parametrize("body", ["copy", "after", "disjoint", "repeat", "flatten", "read_before"])
def test_views_and_assignments_numpy_agrees_with_lower_and_run(body):
    def fn(x):
        if body == "copy":
            kept = x[:, :2].copy()
            x[:, 0] = 0.0
        elif body == "after":
            x[:, 0] = 0.0
            kept = x[:, :2]
        elif body == "disjoint":
            kept = x[:, :2]
            x[:, 2] = 0.0
        elif body == "repeat":  # numpy copies here, whatever qtrace records inside
            kept = np.repeat(x, 2, axis=1)
            x[0] = 9.0
        elif body == "flatten":
            kept = x.flatten()
            x[0] = 9.0
        else:
            kept = x[:, :2].sum()
            x[:, 0] = 0.0
        return kept * 1.0, x * 1.0

    x = np.arange(6, dtype=F32).reshape(2, 3)
    lowered = qtrace.lower(fn, (ShapeDtype((2, 3)),))
    for got, want in zip(lowered.run(x.copy()), fn(x.copy())):
        np.testing.assert_array_equal(got, want)
