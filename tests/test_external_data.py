"""Saving models with external data (lowering/save.py): a model past protobuf's 2 GiB limit is written
as a small .onnx file plus a data file, streamed without a second copy of the weights in memory, and
what is written reads back exactly; smaller models save the same way when asked.

The > 2 GiB weights are generated lazily: each table is a strided view of a small random vector
(row i is `base[i : i + D]`), so the test needs little memory, and the truth for any row is a slice of
`base`. Its files live in a temporary directory that is removed when the module's tests end.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Any, Iterator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import as_strided
from onnx import numpy_helper

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype

from test_lowering import assert_matches

GIB = 2**30
PROTOBUF_LIMIT = 2**31 - 1
WIDTH = 4096  # floats per row
ROWS = 46_000  # per table: three tables make 2.1 GiB


# -- memory ---------------------------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakRss:
    """Peak resident memory above the starting point while the block runs (Linux): the kernel's
    high-water mark, reset on entry, cross-checked by sampling in a thread."""

    def __enter__(self) -> "PeakRss":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.start = _status("VmRSS")
        self.sampled = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.sampled = max(self.sampled, _status("VmRSS"))

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.increase = max(_status("VmHWM"), self.sampled) - self.start


# -- the big model ----------------------------------------------------------------------------------------
def _tables() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(2024)
    bases = [rng.standard_normal(ROWS + WIDTH).astype(np.float32) for _ in range(3)]
    tables = [as_strided(base, shape=(ROWS, WIDTH), strides=(4, 4), writeable=False) for base in bases]
    return bases, tables


BASES, TABLES = _tables()
BIAS = np.linspace(-1, 1, WIDTH).astype(np.float32)  # 16 KiB: external too
WEIGHT_BYTES = sum(t.nbytes for t in TABLES) + BIAS.nbytes


def big_model(ids: Any) -> Any:
    rows = [qp.take(table, ids, axis=0) for table in TABLES]
    return (rows[0] + rows[1] - rows[2]) * 0.5 + BIAS


def expected_rows(ids: np.ndarray) -> np.ndarray:
    """From the bases, not the tables: row i of table k is bases[k][i : i + WIDTH]."""
    def row(k: int, i: int) -> np.ndarray:
        return BASES[k][i:i + WIDTH]

    out = [(row(0, i) + row(1, i) - row(2, i)) * np.float32(0.5) + BIAS for i in ids.reshape(-1)]
    return np.stack(out).reshape(ids.shape + (WIDTH,)).astype(np.float32)


@pytest.fixture(scope="module")
def big(tmp_path_factory: Any) -> Iterator[dict[str, Any]]:
    assert WEIGHT_BYTES > PROTOBUF_LIMIT
    directory = tmp_path_factory.mktemp("big_model")
    try:
        lowered = qtrace.lower(big_model, (ShapeDtype(("B",), "int64"),))
        path = str(directory / "model.onnx")
        with PeakRss() as memory:
            files = lowered.save(path)
        yield {"lowered": lowered, "path": path, "files": files, "peak": memory.increase, "dir": directory}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_big_model_saves_its_weights_as_external_data(big: dict[str, Any]) -> None:
    model_file, data_file = big["files"]
    assert os.path.basename(data_file) == "model.onnx.data"
    assert os.path.getsize(model_file) < 1 << 20
    assert os.path.getsize(data_file) >= WEIGHT_BYTES


def test_big_model_passes_full_check(big: dict[str, Any]) -> None:
    onnx.checker.check_model(big["path"], full_check=True)


def test_big_model_external_data_reads_back_exactly(big: dict[str, Any]) -> None:
    model = onnx.load(big["path"], load_external_data=False)
    data_path = os.path.join(os.path.dirname(big["path"]), "model.onnx.data")
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    seen_tables = 0
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == "model.onnx.data"
        shape, offset = tuple(tensor.dims), int(info["offset"])
        stored = np.memmap(data_path, dtype=np.float32, mode="r", offset=offset, shape=shape)
        if shape == BIAS.shape:
            np.testing.assert_array_equal(stored, BIAS)
            continue
        seen_tables += 1
        base = next(b for b in BASES if np.array_equal(stored[0], b[:WIDTH]))
        for i in range(0, ROWS, 4999):  # rows across the whole table, each a window of its base
            np.testing.assert_array_equal(stored[i], base[i:i + WIDTH])
        np.testing.assert_array_equal(stored[-1], base[ROWS - 1:ROWS - 1 + WIDTH])
        del stored
    assert seen_tables == 3


def test_big_model_runs_on_onnxruntime_from_its_files(big: dict[str, Any]) -> None:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(big["path"], options, providers=["CPUExecutionProvider"])
    ids = np.array([0, ROWS - 1, 12345, 7], np.int64)
    (got,) = session.run(None, {"ids": ids})
    assert_matches(got, expected_rows(ids))
    del session


def test_big_model_is_not_embedded_in_one_protobuf(big: dict[str, Any]) -> None:
    with pytest.raises(qtrace.LoweringError, match="2 GiB"):
        big["lowered"].model  # noqa: B018 - the property is what raises


def test_saving_the_big_model_holds_no_copy_of_the_weights(big: dict[str, Any]) -> None:
    # The weights are views of a few MiB: anything near their 2.1 GiB would be a copy.
    assert big["peak"] < 0.25 * WEIGHT_BYTES, f"peak RSS rose by {big['peak'] / GIB:.2f} GiB while saving"


def test_save_leaves_only_the_model_and_its_data(big: dict[str, Any]) -> None:
    assert sorted(os.listdir(big["dir"])) == ["model.onnx", "model.onnx.data"]


# -- small models, external on request ---------------------------------------------------------------------
SMALL_WEIGHT = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)


def small_model(x: Any) -> Any:
    return (x @ SMALL_WEIGHT[:, :16]) * 2.0 + np.float32(1.0)


def _session(path: str) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def test_external_data_on_request_runs_from_the_files(tmp_path: Any) -> None:
    lowered = qtrace.lower(small_model, (ShapeDtype(("B", 64)),))
    files = lowered.save(tmp_path / "small.onnx", external_data=True)
    assert [os.path.basename(f) for f in files] == ["small.onnx", "small.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "small.onnx"), full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    (got,) = _session(str(tmp_path / "small.onnx")).run(None, {"x": x})
    assert_matches(got, small_model(x))


def test_weights_below_the_threshold_stay_in_the_model_file(tmp_path: Any) -> None:
    lowered = qtrace.lower(small_model, (ShapeDtype(("B", 64)),))
    lowered.save(tmp_path / "small.onnx", external_data=True, size_threshold=1024)
    model = onnx.load(str(tmp_path / "small.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        nbytes = int(np.prod(tensor.dims, dtype=np.int64)) * 4 if tensor.data_type == onnx.TensorProto.FLOAT else None
        if nbytes is not None and nbytes >= 1024:
            assert tensor.data_location == onnx.TensorProto.EXTERNAL, tensor.name
        elif nbytes is not None:
            assert tensor.data_location == onnx.TensorProto.DEFAULT, tensor.name


@pytest.mark.parametrize("external_data", [False, True])
def test_scalar_weights_keep_their_rank(tmp_path: Any, external_data: bool) -> None:
    lowered = qtrace.lower(small_model, (ShapeDtype(("B", 64)),))
    lowered.save(tmp_path / "m.onnx", external_data=external_data)
    model = onnx.load(str(tmp_path / "m.onnx"))
    scalars = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
               and int(np.prod(t.dims, dtype=np.int64)) == 1]
    assert scalars and all(s.shape == () for s in scalars)


def test_strided_weights_are_written_in_c_order(tmp_path: Any, monkeypatch: Any) -> None:
    from qtrace.lowering import save

    monkeypatch.setattr(save, "_CHUNK", 256)  # force the piecewise path on small arrays
    transposed = np.arange(40 * 24, dtype=np.float32).reshape(40, 24).T  # not C-contiguous
    broadcast = np.broadcast_to(np.arange(24, dtype=np.float32), (30, 24))  # stride 0
    lowered = qtrace.lower(lambda x: x @ transposed[:, :24] + broadcast[:3], (ShapeDtype((3, 24)),))
    lowered.save(tmp_path / "m.onnx", external_data=True, size_threshold=0)
    x = np.random.default_rng(1).standard_normal((3, 24)).astype(np.float32)
    (got,) = _session(str(tmp_path / "m.onnx")).run(None, {"x": x})
    assert_matches(got, x @ np.ascontiguousarray(transposed)[:, :24] + np.ascontiguousarray(broadcast)[:3])


def test_saved_files_have_the_permissions_of_ordinary_files(tmp_path: Any) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(b"")  # what open() gives a new file under this process's umask
    lowered = qtrace.lower(small_model, (ShapeDtype(("B", 64)),))
    for path in lowered.save(tmp_path / "m.onnx", external_data=True):
        assert os.stat(path).st_mode & 0o777 == os.stat(probe).st_mode & 0o777, path


def test_saving_over_an_existing_model_replaces_it(tmp_path: Any) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not a model")
    qtrace.lower(small_model, (ShapeDtype(("B", 64)),)).save(path)
    onnx.checker.check_model(str(path), full_check=True)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
