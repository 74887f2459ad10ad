"""The Cloud AI 100 KV-cache primitives (primitives/kv_cache.py, design.md section 5).

The truth is section 5 written as loops over batch, head and position:
- scatter: out[b, h, position_ids[b, s], :] = updates[b, h, s, :]; a negative position counts from
  the end (padding at -1 lands in the last slot); INT32_MAX writes nothing;
- continuous batching: row b goes to cache slot batch_index[b, 0]; negative positions write nothing;
- gather: out[b, h, k, :] = data[b, h, ctx_indices[b, h, k], :] with the indices broadcast over B and
  H; INT32_MAX reads index 0;
- indices are int32 or int64 and the data keeps its dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype

from conftest import INT32_MAX, assert_located, examples

INDEX_DTYPES = [np.int32, np.int64]
DATA_DTYPES = [np.float32, np.float16, np.int32]


# -- formulas (section 5, as loops) -------------------------------------------------------------------


def scatter_formula(data, position_ids, updates, batch_index=None):
    out = data.copy()
    ctx = data.shape[-2]
    batch, seq = position_ids.shape
    for b in range(batch):
        slot = b if batch_index is None else int(batch_index[b, 0])
        for s in range(seq):
            position = int(position_ids[b, s])
            if position == INT32_MAX or (batch_index is not None and position < 0):
                continue
            if position < 0:
                position += ctx
            if data.ndim == 4:
                for h in range(data.shape[1]):
                    out[slot, h, position, :] = updates[b, h, s, :]
            else:
                out[slot, position, :] = updates[b, s, :]
    return out


def gather_formula(data, ctx_indices, batch_index=None):
    batch = data.shape[0] if batch_index is None else batch_index.shape[0]
    keys = ctx_indices.shape[-1]
    if data.ndim == 4:
        heads = data.shape[1]
        out = np.empty((batch, heads, keys, data.shape[-1]), data.dtype)
        for b in range(batch):
            slot = b if batch_index is None else int(batch_index[b, 0])
            for h in range(heads):
                for k in range(keys):
                    row, head = min(b, ctx_indices.shape[0] - 1), min(h, ctx_indices.shape[1] - 1)  # broadcast
                    index = int(ctx_indices[row, head, k])
                    out[b, h, k, :] = data[slot, h, 0 if index == INT32_MAX else index, :]
        return out
    out = np.empty((batch, keys, data.shape[-1]), data.dtype)
    for b in range(batch):
        slot = b if batch_index is None else int(batch_index[b, 0])
        for k in range(keys):
            index = int(ctx_indices[min(b, ctx_indices.shape[0] - 1), k])
            out[b, k, :] = data[slot, 0 if index == INT32_MAX else index, :]
    return out


# -- random inputs ------------------------------------------------------------------------------------


def random_data(rng, shape, dtype):
    if np.dtype(dtype).kind == "i":
        return rng.integers(-100, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


@st.composite
def scatter_inputs(draw, continuous_batching):
    """Distinct write targets per row, some INT32_MAX, and padding -1 (at most once per row without
    continuous batching, where it writes the last slot)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    has_heads = draw(st.booleans())
    batch, ctx, dim = draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(1, 3))
    seq = draw(st.integers(1, min(4, ctx)))
    slots = draw(st.integers(batch, batch + 2)) if continuous_batching else batch
    heads = draw(st.integers(1, 3))
    data_dtype, index_dtype = draw(st.sampled_from(DATA_DTYPES)), draw(st.sampled_from(INDEX_DTYPES))
    rows = []
    for _ in range(batch):
        row = [int(p) for p in rng.permutation(ctx)[:seq]]
        for s in range(seq):
            kind = draw(st.sampled_from(["valid", "valid", "invalid", "padding"]))
            if kind == "invalid":
                row[s] = INT32_MAX
            elif kind == "padding" and (continuous_batching or (-1 not in row and ctx - 1 not in row)):
                row[s] = -1
        rows.append(row)
    position_ids = np.array(rows, dtype=index_dtype)
    cache = (slots, heads, ctx, dim) if has_heads else (slots, ctx, dim)
    new = (batch, heads, seq, dim) if has_heads else (batch, seq, dim)
    arrays = [random_data(rng, cache, data_dtype), position_ids, random_data(rng, new, data_dtype)]
    if continuous_batching:
        batch_index = rng.permutation(slots)[:batch].reshape(batch, 1).astype(draw(st.sampled_from(INDEX_DTYPES)))
        arrays.insert(1, batch_index)
    return tuple(arrays)


@st.composite
def gather_inputs(draw, continuous_batching, blocked=False):
    """A blocked-KV read has heads, and without continuous batching one index per (batch, head, key)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    has_heads = blocked or draw(st.booleans())
    batch, heads, ctx, dim, keys = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 5)),
                                    draw(st.integers(1, 3)), draw(st.integers(1, 6)))
    slots = draw(st.integers(batch, batch + 2)) if continuous_batching else batch
    data_dtype, index_dtype = draw(st.sampled_from(DATA_DTYPES)), draw(st.sampled_from(INDEX_DTYPES))
    exact = blocked and not continuous_batching
    index_batch = batch if continuous_batching or exact else draw(st.sampled_from([1, batch]))
    index_heads = heads if exact else draw(st.sampled_from([1, heads]))
    index_shape = (index_batch, index_heads, keys) if has_heads else (index_batch, keys)
    indices = rng.integers(0, ctx, size=index_shape)
    indices = np.where(rng.random(index_shape) < 0.25, INT32_MAX, indices).astype(index_dtype)
    data = random_data(rng, (slots, heads, ctx, dim) if has_heads else (slots, ctx, dim), data_dtype)
    if continuous_batching:
        batch_index = rng.permutation(slots)[:batch].reshape(batch, 1).astype(draw(st.sampled_from(INDEX_DTYPES)))
        return data, batch_index, indices
    return data, indices


def call_scatter(*arrays):
    return qp.ctx_scatter(*arrays) if len(arrays) == 3 else qp.ctx_scatter_cb(*arrays)


def call_gather(*arrays, blocked=False):
    if blocked:
        return qp.ctx_gather_blocked_kv(*arrays) if len(arrays) == 2 else qp.ctx_gather_blocked_kv_cb(*arrays)
    return qp.ctx_gather(*arrays) if len(arrays) == 2 else qp.ctx_gather_cb(*arrays)


SCATTERS = [pytest.param(False, id="ctx_scatter"), pytest.param(True, id="ctx_scatter_cb")]
GATHERS = [pytest.param(False, False, id="ctx_gather"), pytest.param(True, False, id="ctx_gather_cb"),
           pytest.param(False, True, id="ctx_gather_blocked_kv"), pytest.param(True, True, id="ctx_gather_blocked_kv_cb")]


# -- reference against the formula --------------------------------------------------------------------


@pytest.mark.parametrize("continuous_batching", SCATTERS)
@given(data=st.data())
def test_scatter_reference_matches_the_formula(continuous_batching, data):
    arrays = data.draw(scatter_inputs(continuous_batching))
    if continuous_batching:
        cache, batch_index, position_ids, updates = arrays
        expected = scatter_formula(cache, position_ids, updates, batch_index)
    else:
        expected = scatter_formula(*arrays)
    result = call_scatter(*arrays)
    assert result.dtype == expected.dtype
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("continuous_batching, blocked", GATHERS)
@given(data=st.data())
def test_gather_reference_matches_the_formula(continuous_batching, blocked, data):
    arrays = data.draw(gather_inputs(continuous_batching, blocked))
    if continuous_batching:
        cache, batch_index, indices = arrays
        expected = gather_formula(cache, indices, batch_index)
    else:
        expected = gather_formula(*arrays)
    result = call_gather(*arrays, blocked=blocked)
    assert result.dtype == expected.dtype
    np.testing.assert_array_equal(result, expected)


# -- tracing: shapes, dtypes and values equal eager ---------------------------------------------------


@pytest.mark.parametrize("continuous_batching", SCATTERS)
@settings(max_examples=examples(0.6))
@given(data=st.data())
def test_traced_scatter_has_the_eager_shape_dtype_and_values(continuous_batching, data):
    arrays = data.draw(scatter_inputs(continuous_batching))
    eager = call_scatter(*arrays)
    graph = qtrace.trace(call_scatter, tuple(ShapeDtype.of(a) for a in arrays))
    assert graph.outputs[0].aval == ShapeDtype(eager.shape, eager.dtype)
    np.testing.assert_array_equal(graph.eval(*arrays), eager)


@pytest.mark.parametrize("continuous_batching, blocked", GATHERS)
@settings(max_examples=examples(0.6))
@given(data=st.data())
def test_traced_gather_has_the_eager_shape_dtype_and_values(continuous_batching, blocked, data):
    arrays = data.draw(gather_inputs(continuous_batching, blocked))
    eager = call_gather(*arrays, blocked=blocked)
    graph = qtrace.trace(lambda *a: call_gather(*a, blocked=blocked), tuple(ShapeDtype.of(a) for a in arrays))
    assert graph.outputs[0].aval == ShapeDtype(eager.shape, eager.dtype)
    np.testing.assert_array_equal(graph.eval(*arrays), eager)


def test_traced_scatter_with_symbolic_dims_returns_the_cache_type():
    graph = qtrace.trace(qp.ctx_scatter, (ShapeDtype(("batch_size", 4, "ctx_len", 32), "float16"),
                                          ShapeDtype(("batch_size", "seq_len"), "int64"),
                                          ShapeDtype(("batch_size", 4, "seq_len", 32), "float16")))
    assert graph.outputs[0].aval == ShapeDtype(("batch_size", 4, "ctx_len", 32), "float16")


def test_traced_cb_scatter_keeps_the_full_batch_cache_type():
    graph = qtrace.trace(qp.ctx_scatter_cb, (ShapeDtype(("full_batch_size", "ctx_len", 8)),
                                             ShapeDtype(("batch_size", 1), "int64"),
                                             ShapeDtype(("batch_size", "seq_len"), "int32"),
                                             ShapeDtype(("batch_size", "seq_len", 8))))
    assert graph.outputs[0].aval == ShapeDtype(("full_batch_size", "ctx_len", 8))


def test_traced_gather_with_symbolic_dims_has_the_key_count_of_the_indices():
    graph = qtrace.trace(lambda cache, idx: qp.ctx_gather(cache, idx),
                         (ShapeDtype(("batch_size", 4, "ctx_len", 32), "float16"), ShapeDtype((1, 1, "keys"), "int32")))
    assert graph.outputs[0].aval == ShapeDtype(("batch_size", 4, "keys", 32), "float16")


def test_traced_cb_gather_has_the_batch_of_batch_index():
    graph = qtrace.trace(qp.ctx_gather_cb, (ShapeDtype(("full_batch_size", 2, "ctx_len", 8)),
                                            ShapeDtype(("batch_size", 1), "int64"),
                                            ShapeDtype(("batch_size", 2, "ctx_len"), "int64")))
    assert graph.outputs[0].aval == ShapeDtype(("batch_size", 2, "ctx_len", 8))


def test_gather_records_comp_ctx_len_as_a_parameter():
    graph = qtrace.trace(lambda cache, idx: qp.ctx_gather(cache, idx, cache.shape[2]),
                         (ShapeDtype((1, 1, "ctx_len", 2)), ShapeDtype((1, 1, "ctx_len"), "int64")))
    (node,) = graph.nodes
    assert node.params["comp_ctx_len"] == qtrace.Dim.named("ctx_len")


def test_gather_with_comp_ctx_len_other_than_the_key_count_raises_shape_error():
    def read(cache, idx):
        return qp.ctx_gather(cache, idx, 4)  # comp_ctx_len differs from K

    with pytest.raises(qtrace.ShapeError) as info:
        qtrace.trace(read, (ShapeDtype((1, 1, 4, 2)), ShapeDtype((1, 1, 3), "int64")))
    assert_located(info.value, read, "# comp_ctx_len differs")


# -- the index conventions, by hand -------------------------------------------------------------------


def cache_4d(rng, dtype=np.float32, batch=2, ctx=4):
    return random_data(rng, (batch, 2, ctx, 3), dtype)


def test_scatter_padding_minus_one_writes_the_last_slot(rng):
    cache = cache_4d(rng)
    updates = random_data(rng, (2, 2, 2, 3), np.float32)
    out = qp.ctx_scatter(cache, np.array([[0, -1], [1, 2]], np.int64), updates)
    np.testing.assert_array_equal(out[0, :, 3], updates[0, :, 1])
    np.testing.assert_array_equal(out[0, :, 0], updates[0, :, 0])
    np.testing.assert_array_equal(out[0, :, 1:3], cache[0, :, 1:3])


def test_scatter_at_int32_max_writes_nothing(rng):
    cache = cache_4d(rng)
    updates = random_data(rng, (2, 2, 2, 3), np.float32)
    out = qp.ctx_scatter(cache, np.array([[INT32_MAX, 1], [INT32_MAX, INT32_MAX]], np.int32), updates)
    np.testing.assert_array_equal(out[0, :, 1], updates[0, :, 1])
    np.testing.assert_array_equal(np.delete(out[0], 1, axis=1), np.delete(cache[0], 1, axis=1))
    np.testing.assert_array_equal(out[1], cache[1])


def test_scatter_3d_at_int32_max_writes_nothing(rng):
    cache = random_data(rng, (1, 4, 2), np.float16)
    out = qp.ctx_scatter(cache, np.array([[INT32_MAX, 2]], np.int64), np.ones((1, 2, 2), np.float16))
    expected = cache.copy()
    expected[0, 2] = 1
    np.testing.assert_array_equal(out, expected)


def test_scatter_does_not_modify_its_input(rng):
    cache = cache_4d(rng)
    before = cache.copy()
    qp.ctx_scatter(cache, np.array([[0], [1]]), np.zeros((2, 2, 1, 3), np.float32))
    np.testing.assert_array_equal(cache, before)


def test_cb_scatter_padding_minus_one_writes_nothing(rng):
    cache = cache_4d(rng, batch=3)
    updates = random_data(rng, (1, 2, 2, 3), np.float32)
    out = qp.ctx_scatter_cb(cache, np.array([[1]]), np.array([[-1, 0]], np.int32), updates)
    expected = cache.copy()
    expected[1, :, 0] = updates[0, :, 1]
    np.testing.assert_array_equal(out, expected)


def test_cb_scatter_at_int32_max_writes_nothing(rng):
    cache = cache_4d(rng, batch=3)
    out = qp.ctx_scatter_cb(cache, np.array([[2], [0]]), np.full((2, 2), INT32_MAX, np.int64),
                            np.zeros((2, 2, 2, 3), np.float32))
    np.testing.assert_array_equal(out, cache)


def test_cb_scatter_with_out_of_order_batch_index_writes_each_row_to_its_slot(rng):
    cache = np.zeros((4, 3, 1), np.float32)  # 3-D: [slots, ctx, dim]
    updates = np.array([[[10.0]], [[20.0]], [[30.0]]], np.float32)  # [batch=3, seq=1, dim=1]
    out = qp.ctx_scatter_cb(cache, np.array([[3], [0], [2]], np.int32), np.array([[1], [2], [0]]), updates)
    expected = np.zeros((4, 3), np.float32)
    expected[3, 1], expected[0, 2], expected[2, 0] = 10, 20, 30
    np.testing.assert_array_equal(out[..., 0], expected)


def test_gather_at_int32_max_reads_index_zero():
    cache = np.arange(2 * 1 * 4 * 1, dtype=np.float32).reshape(2, 1, 4, 1)  # cache[b, 0, c, 0] = 4b + c
    out = qp.ctx_gather(cache, np.array([[[3, INT32_MAX, 1]]], np.int32))
    np.testing.assert_array_equal(out[..., 0], [[[3, 0, 1]], [[7, 4, 5]]])


def test_gather_3d_at_int32_max_reads_index_zero():
    cache = np.arange(8, dtype=np.float16).reshape(2, 4, 1)
    out = qp.ctx_gather(cache, np.array([[INT32_MAX, 2], [1, INT32_MAX]], np.int64))
    np.testing.assert_array_equal(out[..., 0], [[0, 2], [5, 4]])


def test_gather_indices_broadcast_over_batch_and_heads():
    cache = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4, 1)  # 12b + 4h + c
    out = qp.ctx_gather(cache, np.array([[[2, 0]]]))
    expected = [[[12 * b + 4 * h + 2, 12 * b + 4 * h] for h in range(3)] for b in range(2)]
    np.testing.assert_array_equal(out[..., 0], expected)


def test_gather_with_per_head_indices_reads_each_heads_row():
    cache = np.arange(1 * 2 * 3, dtype=np.float32).reshape(1, 2, 3, 1)  # 3h + c
    out = qp.ctx_gather(cache, np.array([[[2], [0]]]))
    np.testing.assert_array_equal(out[..., 0], [[[2], [3]]])


def test_cb_gather_reads_from_the_slot_of_batch_index():
    cache = np.arange(3 * 4, dtype=np.float32).reshape(3, 4, 1)  # 4n + c
    out = qp.ctx_gather_cb(cache, np.array([[2], [0]]), np.array([[1, INT32_MAX], [3, 0]], np.int32))
    np.testing.assert_array_equal(out[..., 0], [[9, 8], [3, 0]])


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
def test_scatter_then_gather_round_trips_for_every_index_and_data_dtype(rng, index_dtype, data_dtype):
    cache = random_data(rng, (2, 2, 5, 3), data_dtype)
    updates = random_data(rng, (2, 2, 2, 3), data_dtype)
    positions = np.array([[3, 1], [0, 4]], index_dtype)
    written = qp.ctx_scatter(cache, positions, updates)
    read = qp.ctx_gather(written, positions[:, None, :])
    assert written.dtype == read.dtype == np.dtype(data_dtype)
    np.testing.assert_array_equal(read, updates)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_float16_cache_stays_float16_through_the_cb_ops(rng, index_dtype):
    cache = random_data(rng, (3, 1, 4, 2), np.float16)
    batch_index = np.array([[1]], index_dtype)
    written = qp.ctx_scatter_cb(cache, batch_index, np.array([[2]], index_dtype), np.ones((1, 1, 1, 2), np.float16))
    read = qp.ctx_gather_cb(written, batch_index, np.array([[[2, INT32_MAX]]], index_dtype))
    assert written.dtype == read.dtype == np.float16
    np.testing.assert_array_equal(read[0, 0], [[1, 1], cache[1, 0, 0]])


def test_decode_step_reads_back_the_live_context_and_index_zero_past_it(rng):
    """A decode step as QEfficient runs it: write position p, read arange(ctx) with every index
    past max(position_ids) replaced by INT32_MAX."""
    cache = random_data(rng, (1, 2, 6, 4), np.float32)
    new_kv = random_data(rng, (1, 2, 1, 4), np.float32)
    position_ids = np.array([[3]])
    written = qp.ctx_scatter(cache, position_ids, new_kv)
    ctx_indices = np.arange(6).reshape(1, 1, 6)
    ctx_indices = np.where(ctx_indices > position_ids.max(), INT32_MAX, ctx_indices)
    read = qp.ctx_gather(written, ctx_indices, 6)
    np.testing.assert_array_equal(read[:, :, :3], cache[:, :, :3])
    np.testing.assert_array_equal(read[:, :, 3], new_kv[:, :, 0])
    np.testing.assert_array_equal(read[:, :, 4:], np.repeat(cache[:, :, :1], 2, axis=2))


def test_blocked_kv_read_of_one_block_with_the_live_context_ending_inside_it():
    """QEfficient's blocked decode: block [2, 4) of the cache; slots past max(position_ids) = 2 are INT32_MAX."""
    cache = np.arange(2 * 2 * 6, dtype=np.float32).reshape(2, 2, 6, 1)  # 12b + 6h + c
    block = np.arange(2, 4)
    indices = np.broadcast_to(np.where(block > 2, INT32_MAX, block), (2, 2, 2))
    out = qp.ctx_gather_blocked_kv(cache, indices)
    expected = [[[12 * b + 6 * h + 2, 12 * b + 6 * h] for h in range(2)] for b in range(2)]
    np.testing.assert_array_equal(out[..., 0], expected)


def test_blocked_kv_cb_read_uses_the_slot_of_batch_index():
    cache = np.arange(3 * 2 * 4, dtype=np.float16).reshape(3, 2, 4, 1)  # 8n + 4h + c
    out = qp.ctx_gather_blocked_kv_cb(cache, np.array([[2], [0]]), np.array([[[3, INT32_MAX]], [[1, 2]]], np.int32))
    np.testing.assert_array_equal(out[..., 0], [[[19, 16], [23, 20]], [[1, 2], [5, 6]]])


def test_blocked_kv_read_records_a_blocked_ctx_gather():
    graph = qtrace.trace(qp.ctx_gather_blocked_kv, (ShapeDtype(("batch_size", 2, "ctx_len", 8)),
                                                    ShapeDtype(("batch_size", 2, "block"), "int32")))
    (node,) = graph.nodes
    assert (node.op, node.params) == ("ctx_gather", {"blocked": True})
    assert graph.outputs[0].aval == ShapeDtype(("batch_size", 2, "block", 8))


def test_int32_index_table_scatter_skips_int32_max_destinations():
    """A 3-D int32 scatter (lowered as CtxScatter3DInt) building a packed -> original token table."""
    table = np.full((1, 4, 1), INT32_MAX, np.int32)
    out = qp.ctx_scatter(table, np.array([[INT32_MAX, 0, INT32_MAX, 1]], np.int32),
                         np.arange(4, dtype=np.int32).reshape(1, 4, 1))
    np.testing.assert_array_equal(out[0, :, 0], [1, 3, INT32_MAX, INT32_MAX])
    assert out.dtype == np.int32


# -- bad inputs ---------------------------------------------------------------------------------------


def f32(*shape):
    return ShapeDtype(shape, "float32")


def i64(*shape):
    return ShapeDtype(shape, "int64")


BAD_SCATTERS = [
    pytest.param(qtrace.ShapeError, (f32(2, 4), i64(2, 1), f32(2, 1)), id="data-rank-2"),
    pytest.param(qtrace.DTypeError, (f32(2, 2, 4, 3), f32(2, 1), f32(2, 2, 1, 3)), id="float-positions"),
    pytest.param(qtrace.DTypeError, (f32(2, 2, 4, 3), i64(2, 1), ShapeDtype((2, 2, 1, 3), "float16")),
                 id="updates-dtype"),
    pytest.param(qtrace.ShapeError, (f32(2, 2, 4, 3), i64(2, 1), f32(2, 2, 2, 3)), id="updates-seq"),
    pytest.param(qtrace.ShapeError, (f32(2, 2, 4, 3), i64(3, 1), f32(3, 2, 1, 3)), id="positions-batch"),
]


@pytest.mark.parametrize("error, specs", BAD_SCATTERS)
def test_bad_scatter_raises_at_the_users_line(error, specs):
    def write(cache, positions, updates):
        return qp.ctx_scatter(cache, positions, updates)  # bad scatter

    with pytest.raises(error) as info:
        qtrace.trace(write, specs)
    assert_located(info.value, write, "# bad scatter")
    assert info.value.op == "ctx_scatter"


BAD_CB_SCATTERS = [
    pytest.param(qtrace.ShapeError, (f32(3, 4, 2), i64(2), i64(2, 1), f32(2, 1, 2)), id="batch-index-1d"),
    pytest.param(qtrace.ShapeError, (f32(3, 4, 2), i64(1, 1), i64(2, 1), f32(2, 1, 2)), id="batch-index-rows"),
    pytest.param(qtrace.DTypeError, (f32(3, 4, 2), f32(2, 1), i64(2, 1), f32(2, 1, 2)), id="float-batch-index"),
]


@pytest.mark.parametrize("error, specs", BAD_CB_SCATTERS)
def test_bad_cb_scatter_raises_at_the_users_line(error, specs):
    def write(cache, batch_index, positions, updates):
        return qp.ctx_scatter_cb(cache, batch_index, positions, updates)  # bad cb scatter

    with pytest.raises(error) as info:
        qtrace.trace(write, specs)
    assert_located(info.value, write, "# bad cb scatter")


BAD_GATHERS = [
    pytest.param(qtrace.ShapeError, (f32(2, 2, 4, 3), i64(2, 4)), id="indices-rank"),
    pytest.param(qtrace.ShapeError, (f32(2, 2, 4, 3), i64(3, 1, 4)), id="indices-batch"),
    pytest.param(qtrace.ShapeError, (f32(2, 2, 4, 3), i64(2, 3, 4)), id="indices-heads"),
    pytest.param(qtrace.DTypeError, (f32(2, 2, 4, 3), f32(2, 1, 4)), id="float-indices"),
    pytest.param(qtrace.ShapeError, (f32(4, 3), i64(1, 4)), id="data-rank-2"),
]


@pytest.mark.parametrize("error, specs", BAD_GATHERS)
def test_bad_gather_raises_at_the_users_line(error, specs):
    def read(cache, indices):
        return qp.ctx_gather(cache, indices)  # bad gather

    with pytest.raises(error) as info:
        qtrace.trace(read, specs)
    assert_located(info.value, read, "# bad gather")
    assert info.value.op == "ctx_gather"


BAD_CB_GATHERS = [
    pytest.param(qtrace.ShapeError, (f32(3, 4, 2), i64(2, 1), i64(1, 4)), id="indices-batch"),
    pytest.param(qtrace.ShapeError, (f32(3, 4, 2), i64(2, 2), i64(2, 4)), id="batch-index-columns"),
]


@pytest.mark.parametrize("error, specs", BAD_CB_GATHERS)
def test_bad_cb_gather_raises_at_the_users_line(error, specs):
    def read(cache, batch_index, indices):
        return qp.ctx_gather_cb(cache, batch_index, indices)  # bad cb gather

    with pytest.raises(error) as info:
        qtrace.trace(read, specs)
    assert_located(info.value, read, "# bad cb gather")


BAD_BLOCKED_GATHERS = [
    pytest.param((f32(2, 2, 4, 3), i64(1, 2, 4)), "exactly", id="indices-batch-broadcast"),
    pytest.param((f32(2, 2, 4, 3), i64(2, 1, 4)), "exactly", id="indices-heads-broadcast"),
    pytest.param((f32(2, 4, 3), i64(2, 4)), "heads", id="data-3d"),
    pytest.param((f32(2, 2, 4, 3), f32(2, 2, 4)), "integer", id="float-indices"),
]


@pytest.mark.parametrize("specs, message", BAD_BLOCKED_GATHERS)
def test_bad_blocked_kv_read_raises_at_the_users_line(specs, message):
    def read(cache, indices):
        return qp.ctx_gather_blocked_kv(cache, indices)  # bad blocked read

    with pytest.raises(qtrace.QtraceError, match=message) as info:
        qtrace.trace(read, specs)
    assert_located(info.value, read, "# bad blocked read")
    assert info.value.op == "ctx_gather_blocked_kv"


BAD_BLOCKED_CB_GATHERS = [
    pytest.param((f32(3, 2, 4, 2), i64(2, 1), i64(1, 2, 4)), "batch 2", id="indices-batch"),
    pytest.param((f32(3, 4, 2), i64(2, 1), i64(2, 4)), "heads", id="data-3d"),
    pytest.param((f32(3, 2, 4, 2), i64(2), i64(2, 2, 4)), "batch_index", id="batch-index-1d"),
]


@pytest.mark.parametrize("specs, message", BAD_BLOCKED_CB_GATHERS)
def test_bad_blocked_kv_cb_read_raises_at_the_users_line(specs, message):
    def read(cache, batch_index, indices):
        return qp.ctx_gather_blocked_kv_cb(cache, batch_index, indices)  # bad blocked cb read

    with pytest.raises(qtrace.QtraceError, match=message) as info:
        qtrace.trace(read, specs)
    assert_located(info.value, read, "# bad blocked cb read")
    assert info.value.op == "ctx_gather_blocked_kv_cb"


def test_bad_scatter_raises_eagerly_too():
    with pytest.raises(qtrace.DTypeError):
        qp.ctx_scatter(np.zeros((1, 4, 2), np.float32), np.zeros((1, 1), np.float32), np.zeros((1, 1, 2), np.float32))


@pytest.mark.parametrize("call", [
    lambda: qp.ctx_scatter(np.zeros(()), np.zeros((1, 1), np.int64), np.zeros((1, 1))),
    lambda: qp.ctx_gather(np.zeros(()), np.zeros((1, 1), np.int64)),
    lambda: qp.ctx_gather_cb(np.zeros((1, 2, 3)), np.zeros((1, 1), np.int64), np.zeros((), np.int64)),
])
def test_zero_dimensional_operands_raise_shape_error(call):
    with pytest.raises(qtrace.ShapeError):
        call()
