"""The Cloud AI 100 KV-cache ops in lowered models (design.md §5): the exact node contract the
compiler matches (op_type, domain, input order), and answers on onnxruntime that honour the index
conventions the hardware relies on: padding position -1, INT32_MAX as the invalid index, and
continuous batching with batch_index out of order.

The references here are loops written from the table in §5, not the primitives' numpy code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype

from conftest import examples
from test_kv_cache import gather_inputs, scatter_inputs
from test_lowering import INT32_MAX, assert_matches, save_and_check

QUALCOMM = "com.qualcomm.cloud"
QTI_AISW = "com.qti.aisw.onnx"
INDEX_DTYPES = ["int64", "int32"]


# -- references from §5 -----------------------------------------------------------------------------------


def reference_scatter(data: np.ndarray, slots: np.ndarray, positions: np.ndarray, updates: np.ndarray, *,
                      continuous_batching: bool) -> np.ndarray:
    """out[slot[b], (:,) p, :] = updates[b, (:,) s, :]; -1 is the last slot (non-CB) or nothing (CB);
    INT32_MAX writes nothing."""
    out = data.copy()
    ctx_len = data.shape[-2]
    for b in range(positions.shape[0]):
        for s in range(positions.shape[1]):
            p = int(positions[b, s])
            if continuous_batching and p < 0:
                p = INT32_MAX
            if p == INT32_MAX:
                continue
            if p < 0:
                p += ctx_len
            out[int(slots[b])][..., p, :] = updates[b][..., s, :]
    return out


def reference_gather(data: np.ndarray, slots: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """out[b, (h,) k, :] = data[slot[b], (h,) indices[b|0, (h|0,) k], :]; INT32_MAX reads index 0."""
    batch, reads = len(slots), indices.shape[-1]
    heads = data.shape[1] if data.ndim == 4 else None
    out = np.zeros((batch,) + ((heads,) if heads else ()) + (reads, data.shape[-1]), data.dtype)
    for b in range(batch):
        bi = b if indices.shape[0] > 1 else 0
        for h in range(heads or 1):
            for k in range(reads):
                if heads:
                    i = int(indices[bi, h if indices.shape[1] > 1 else 0, k])
                    out[b, h, k] = data[int(slots[b]), h, 0 if i == INT32_MAX else i]
                else:
                    i = int(indices[bi, k])
                    out[b, k] = data[int(slots[b]), 0 if i == INT32_MAX else i]
    return out


def _node(lowered: Any, op_type: str) -> Any:
    nodes = [n for n in lowered.model.graph.node if n.op_type == op_type]
    assert len(nodes) == 1, f"expected one {op_type} node, found {[n.op_type for n in lowered.model.graph.node]}"
    return nodes[0]


def _initializer(lowered: Any, name: str) -> np.ndarray:
    matches = [t for t in lowered.model.graph.initializer if t.name == name]
    assert len(matches) == 1, f"{name} is not an initializer"
    return numpy_helper.to_array(matches[0])


# -- the node contract ------------------------------------------------------------------------------------
def scatter(past_key: Any, position_ids: Any, updates: Any) -> Any:
    return qp.ctx_scatter(past_key, position_ids, updates)


def scatter_cb(past_key: Any, batch_index: Any, position_ids: Any, updates: Any) -> Any:
    return qp.ctx_scatter_cb(past_key, batch_index, position_ids, updates)


def gather(past_key: Any, ctx_indices: Any) -> Any:
    return qp.ctx_gather(past_key, ctx_indices)


def gather_cb(past_key: Any, batch_index: Any, ctx_indices: Any) -> Any:
    return qp.ctx_gather_cb(past_key, batch_index, ctx_indices)


def gather_blocked(past_key: Any, ctx_indices: Any) -> Any:
    return qp.ctx_gather_blocked_kv(past_key, ctx_indices)


def gather_blocked_cb(past_key: Any, batch_index: Any, ctx_indices: Any) -> Any:
    return qp.ctx_gather_blocked_kv_cb(past_key, batch_index, ctx_indices)


def _specs(rank: int, *names: str, index_dtype: str = "int64", cache_dtype: str = "float32",
           index_heads: int = 1) -> tuple[ShapeDtype, ...]:
    """Specs for the named arguments; with continuous batching (a batch_index) the cache has N slots."""
    heads = (2,) if rank == 4 else ()
    slots = "N" if "batch_index" in names else "B"
    shapes = {
        "past_key": ShapeDtype((slots,) + heads + ("C", 4), cache_dtype),
        "batch_index": ShapeDtype(("B", 1), index_dtype),
        "position_ids": ShapeDtype(("B", "S"), index_dtype),
        "updates": ShapeDtype(("B",) + heads + ("S", 4), cache_dtype),
        "ctx_indices": ShapeDtype(("B",) + ((index_heads,) if rank == 4 else ()) + (6,), index_dtype),
    }
    return tuple(shapes[n] for n in names)


CONTRACT = [  # function, rank, inputs, op_type, ONNX inputs (graph input names; "K" = comp_ctx_len), spec options
    (scatter, 4, ("past_key", "position_ids", "updates"), "CtxScatter", ["past_key", "position_ids", "updates"], {}),
    (scatter, 3, ("past_key", "position_ids", "updates"), "CtxScatter3D", ["past_key", "position_ids", "updates"], {}),
    (scatter, 3, ("past_key", "position_ids", "updates"), "CtxScatter3DInt", ["past_key", "position_ids", "updates"],
     {"cache_dtype": "int32", "index_dtype": "int32"}),
    (scatter_cb, 4, ("past_key", "batch_index", "position_ids", "updates"), "CtxScatterCB",
     ["past_key", "batch_index", "position_ids", "updates"], {}),
    (scatter_cb, 3, ("past_key", "batch_index", "position_ids", "updates"), "CtxScatterCB3D",
     ["past_key", "batch_index", "position_ids", "updates"], {}),
    (gather, 4, ("past_key", "ctx_indices"), "CtxGather", ["past_key", "ctx_indices", "K"], {}),
    (gather, 3, ("past_key", "ctx_indices"), "CtxGather3D", ["past_key", "ctx_indices"], {}),
    (gather_blocked, 4, ("past_key", "ctx_indices"), "CtxGatherBlockedKV", ["past_key", "ctx_indices"],
     {"index_heads": 2}),
    (gather_cb, 4, ("past_key", "batch_index", "ctx_indices"), "CtxGatherCB", ["past_key", "batch_index",
                                                                              "ctx_indices", "K"], {}),
    (gather_cb, 3, ("past_key", "batch_index", "ctx_indices"), "CtxGatherCB3D", ["past_key", "batch_index",
                                                                                "ctx_indices"], {}),
    (gather_blocked_cb, 4, ("past_key", "batch_index", "ctx_indices"), "CtxGatherBlockedKVCB",
     ["past_key", "batch_index", "ctx_indices"], {}),
]
CONTRACT_IDS = [c[3] for c in CONTRACT]


@pytest.mark.parametrize("fn, rank, names, op_type, onnx_inputs, options", CONTRACT, ids=CONTRACT_IDS)
def test_ctx_node_has_the_contract_op_type_domain_and_inputs(fn, rank, names, op_type, onnx_inputs, options) -> None:
    lowered = qtrace.lower(fn, _specs(rank, *names, **options))
    node = _node(lowered, op_type)
    assert node.domain == QUALCOMM
    assert len(node.input) == len(onnx_inputs)
    for got, expected in zip(node.input, onnx_inputs):
        if expected == "K":  # comp_ctx_len: an int64 scalar holding the number of rows read
            value = _initializer(lowered, got)
            assert value.dtype == np.int64 and value.shape == () and value == 6
        else:
            assert got == expected


@pytest.mark.parametrize("fn, rank, names, op_type, onnx_inputs, options", CONTRACT, ids=CONTRACT_IDS)
def test_ctx_op_is_a_model_function_in_its_domain(fn, rank, names, op_type, onnx_inputs, options) -> None:
    model = qtrace.lower(fn, _specs(rank, *names, **options)).model
    functions = [(f.domain, f.name) for f in model.functions]
    assert (QUALCOMM, op_type) in functions
    assert {(o.domain, o.version) for o in model.opset_import} >= {(QUALCOMM, 1)}


def test_rms_norm_is_custom_rms_norm_with_epsilon() -> None:
    weight = np.linspace(0.5, 1.5, 8).astype(np.float32)
    lowered = qtrace.lower(lambda hidden: qp.rms_norm(hidden, weight, eps=1e-5), (ShapeDtype(("B", 8)),))
    node = _node(lowered, "CustomRMSNorm")
    assert node.domain == QTI_AISW
    assert node.input[0] == "hidden"
    np.testing.assert_array_equal(_initializer(lowered, node.input[1]), weight)
    (epsilon,) = [a for a in node.attribute if a.name == "epsilon"]
    assert epsilon.f == pytest.approx(1e-5)
    assert (QTI_AISW, 1) in {(o.domain, o.version) for o in lowered.model.opset_import}


def test_gather_with_symbolic_read_length_feeds_it_at_run_time() -> None:
    lowered = qtrace.lower(gather, (ShapeDtype(("B", 2, "C", 4)), ShapeDtype(("B", 1, "K"), "int64")))
    rng = np.random.default_rng(0)
    for reads in (1, 7):
        data = rng.standard_normal((2, 2, 9, 4)).astype(np.float32)
        indices = rng.integers(0, 9, (2, 1, reads))
        assert_matches(lowered.run(data, indices), reference_gather(data, np.arange(2), indices))


# -- index conventions on onnxruntime ---------------------------------------------------------------------
def _cache(rng: np.random.Generator, rank: int, batch: int, ctx_len: int = 6) -> np.ndarray:
    shape = (batch, 2, ctx_len, 3) if rank == 4 else (batch, ctx_len, 3)
    return rng.standard_normal(shape).astype(np.float32)


def _updates(rng: np.random.Generator, rank: int, batch: int, seq: int) -> np.ndarray:
    shape = (batch, 2, seq, 3) if rank == 4 else (batch, seq, 3)
    return rng.standard_normal(shape).astype(np.float32)


def _lower_scatter(rank: int, index_dtype: str, cb: bool) -> Any:
    heads = (2,) if rank == 4 else ()
    cache = ShapeDtype(("N" if cb else "B",) + heads + ("C", 3))
    positions = ShapeDtype(("B", "S"), index_dtype)
    updates = ShapeDtype(("B",) + heads + ("S", 3))
    if cb:
        return qtrace.lower(scatter_cb, (cache, ShapeDtype(("B", 1), index_dtype), positions, updates))
    return qtrace.lower(scatter, (cache, positions, updates))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("rank", [4, 3])
def test_scatter_padding_position_writes_the_last_slot(rank: int, index_dtype: str) -> None:
    rng = np.random.default_rng(1)
    data, updates = _cache(rng, rank, 2), _updates(rng, rank, 2, 3)
    positions = np.array([[0, 1, -1], [3, -1, 4]], index_dtype)
    got = _lower_scatter(rank, index_dtype, cb=False).run(data, positions, updates)
    expected = reference_scatter(data, np.arange(2), positions, updates, continuous_batching=False)
    assert_matches(got, expected)
    assert not np.array_equal(expected[..., -1, :], data[..., -1, :])  # the last slot really was written


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("rank", [4, 3])
def test_scatter_at_int32_max_writes_nothing(rank: int, index_dtype: str) -> None:
    rng = np.random.default_rng(2)
    data, updates = _cache(rng, rank, 2), _updates(rng, rank, 2, 3)
    positions = np.array([[2, INT32_MAX, 5], [INT32_MAX, INT32_MAX, INT32_MAX]], index_dtype)
    got = _lower_scatter(rank, index_dtype, cb=False).run(data, positions, updates)
    assert_matches(got, reference_scatter(data, np.arange(2), positions, updates, continuous_batching=False))
    assert_matches(got[1], data[1])


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("rank", [4, 3])
def test_cb_scatter_writes_rows_to_out_of_order_slots(rank: int, index_dtype: str) -> None:
    rng = np.random.default_rng(3)
    data, updates = _cache(rng, rank, 4), _updates(rng, rank, 3, 2)
    batch_index = np.array([[3], [0], [2]], index_dtype)
    positions = np.array([[0, 1], [4, 2], [5, 3]], index_dtype)
    got = _lower_scatter(rank, index_dtype, cb=True).run(data, batch_index, positions, updates)
    assert_matches(got, reference_scatter(data, batch_index[:, 0], positions, updates, continuous_batching=True))
    assert_matches(got[1], data[1])  # the slot no row names is untouched


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("rank", [4, 3])
def test_cb_scatter_padding_and_int32_max_write_nothing(rank: int, index_dtype: str) -> None:
    rng = np.random.default_rng(4)
    data, updates = _cache(rng, rank, 3), _updates(rng, rank, 2, 3)
    batch_index = np.array([[2], [1]], index_dtype)
    positions = np.array([[0, -1, INT32_MAX], [-1, 3, -1]], index_dtype)
    got = _lower_scatter(rank, index_dtype, cb=True).run(data, batch_index, positions, updates)
    expected = reference_scatter(data, batch_index[:, 0], positions, updates, continuous_batching=True)
    assert_matches(got, expected)
    assert_matches(got[..., -1, :], data[..., -1, :])  # -1 did not write the last slot


def _lower_gather(rank: int, index_dtype: str, cb: bool, per_batch: bool = True) -> Any:
    heads = (2,) if rank == 4 else ()
    cache = ShapeDtype(("N" if cb else "B",) + heads + ("C", 3))
    indices = ShapeDtype((("B" if per_batch else 1),) + ((1,) if rank == 4 else ()) + ("K",), index_dtype)
    if cb:
        return qtrace.lower(gather_cb, (cache, ShapeDtype(("B", 1), index_dtype), indices))
    return qtrace.lower(gather, (cache, indices))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("rank", [4, 3])
def test_gather_at_int32_max_reads_index_0(rank: int, index_dtype: str) -> None:
    rng = np.random.default_rng(5)
    data = _cache(rng, rank, 2)
    indices = np.array([[5, INT32_MAX, 2, INT32_MAX], [INT32_MAX, 0, 1, 3]], index_dtype)
    indices = indices[:, None, :] if rank == 4 else indices
    got = _lower_gather(rank, index_dtype, cb=False).run(data, indices)
    assert_matches(got, reference_gather(data, np.arange(2), indices))
    assert_matches(got[0][..., 1, :], data[0][..., 0, :])


@pytest.mark.parametrize("rank", [4, 3])
def test_gather_broadcasts_one_index_row_over_the_batch(rank: int) -> None:
    rng = np.random.default_rng(6)
    data = _cache(rng, rank, 3)
    indices = np.array([[4, 0, INT32_MAX]])
    indices = indices[:, None, :] if rank == 4 else indices
    got = _lower_gather(rank, "int64", cb=False, per_batch=False).run(data, indices)
    assert_matches(got, reference_gather(data, np.arange(3), indices))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("rank", [4, 3])
def test_cb_gather_reads_out_of_order_slots_with_int32_max(rank: int, index_dtype: str) -> None:
    rng = np.random.default_rng(7)
    data = _cache(rng, rank, 4)
    batch_index = np.array([[2], [0], [3]], index_dtype)
    indices = np.array([[1, INT32_MAX, 5], [0, 2, INT32_MAX], [INT32_MAX, 4, 3]], index_dtype)
    indices = indices[:, None, :] if rank == 4 else indices
    got = _lower_gather(rank, index_dtype, cb=True).run(data, batch_index, indices)
    assert_matches(got, reference_gather(data, batch_index[:, 0], indices))


# -- a decode step as §6 describes it --------------------------------------------------------------------
def decode_step(past_key: Any, position_ids: Any, new_key: Any) -> Any:
    """Write the new rows, then read the whole cache back with every slot past the last position invalid."""
    retained = qp.ctx_scatter(past_key, position_ids, new_key)
    ctx_len = past_key.shape[2]
    slots = qp.arange(ctx_len)[None, None, :]
    last = qp.max(position_ids, axis=1, keepdims=True)[:, :, None]
    ctx_indices = np.where(slots > last, INT32_MAX, slots)
    return {"keys": qp.ctx_gather(retained, ctx_indices, ctx_len), "past_key": retained}


def test_decode_step_reads_back_what_it_wrote(tmp_path: Any) -> None:
    specs = (ShapeDtype(("B", 2, "C", 4)), ShapeDtype(("B", "S"), "int64"), ShapeDtype(("B", 2, "S", 4)))
    lowered = qtrace.lower(decode_step, specs, output_names=["keys", "past_key_RetainedState"])
    save_and_check(lowered, tmp_path)
    rng = np.random.default_rng(8)
    for batch, seq, ctx_len in ((2, 3, 8), (1, 1, 5)):
        past = rng.standard_normal((batch, 2, ctx_len, 4)).astype(np.float32)
        positions = np.stack([np.arange(seq) + b for b in range(batch)]).astype(np.int64)
        new = rng.standard_normal((batch, 2, seq, 4)).astype(np.float32)
        got = lowered.run(past, positions, new)
        retained = reference_scatter(past, np.arange(batch), positions, new, continuous_batching=False)
        indices = np.arange(ctx_len)[None, None, :].repeat(batch, 0)
        indices = np.where(indices > positions.max(1)[:, None, None], INT32_MAX, indices)
        assert_matches(got["past_key"], retained)
        assert_matches(got["keys"], reference_gather(retained, np.arange(batch), indices))


# -- the blocked-KV reads and the int32 index scatter on onnxruntime, one model at two sizes ----------------


TWO_SIZES = [(2, 3, 8), (3, 4, 13)]  # (batch, block length, ctx_len)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_blocked_kv_read_runs_at_two_sizes(tmp_path: Any, index_dtype: str) -> None:
    lowered = qtrace.lower(gather_blocked, (ShapeDtype(("B", 2, "C", 3)), ShapeDtype(("B", 2, "K"), index_dtype)))
    save_and_check(lowered, tmp_path)
    rng = np.random.default_rng(9)
    for batch, block, ctx_len in TWO_SIZES:
        data = _cache(rng, 4, batch, ctx_len)
        start, live = ctx_len - block - 1, ctx_len - 3  # a block ending before the cache does
        indices = np.arange(start, start + block)
        indices = np.where(indices > live, INT32_MAX, indices)[None, None].repeat(batch, 0).repeat(2, 1)
        indices[0, 1, 0] = -1  # counts from the end
        indices = indices.astype(index_dtype)
        got = lowered.run(data, indices)
        assert_matches(got, reference_gather(data, np.arange(batch), indices))
        assert_matches(got, qp.ctx_gather_blocked_kv(data, indices))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_blocked_kv_cb_read_runs_at_two_sizes(tmp_path: Any, index_dtype: str) -> None:
    specs = (ShapeDtype(("N", 2, "C", 3)), ShapeDtype(("B", 1), index_dtype), ShapeDtype(("B", 1, "K"), index_dtype))
    lowered = qtrace.lower(gather_blocked_cb, specs)
    save_and_check(lowered, tmp_path)
    rng = np.random.default_rng(10)
    for batch, block, ctx_len in TWO_SIZES:
        data = _cache(rng, 4, batch + 2, ctx_len)
        batch_index = rng.permutation(batch + 2)[:batch].reshape(batch, 1).astype(index_dtype)  # out of order
        indices = rng.integers(-ctx_len, ctx_len, (batch, 1, block))
        indices[rng.random(indices.shape) < 0.3] = INT32_MAX
        indices = indices.astype(index_dtype)
        got = lowered.run(data, batch_index, indices)
        assert_matches(got, reference_gather(data, batch_index[:, 0], indices))
        assert_matches(got, qp.ctx_gather_blocked_kv_cb(data, batch_index, indices))


def test_int32_index_scatter_runs_at_two_sizes(tmp_path: Any) -> None:
    specs = (ShapeDtype(("B", "C", 1), "int32"), ShapeDtype(("B", "S"), "int32"), ShapeDtype(("B", "S", 1), "int32"))
    lowered = qtrace.lower(scatter, specs)
    assert [n.op_type for n in lowered.model.graph.node] == ["CtxScatter3DInt"]
    save_and_check(lowered, tmp_path)
    rng = np.random.default_rng(11)
    for batch, seq in ((2, 5), (3, 9)):
        table = np.full((batch, seq, 1), INT32_MAX, np.int32)
        routed = rng.random((batch, seq)) < 0.5
        destinations = np.where(routed, np.cumsum(routed, axis=1) - 1, INT32_MAX).astype(np.int32)
        tokens = np.arange(seq, dtype=np.int32)[None, :, None].repeat(batch, 0)
        got = lowered.run(table, destinations, tokens)
        assert_matches(got, reference_scatter(table, np.arange(batch), destinations, tokens, continuous_batching=False))
        for b in range(batch):  # the packed -> original token table
            packed = np.flatnonzero(routed[b])
            np.testing.assert_array_equal(got[b, :len(packed), 0], packed)
            assert (got[b, len(packed):, 0] == INT32_MAX).all()


# -- property: the lowered op (its function body on onnxruntime) equals the primitive's numpy reference -----


LOWERED_MODES = [  # (qtrace call, continuous batching, blocked) for every ctx primitive mode
    pytest.param(qp.ctx_scatter, False, False, id="ctx_scatter"),
    pytest.param(qp.ctx_scatter_cb, True, False, id="ctx_scatter_cb"),
    pytest.param(qp.ctx_gather, False, False, id="ctx_gather"),
    pytest.param(qp.ctx_gather_cb, True, False, id="ctx_gather_cb"),
    pytest.param(qp.ctx_gather_blocked_kv, False, True, id="ctx_gather_blocked_kv"),
    pytest.param(qp.ctx_gather_blocked_kv_cb, True, True, id="ctx_gather_blocked_kv_cb"),
]


@pytest.mark.parametrize("call, continuous_batching, blocked", LOWERED_MODES)
@settings(max_examples=examples(0.4))
@given(data=st.data())
def test_lowered_ctx_op_matches_the_numpy_reference(call, continuous_batching, blocked, data) -> None:
    """Random shapes, dtypes, padding -1, INT32_MAX and out-of-order cache slots (test_kv_cache's inputs)."""
    if call in (qp.ctx_scatter, qp.ctx_scatter_cb):
        arrays = data.draw(scatter_inputs(continuous_batching))
    else:
        arrays = data.draw(gather_inputs(continuous_batching, blocked))
    lowered = qtrace.lower(call, tuple(ShapeDtype.of(a) for a in arrays))
    assert_matches(lowered.run(*arrays), call(*arrays))
