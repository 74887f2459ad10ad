"""Weights converted while they are written (qtrace/weights.py, lowering/save.py): a checkpoint tensor of
another dtype than the export's is a `ConvertedWeight` that tracing, passes and lowering never read;
saving converts it piece by piece, and what lands in the file equals numpy's conversion bit for bit
(float16 clipping included), however the pieces fall.

Truths: numpy's own casts (ml_dtypes for bfloat16), a float16 clip written out here, the bytes read back
from the saved files, onnxruntime, and the process's anonymous memory (/proc/self/status RssAnon).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import pytest

import qtrace
import qtrace.primitives as qp
import qtrace.weights as weights
from qtrace.dtypes import bfloat16
from qtrace.weights import ConvertedWeight, c_order_pieces, lazy_cast

from conftest import PeakAnonymousMemory

F16_MAX = 65504.0
# Values where conversions go wrong: signed zeros, float16's edges and just past them, subnormals,
# infinities, NaN, bfloat16's largest values.
SPECIAL = np.array([0.0, -0.0, 1.0, -1.5, 65504.0, -65504.0, 65519.0, 65520.0, 70000.0, -1e5, 1e38, -3.0e38,
                    6e-8, 1e-40, -1e-45, np.inf, -np.inf, np.nan, 2.0**-24, 3.14159], dtype=np.float32)


def numpy_float16(x: np.ndarray) -> np.ndarray:
    """float16 as exports want it: finite values clipped to ±65504, then numpy's cast."""
    x32 = np.asarray(x, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.where(np.isfinite(x32), np.clip(x32, -F16_MAX, F16_MAX), x32).astype(np.float16)


def numpy_conversion(source: np.ndarray, dtype: Any) -> np.ndarray:
    return numpy_float16(source) if np.dtype(dtype) == np.float16 else np.asarray(source).astype(dtype)


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(f"u{array.dtype.itemsize}")


def source_values(dtype: Any, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        values = np.concatenate([SPECIAL, (rng.standard_normal(size - len(SPECIAL)) * 3e4).astype(np.float32)])
        return values.astype(dtype)


CONVERSIONS = [(bfloat16, np.float32), (bfloat16, np.float16), (np.float32, np.float16), (np.float16, np.float32)]


def _name(conversion: tuple[Any, Any]) -> str:
    return f"{np.dtype(conversion[0]).name}->{np.dtype(conversion[1]).name}"


# -- conversion --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conversion", CONVERSIONS, ids=_name)
@pytest.mark.parametrize("piece_bytes", [6, 100, 1000, 1 << 20])
@pytest.mark.parametrize("reuse", [False, True], ids=["new", "reused"])
def test_pieces_equal_numpy_conversion_bit_for_bit(conversion: tuple[Any, Any], piece_bytes: int,
                                                   reuse: bool) -> None:
    source_dtype, dtype = conversion
    source = source_values(source_dtype, 997).reshape(1, 997)  # a prime: pieces never divide it evenly
    pieces = [piece.copy() for piece in c_order_pieces(ConvertedWeight(source, dtype), piece_bytes, reuse=reuse)]
    assert len(pieces) >= min(3, 997 * np.dtype(dtype).itemsize // piece_bytes)
    got = np.concatenate(pieces)
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(bits(got), bits(numpy_conversion(source, dtype)))


@pytest.mark.parametrize("conversion", CONVERSIONS, ids=_name)
@pytest.mark.parametrize("layout", ["matrix", "transposed", "scalar"])
def test_whole_conversion_equals_numpy_bit_for_bit(conversion: tuple[Any, Any], layout: str) -> None:
    source_dtype, dtype = conversion
    source = source_values(source_dtype, 300).reshape(10, 30)
    source = {"matrix": source, "transposed": source.T, "scalar": source[0, 8]}[layout]
    got = np.asarray(ConvertedWeight(np.asarray(source), dtype))
    assert got.shape == np.shape(source) and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(bits(got), bits(numpy_conversion(source, dtype)))


def test_strided_source_is_converted_in_c_order() -> None:
    source = source_values(bfloat16, 600).reshape(20, 30).T  # not contiguous: read row block by row block
    got = np.concatenate(list(c_order_pieces(ConvertedWeight(source, np.float16), 64)))
    np.testing.assert_array_equal(bits(got), bits(numpy_float16(source)))


def test_memory_mapped_source_converts_from_the_file(tmp_path: Any) -> None:
    source = source_values(bfloat16, 4096)
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\xff" * 24 + source.tobytes())
    mapped = np.memmap(path, dtype=bfloat16, mode="r", offset=24, shape=(64, 64))
    got = np.concatenate(list(c_order_pieces(lazy_cast(mapped, np.float32), 1000)))
    np.testing.assert_array_equal(bits(got), bits(source.astype(np.float32)))


def test_lazy_cast_keeps_an_array_of_the_target_dtype() -> None:
    array = np.ones((3, 4), np.float32)
    assert lazy_cast(array, np.float32) is array


def test_lazy_cast_describes_the_converted_array_without_reading_it() -> None:
    weight = lazy_cast(np.zeros((6, 5), bfloat16), np.float32)
    assert isinstance(weight, ConvertedWeight)
    assert (weight.shape, weight.dtype, weight.nbytes, weight.ndim) == ((6, 5), np.dtype(np.float32), 120, 2)
    assert weight.source_dtype == bfloat16


def test_widening_then_float16_is_one_conversion_from_the_source() -> None:
    source = source_values(bfloat16, 200)
    twice = lazy_cast(lazy_cast(source, np.float32), np.float16)
    assert twice.source is source
    np.testing.assert_array_equal(bits(np.asarray(twice)), bits(numpy_float16(source)))


def test_indexing_a_converted_weight_converts_the_indexed_source() -> None:
    source = source_values(bfloat16, 120).reshape(12, 10)
    rows = lazy_cast(source, np.float16)[4:9]
    assert isinstance(rows, ConvertedWeight) and rows.shape == (5, 10)
    np.testing.assert_array_equal(bits(np.asarray(rows)), bits(numpy_float16(source[4:9])))


# -- tracing, passes and lowering never read a converted weight --------------------------------------------


@pytest.fixture
def conversions(monkeypatch: Any) -> list[tuple[Any, Any]]:
    """Every conversion qtrace.weights performs: (source shape, target dtype)."""
    calls: list[tuple[Any, Any]] = []
    real, real_into = weights.convert, weights._convert_into

    def counting(array: np.ndarray, dtype: Any) -> np.ndarray:
        calls.append((array.shape, np.dtype(dtype)))
        return real(array, dtype)

    def counting_into(array: np.ndarray, dtype: Any, buffer: np.ndarray) -> np.ndarray:
        calls.append((array.shape, np.dtype(dtype)))
        return real_into(array, dtype, buffer)

    monkeypatch.setattr(weights, "convert", counting)
    monkeypatch.setattr(weights, "_convert_into", counting_into)
    return calls


def _linear_model(kernel: Any, table: Any) -> Any:
    def model(ids: Any) -> Any:
        return qp.take(table, ids, axis=0) @ qp.transpose(kernel)

    return model


def _checkpoint(tmp_path: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.memmap]:
    """The arrays as read-only memory maps of one file (as the checkpoint loader reads them)."""
    path, offset, maps = tmp_path / "checkpoint.bin", 0, {}
    with open(path, "wb") as f:
        for name, array in arrays.items():
            f.write(array.tobytes())
            maps[name] = (offset, array)
            offset += array.nbytes
    return {name: np.memmap(path, dtype=a.dtype, mode="r", offset=o, shape=a.shape) for name, (o, a) in maps.items()}


def test_lowering_converts_nothing_and_saving_converts_every_piece(tmp_path: Any,
                                                                   conversions: list[Any]) -> None:
    rng = np.random.default_rng(1)
    mapped = _checkpoint(tmp_path, {"kernel": rng.standard_normal((96, 64)).astype(bfloat16),
                                    "table": rng.standard_normal((50, 64)).astype(bfloat16)})
    kernel, table = lazy_cast(mapped["kernel"], np.float32), lazy_cast(mapped["table"], np.float32)
    lowered = qtrace.lower(_linear_model(kernel, table), (qtrace.ShapeDtype(("n",), np.int64),))
    assert conversions == []
    assert sum(isinstance(w, ConvertedWeight) for w in lowered.parts.weights.values()) == 2
    # The transpose of a weight still to convert is not folded: it stays a Transpose in the model.
    assert "Transpose" in {n.op_type for n in lowered.parts.model.graph.node}

    stored: list[Any] = []
    lowered.save(tmp_path / "out" / "model.onnx", external_data=True, on_weight=stored.append)
    assert conversions  # converted while written
    assert {(s.how, s.source_dtype, s.dtype) for s in stored} == {("converted", bfloat16, np.dtype(np.float32))}
    assert sum(s.nbytes for s in stored) == (96 + 50) * 64 * 4
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    saved = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for name, source in (("kernel", mapped["kernel"]), ("table", mapped["table"])):
        np.testing.assert_array_equal(bits(saved[name]), bits(np.asarray(source).astype(np.float32)))

    ids = np.array([3, 0, 49, 7])
    expected = np.asarray(table)[ids] @ np.asarray(kernel).T
    np.testing.assert_allclose(lowered.run(ids), expected, rtol=1e-5, atol=1e-4)


def test_float16_lowering_of_a_mapped_float32_weight_converts_it_when_saved(tmp_path: Any,
                                                                            conversions: list[Any]) -> None:
    rng = np.random.default_rng(2)
    values = (rng.standard_normal((40, 32)) * 3e4).astype(np.float32)
    values[0, :4] = [1e6, -1e9, np.inf, -np.inf]
    mapped = _checkpoint(tmp_path, {"kernel": values, "table": values[:8].copy()})
    lowered = qtrace.lower(_linear_model(mapped["kernel"], mapped["table"]), (qtrace.ShapeDtype(("n",), np.int64),),
                           dtype=np.float16)
    assert conversions == []
    converted = [w for w in lowered.parts.weights.values() if isinstance(w, ConvertedWeight)]
    assert len(converted) == 2 and all(w.dtype == np.float16 for w in converted)
    lowered.save(tmp_path / "out" / "model.onnx", external_data=True)
    model = onnx.load(str(tmp_path / "out" / "model.onnx"))
    saved = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(bits(saved["kernel"]), bits(numpy_float16(values)))


def test_in_memory_weight_transpose_is_still_folded() -> None:
    kernel = np.random.default_rng(3).standard_normal((96, 64)).astype(np.float32)
    table = np.ones((50, 64), np.float32)
    lowered = qtrace.lower(_linear_model(kernel, table), (qtrace.ShapeDtype(("n",), np.int64),))
    assert "Transpose" not in {n.op_type for n in lowered.parts.model.graph.node}


# -- zero-copy references --------------------------------------------------------------------------------


def test_reference_mode_points_into_the_file_and_writes_only_conversions(tmp_path: Any) -> None:
    rng = np.random.default_rng(4)
    fused = rng.standard_normal((96, 64)).astype(np.float32)  # split into two row blocks, as fused q/k/v are
    halves = rng.standard_normal((50, 64)).astype(np.float16)
    mapped = _checkpoint(tmp_path, {"fused": fused, "halves": halves})
    top, bottom = mapped["fused"][:40], mapped["fused"][40:]
    table = lazy_cast(mapped["halves"], np.float32)

    def model(ids: Any) -> Any:
        return qp.take(table, ids, axis=0) @ qp.transpose(top) + (qp.take(table, ids, axis=0) @ qp.transpose(bottom))[
            :, :40]

    lowered = qtrace.lower(model, (qtrace.ShapeDtype(("n",), np.int64),))
    stored: list[Any] = []
    out = tmp_path / "out"
    lowered.save(out / "model.onnx", external_data=True, reference_weights=True, on_weight=stored.append)
    how = {s.name: s.how for s in stored if s.nbytes >= 1024}
    assert sorted(how.values()) == ["converted", "referenced", "referenced"]
    assert os.path.getsize(out / "model.onnx.data") == halves.size * 4  # only the conversion is written
    ids = np.array([0, 5, 49])
    expected = halves.astype(np.float32)[ids] @ fused[:40].T + (halves.astype(np.float32)[ids] @ fused[40:].T)[:, :40]
    np.testing.assert_allclose(lowered.run(ids), expected, rtol=1e-5, atol=1e-4)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"ids": ids})[0], expected, rtol=1e-5, atol=1e-4)


# -- memory ----------------------------------------------------------------------------------------------


def test_saving_a_converted_weight_holds_only_pieces_of_it(tmp_path: Any) -> None:
    rows, width = 24_576, 2048  # 96 MiB of bfloat16, 192 MiB of float32
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(rows * width * 2)  # zeros, and no disk
    table = lazy_cast(np.memmap(path, dtype=bfloat16, mode="r", shape=(rows, width)), np.float32)
    lowered = qtrace.lower(lambda ids: qp.take(table, ids, axis=0), (qtrace.ShapeDtype(("n",), np.int64),))
    with PeakAnonymousMemory() as memory:
        lowered.save(tmp_path / "out" / "model.onnx", external_data=True)
    assert os.path.getsize(tmp_path / "out" / "model.onnx.data") == table.nbytes
    assert memory.increase < table.nbytes / 4, f"{memory.increase / 2**20:.0f} MiB"  # a few pieces at most
