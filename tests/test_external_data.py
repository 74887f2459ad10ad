"""Saving models with external data (lowering/save.py): a model past protobuf's 2 GiB limit is written
as a small .onnx file plus external data, which onnx's checker accepts and onnxruntime runs from the
files; saving streams the weights without a second copy in memory; what is written reads back
exactly; smaller models save the same way when asked.

The > 2 GiB model costs almost nothing: its three 0.7 GiB weight tables are memory maps of one sparse
file (holes, plus a few rows of random data whose values are the truth), and it is saved with
`reference_weights=True`, so the external-data entries point into that file, at offsets past 2 GiB
for the last table, instead of copying it. The copying path is measured on a smaller model.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Iterator

import numpy as np
import onnx
import pytest
from numpy.lib.stride_tricks import as_strided
from onnx import numpy_helper

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype
from qtrace.lowering.session import inference_session

from conftest import PeakAnonymousMemory
from test_lowering import assert_matches

PROTOBUF_LIMIT = 2**31 - 1
WIDTH = 4096  # floats per row
ROWS = 46_000  # per table: three tables make 2.1 GiB
TABLE_BYTES = ROWS * WIDTH * 4
DATA_ROWS = (0, 7, 12_345, ROWS - 1)  # the rows that hold data; the rest of each table is a hole (zeros)
BIAS = np.linspace(-1, 1, WIDTH).astype(np.float32)  # 16 KiB: copied into the model's own data file


# -- the big model ----------------------------------------------------------------------------------------
def write_sparse_weights(path: str) -> dict[tuple[int, int], np.ndarray]:
    """Three [ROWS, WIDTH] float32 tables back to back in a sparse file; returns the rows with data."""
    rng = np.random.default_rng(2024)
    rows = {}
    with open(path, "wb") as f:
        f.truncate(3 * TABLE_BYTES)
        for table in range(3):
            for row in DATA_ROWS:
                rows[table, row] = rng.standard_normal(WIDTH).astype(np.float32)
                f.seek(table * TABLE_BYTES + row * WIDTH * 4)
                f.write(rows[table, row].tobytes())
    return rows


def expected_rows(data: dict[tuple[int, int], np.ndarray], ids: np.ndarray) -> np.ndarray:
    """From the rows written, not from the tables: any other row is zeros."""
    def row(k: int, i: int) -> np.ndarray:
        return data.get((k, i), np.zeros(WIDTH, np.float32))

    out = [(row(0, i) + row(1, i) - row(2, i)) * np.float32(0.5) + BIAS for i in ids.reshape(-1)]
    return np.stack(out).reshape(ids.shape + (WIDTH,)).astype(np.float32)


@pytest.fixture(scope="module")
def big(tmp_path_factory: Any) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("big_model")
    try:
        weights = str(directory / "weights.bin")  # beside the model: referenced in place, no link
        data = write_sparse_weights(weights)
        tables = [np.memmap(weights, np.float32, "r", offset=k * TABLE_BYTES, shape=(ROWS, WIDTH)) for k in range(3)]
        assert sum(t.nbytes for t in tables) > PROTOBUF_LIMIT

        def big_model(ids: Any) -> Any:
            rows = [qp.take(table, ids, axis=0) for table in tables]
            return (rows[0] + rows[1] - rows[2]) * 0.5 + BIAS

        lowered = qtrace.lower(big_model, (ShapeDtype(("B",), "int64"),))
        path = str(directory / "model.onnx")
        files = lowered.save(path, reference_weights=True)  # external_data=None: decided by the size
        yield {"lowered": lowered, "path": path, "files": files, "dir": directory, "data": data,
               "weights": weights}
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_big_model_saves_its_weights_as_external_data(big: dict[str, Any]) -> None:
    model_file, data_file, weights_file = big["files"]
    assert os.path.basename(data_file) == "model.onnx.data" and os.path.samefile(weights_file, big["weights"])
    assert os.path.getsize(model_file) < 1 << 20
    assert os.path.getsize(data_file) >= BIAS.nbytes


def test_big_model_passes_full_check(big: dict[str, Any]) -> None:
    onnx.checker.check_model(big["path"], full_check=True)


def test_big_model_external_data_reads_back_exactly(big: dict[str, Any]) -> None:
    model = onnx.load(big["path"], load_external_data=False)
    directory = os.path.dirname(big["path"])
    offsets = []
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:  # the 0.5: below the size threshold
            continue
        info = {e.key: e.value for e in tensor.external_data}
        stored = np.memmap(os.path.join(directory, info["location"]), dtype=np.float32, mode="r",
                           offset=int(info["offset"]), shape=tuple(tensor.dims))
        if tuple(tensor.dims) == BIAS.shape:
            assert info["location"] == "model.onnx.data"
            np.testing.assert_array_equal(stored, BIAS)
            continue
        assert info["location"] == "weights.bin"
        table = int(info["offset"]) // TABLE_BYTES
        offsets.append(int(info["offset"]))
        for row in DATA_ROWS:
            np.testing.assert_array_equal(stored[row], big["data"][table, row])
        np.testing.assert_array_equal(stored[100], np.zeros(WIDTH, np.float32))
        del stored
    assert sorted(offsets) == [0, TABLE_BYTES, 2 * TABLE_BYTES]
    assert 2 * TABLE_BYTES + (ROWS - 1) * WIDTH * 4 > PROTOBUF_LIMIT  # the last row lies past 2 GiB


def test_big_model_runs_on_onnxruntime_from_its_files(big: dict[str, Any]) -> None:
    session = inference_session(big["path"])
    ids = np.array([0, ROWS - 1, 12_345, 7, 100], np.int64)
    (got,) = session.run(None, {"ids": ids})
    assert_matches(got, expected_rows(big["data"], ids))
    del session


def test_big_model_is_not_embedded_in_one_protobuf(big: dict[str, Any]) -> None:
    with pytest.raises(qtrace.LoweringError, match="2 GiB"):
        big["lowered"].model  # noqa: B018 - the property is what raises


def test_save_leaves_only_the_model_its_data_and_the_referenced_weights(big: dict[str, Any]) -> None:
    assert sorted(os.listdir(big["dir"])) == ["model.onnx", "model.onnx.data", "weights.bin"]


# -- streaming: saving copies weights piece by piece ------------------------------------------------------
STREAMED_ROWS = 8192  # with WIDTH floats: 128 MiB per table


def test_saving_streams_the_weights_without_a_copy_in_memory(tmp_path: Any, monkeypatch: Any) -> None:
    from qtrace.lowering import save

    monkeypatch.setattr(save, "_CHUNK", 4 << 20)
    rng = np.random.default_rng(7)
    base = rng.standard_normal(STREAMED_ROWS + WIDTH).astype(np.float32)
    # Row i is base[i : i + WIDTH]: 128 MiB of weights that take 160 KiB of memory.
    table = as_strided(base, shape=(STREAMED_ROWS, WIDTH), strides=(4, 4), writeable=False)
    lowered = qtrace.lower(lambda ids: qp.take(table, ids, axis=0) * 2.0, (ShapeDtype(("B",), "int64"),))
    with PeakAnonymousMemory() as memory:
        lowered.save(tmp_path / "m.onnx", external_data=True)
    assert memory.increase < 0.25 * table.nbytes, f"anonymous memory rose by {memory.increase >> 20} MiB"
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    (tensor,) = [t for t in model.graph.initializer if tuple(t.dims) == table.shape]
    offset = int({e.key: e.value for e in tensor.external_data}["offset"])
    stored = np.memmap(tmp_path / "m.onnx.data", dtype=np.float32, mode="r", offset=offset, shape=table.shape)
    for i in (0, 1, 4099, STREAMED_ROWS - 1):
        np.testing.assert_array_equal(stored[i], base[i:i + WIDTH])
    del stored


# -- small models, external on request ---------------------------------------------------------------------
SMALL_WEIGHT = np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)


def small_model(x: Any) -> Any:
    return (x @ SMALL_WEIGHT[:, :16]) * 2.0 + np.float32(1.0)


def test_external_data_on_request_runs_from_the_files(tmp_path: Any) -> None:
    lowered = qtrace.lower(small_model, (ShapeDtype(("B", 64)),))
    files = lowered.save(tmp_path / "small.onnx", external_data=True)
    assert [os.path.basename(f) for f in files] == ["small.onnx", "small.onnx.data"]
    onnx.checker.check_model(str(tmp_path / "small.onnx"), full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    (got,) = inference_session(str(tmp_path / "small.onnx")).run(None, {"x": x})
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
    (got,) = inference_session(str(tmp_path / "m.onnx")).run(None, {"x": x})
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
