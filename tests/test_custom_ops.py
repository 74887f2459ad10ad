"""The Cloud AI 100 custom-op functions (lowering/custom_ops.py, custom_op_bodies.py, docs/architecture.md
"Cloud AI 100 conventions").

Each test builds a one-node ONNX model calling the custom op (its FunctionProto in model.functions),
runs it with onnxruntime and compares with a numpy reference written here as explicit loops over
batch, head and position, independent of the function bodies.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from qtrace.lowering import custom_ops
from qtrace.lowering.session import inference_session

from conftest import optimized_op_counts

INT32_MAX = 2147483647
QUALCOMM = "com.qualcomm.cloud"
QTI_AISW = "com.qti.aisw.onnx"

# The contract: op_type -> (domain, input names in order).
CONTRACT = {
    "CtxScatter": (QUALCOMM, ["data", "position_ids", "updates"]),
    "CtxScatter3D": (QUALCOMM, ["data", "position_ids", "updates"]),
    "CtxScatter3DInt": (QUALCOMM, ["data", "position_ids", "updates"]),
    "CtxScatterCB": (QUALCOMM, ["data", "batch_index", "position_ids", "updates"]),
    "CtxScatterCB3D": (QUALCOMM, ["data", "batch_index", "position_ids", "updates"]),
    "CtxGather": (QUALCOMM, ["data", "ctx_indices", "comp_ctx_len"]),
    "CtxGather3D": (QUALCOMM, ["data", "ctx_indices"]),
    "CtxGatherBlockedKV": (QUALCOMM, ["data", "ctx_indices"]),
    "CtxGatherCB": (QUALCOMM, ["data", "batch_index", "ctx_indices", "comp_ctx_len"]),
    "CtxGatherCB3D": (QUALCOMM, ["data", "batch_index", "ctx_indices"]),
    "CtxGatherBlockedKVCB": (QUALCOMM, ["data", "batch_index", "ctx_indices"]),
    "CustomRMSNorm": (QTI_AISW, ["hidden", "weight"]),
}

OPSETS = [17, 18]
INDEX_DTYPES = [np.int32, np.int64]
DATA_DTYPES = [np.float32, np.float16, np.int32]


# ---- model building and running -------------------------------------------------------------


def make_model(op_type, inputs, *, opset=17, attributes=None, input_dims=None):
    """A one-node model calling op_type on graph inputs named and typed after `inputs`.

    input_dims optionally overrides an input's declared shape (e.g. with symbolic dim names);
    the output's shape is left unknown (rank only) so shape inference has to work it out.
    """
    domain, input_names = CONTRACT[op_type]
    assert list(inputs) == input_names
    input_dims = input_dims or {}
    graph_inputs = [
        helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(array.dtype), input_dims.get(name, array.shape)
        )
        for name, array in inputs.items()
    ]
    first = inputs[input_names[0]]  # data or hidden: the output has its dtype and rank
    graph_output = helper.make_tensor_value_info(
        "out", helper.np_dtype_to_tensor_dtype(first.dtype), [None] * first.ndim
    )
    node = helper.make_node(op_type, input_names, ["out"], domain=domain, **(attributes or {}))
    graph = helper.make_graph([node], f"call_{op_type}", graph_inputs, [graph_output])
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(domain, 1)],
        functions=[custom_ops.custom_op_function(op_type, opset)],
    )


def run(model, inputs):
    session = inference_session(model.SerializeToString())
    (out,) = session.run(None, inputs)
    return out


def check_and_run(op_type, inputs, *, opset=17, attributes=None):
    model = make_model(op_type, inputs, opset=opset, attributes=attributes)
    onnx.checker.check_model(model, full_check=True)
    return run(model, inputs)


# ---- numpy references (explicit loops, one element row at a time) -----------------------------


def reference_ctx_scatter(data, position_ids, updates):
    out = data.copy()
    batch, heads, ctx_len, _ = data.shape
    for b in range(batch):
        for h in range(heads):
            for s in range(position_ids.shape[1]):
                pos = int(position_ids[b, s])
                if pos == INT32_MAX:
                    continue  # the invalid position writes nothing
                if pos < 0:
                    pos += ctx_len  # padding -1 writes the last slot
                out[b, h, pos, :] = updates[b, h, s, :]
    return out


def reference_ctx_scatter_3d(data, position_ids, updates):
    out = data.copy()
    batch, ctx_len, _ = data.shape
    for b in range(batch):
        for s in range(position_ids.shape[1]):
            pos = int(position_ids[b, s])
            if pos == INT32_MAX:
                continue
            if pos < 0:
                pos += ctx_len
            out[b, pos, :] = updates[b, s, :]
    return out


def reference_ctx_scatter_cb(data, batch_index, position_ids, updates):
    out = data.copy()
    for b in range(batch_index.shape[0]):
        slot = int(batch_index[b, 0])
        for h in range(data.shape[1]):
            for s in range(position_ids.shape[1]):
                pos = int(position_ids[b, s])
                if pos < 0 or pos == INT32_MAX:
                    continue  # CB padding and the invalid position write nothing
                out[slot, h, pos, :] = updates[b, h, s, :]
    return out


def reference_ctx_scatter_cb_3d(data, batch_index, position_ids, updates):
    out = data.copy()
    for b in range(batch_index.shape[0]):
        slot = int(batch_index[b, 0])
        for s in range(position_ids.shape[1]):
            pos = int(position_ids[b, s])
            if pos < 0 or pos == INT32_MAX:
                continue
            out[slot, pos, :] = updates[b, s, :]
    return out


def _read_index(index, ctx_len):
    index = int(index)
    if index == INT32_MAX:
        return 0  # the invalid index reads slot 0
    return index + ctx_len if index < 0 else index


def reference_ctx_gather(data, ctx_indices, comp_ctx_len, slots=None):
    """out[b,h,k] = data[slot(b), h, ctx_indices[b|0, h|0, k]]; slots = batch_index[:,0] for CB."""
    batch = data.shape[0] if slots is None else len(slots)
    heads, ctx_len, head_dim = data.shape[1:]
    index_batch, index_heads, num_read = ctx_indices.shape
    assert num_read == comp_ctx_len
    out = np.empty((batch, heads, num_read, head_dim), dtype=data.dtype)
    for b in range(batch):
        slot = b if slots is None else int(slots[b])
        for h in range(heads):
            for k in range(num_read):
                index = ctx_indices[b if index_batch > 1 else 0, h if index_heads > 1 else 0, k]
                out[b, h, k, :] = data[slot, h, _read_index(index, ctx_len), :]
    return out


def reference_ctx_gather_3d(data, ctx_indices, slots=None):
    batch = data.shape[0] if slots is None else len(slots)
    ctx_len, head_dim = data.shape[1:]
    index_batch, num_read = ctx_indices.shape
    out = np.empty((batch, num_read, head_dim), dtype=data.dtype)
    for b in range(batch):
        slot = b if slots is None else int(slots[b])
        for k in range(num_read):
            index = ctx_indices[b if index_batch > 1 else 0, k]
            out[b, k, :] = data[slot, _read_index(index, ctx_len), :]
    return out


def reference_rms_norm(hidden, weight, epsilon):
    rows = hidden.reshape(-1, hidden.shape[-1]).astype(np.float64)
    out = np.empty_like(rows)
    for r, row in enumerate(rows):
        mean_square = sum(float(x) * float(x) for x in row) / len(row)
        out[r] = weight.astype(np.float64) * row / np.sqrt(mean_square + epsilon)
    return out.reshape(hidden.shape)


# ---- input makers ---------------------------------------------------------------------------


def random_data(rng, shape, dtype):
    if np.issubdtype(dtype, np.integer):
        return rng.integers(-1000, 1000, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def distinct_positions(rng, batch, seq_len, ctx_len, dtype):
    """Per row, seq_len distinct slots (duplicate writes are unspecified in ONNX scatters)."""
    return np.stack([rng.permutation(ctx_len)[:seq_len] for _ in range(batch)]).astype(dtype)


# ---- the interface ----------------------------------------------------------------------------


def test_domains_are_the_contract():
    assert custom_ops.CUSTOM_OP_DOMAINS == {op: domain for op, (domain, _) in CONTRACT.items()}


@pytest.mark.parametrize("opset", [17, 18, 19, 20, 21])
@pytest.mark.parametrize("op_type", list(CONTRACT))
def test_function_names_domain_inputs_and_opset_import(op_type, opset):
    function = custom_ops.custom_op_function(op_type, opset)
    domain, input_names = CONTRACT[op_type]
    assert (function.name, function.domain) == (op_type, domain)
    assert list(function.input) == input_names
    assert len(function.output) == 1
    assert [(o.domain, o.version) for o in function.opset_import] == [("", opset)]
    assert {node.domain for node in function.node} == {""}
    onnx.checker.check_function(function)


def test_rms_norm_has_the_epsilon_attribute():
    function = custom_ops.custom_op_function("CustomRMSNorm")
    assert list(function.attribute) + [a.name for a in function.attribute_proto] == ["epsilon"]


def test_default_opset_is_17():
    function = custom_ops.custom_op_function("CtxScatter")
    assert [(o.domain, o.version) for o in function.opset_import] == [("", 17)]


def test_each_call_returns_an_independent_copy():
    first = custom_ops.custom_op_function("CtxGather", 18)
    first.name = "Renamed"
    assert custom_ops.custom_op_function("CtxGather", 18).name == "CtxGather"


def test_unknown_op_type_is_an_error_naming_the_known_ops():
    with pytest.raises(ValueError, match="CtxScatterCB3D"):
        custom_ops.custom_op_function("CtxScatterFoo")


@pytest.mark.parametrize("opset", [16, 22])
def test_unsupported_opset_is_an_error(opset):
    with pytest.raises(ValueError, match=f"opset {opset}"):
        custom_ops.custom_op_function("CtxScatter", opset)


def test_importing_custom_ops_does_not_load_onnxscript():
    code = (
        "import sys\n"
        "import qtrace.lowering.custom_ops\n"
        "assert 'onnxscript' not in sys.modules, 'onnxscript imported at module import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- CtxScatter / CtxScatter3D ----------------------------------------------------------------


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
def test_ctx_scatter_writes_rows_at_positions(opset, index_dtype, data_dtype):
    rng = np.random.default_rng(0)
    batch, heads, ctx_len, seq_len, head_dim = 2, 3, 8, 3, 4
    data = random_data(rng, (batch, heads, ctx_len, head_dim), data_dtype)
    position_ids = distinct_positions(rng, batch, seq_len, ctx_len, index_dtype)
    updates = random_data(rng, (batch, heads, seq_len, head_dim), data_dtype)
    inputs = {"data": data, "position_ids": position_ids, "updates": updates}
    out = check_and_run("CtxScatter", inputs, opset=opset)
    assert out.dtype == data_dtype
    np.testing.assert_array_equal(out, reference_ctx_scatter(data, position_ids, updates))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_ctx_scatter_padding_position_writes_the_last_slot(index_dtype):
    rng = np.random.default_rng(1)
    data = random_data(rng, (2, 2, 6, 3), np.float32)
    position_ids = np.array([[0, 1, -1], [3, -1, 4]], dtype=index_dtype)
    updates = random_data(rng, (2, 2, 3, 3), np.float32)
    out = check_and_run("CtxScatter", {"data": data, "position_ids": position_ids, "updates": updates})
    np.testing.assert_array_equal(out[0, :, 5], updates[0, :, 2])
    np.testing.assert_array_equal(out[1, :, 5], updates[1, :, 1])
    np.testing.assert_array_equal(out, reference_ctx_scatter(data, position_ids, updates))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_ctx_scatter_invalid_position_writes_nothing(index_dtype):
    rng = np.random.default_rng(2)
    data = random_data(rng, (2, 2, 6, 3), np.float32)
    position_ids = np.array([[2, INT32_MAX, INT32_MAX], [INT32_MAX, INT32_MAX, INT32_MAX]], dtype=index_dtype)
    updates = random_data(rng, (2, 2, 3, 3), np.float32)
    out = check_and_run("CtxScatter", {"data": data, "position_ids": position_ids, "updates": updates})
    expected = data.copy()
    expected[0, :, 2] = updates[0, :, 0]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
def test_ctx_scatter_3d_writes_rows_at_positions(opset, index_dtype, data_dtype):
    rng = np.random.default_rng(3)
    batch, ctx_len, seq_len, dim = 3, 7, 4, 5
    data = random_data(rng, (batch, ctx_len, dim), data_dtype)
    position_ids = distinct_positions(rng, batch, seq_len, ctx_len, index_dtype)
    position_ids[0, 1] = -1  # padding: last slot
    position_ids[1, 2] = INT32_MAX  # invalid: nothing
    updates = random_data(rng, (batch, seq_len, dim), data_dtype)
    inputs = {"data": data, "position_ids": position_ids, "updates": updates}
    out = check_and_run("CtxScatter3D", inputs, opset=opset)
    np.testing.assert_array_equal(out, reference_ctx_scatter_3d(data, position_ids, updates))


# ---- CtxScatterCB / CtxScatterCB3D --------------------------------------------------------------


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
def test_ctx_scatter_cb_writes_each_row_to_its_cache_slot(opset, index_dtype, data_dtype):
    rng = np.random.default_rng(4)
    full_batch, heads, ctx_len, seq_len, head_dim = 3, 2, 8, 3, 4
    data = random_data(rng, (full_batch, heads, ctx_len, head_dim), data_dtype)
    batch_index = np.array([[2], [0]], dtype=index_dtype)  # out of order; slot 1 untouched
    position_ids = distinct_positions(rng, 2, seq_len, ctx_len, index_dtype)
    updates = random_data(rng, (2, heads, seq_len, head_dim), data_dtype)
    inputs = {"data": data, "batch_index": batch_index, "position_ids": position_ids, "updates": updates}
    out = check_and_run("CtxScatterCB", inputs, opset=opset)
    assert out.dtype == data_dtype
    np.testing.assert_array_equal(out[1], data[1])
    np.testing.assert_array_equal(out, reference_ctx_scatter_cb(data, batch_index, position_ids, updates))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_ctx_scatter_cb_padding_and_invalid_positions_write_nothing(index_dtype):
    rng = np.random.default_rng(5)
    data = random_data(rng, (3, 2, 6, 3), np.float16)
    batch_index = np.array([[2], [0]], dtype=index_dtype)
    position_ids = np.array([[4, -1, -2], [INT32_MAX, 1, -1]], dtype=index_dtype)  # any negative
    updates = random_data(rng, (2, 2, 3, 3), np.float16)
    inputs = {"data": data, "batch_index": batch_index, "position_ids": position_ids, "updates": updates}
    out = check_and_run("CtxScatterCB", inputs)
    expected = data.copy()
    expected[2, :, 4] = updates[0, :, 0]
    expected[0, :, 1] = updates[1, :, 1]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
def test_ctx_scatter_cb_3d_writes_each_row_to_its_cache_slot(opset, index_dtype, data_dtype):
    rng = np.random.default_rng(6)
    data = random_data(rng, (3, 7, 5), data_dtype)
    batch_index = np.array([[2], [0]], dtype=index_dtype)
    position_ids = np.array([[0, -1, -3, 6], [5, 2, 3, INT32_MAX]], dtype=index_dtype)
    updates = random_data(rng, (2, 4, 5), data_dtype)
    inputs = {"data": data, "batch_index": batch_index, "position_ids": position_ids, "updates": updates}
    out = check_and_run("CtxScatterCB3D", inputs, opset=opset)
    np.testing.assert_array_equal(out[1], data[1])
    np.testing.assert_array_equal(out, reference_ctx_scatter_cb_3d(data, batch_index, position_ids, updates))


# ---- a step's scatters share their index work ------------------------------------------------


@pytest.mark.parametrize("op_type", ["CtxScatter", "CtxScatterCB", "CtxScatter3D", "CtxScatterCB3D"])
def test_scatters_of_one_step_compute_their_kept_rows_once(op_type):
    """A step writes every layer's K and V caches at the same positions: each write's index work
    depends on position_ids (and batch_index) only, so onnxruntime does it once for all of them, and
    each write adds just its own gather of update rows and its ScatterND. Four writes, one NonZero.
    The head numbers are a constant by then: no write reads its cache's shape at run time, although
    the cache's batch and context dims are symbolic, as in an export."""
    inputs, _ = example_inputs(op_type)
    names = CONTRACT[op_type][1]
    shared = [name for name in names if name not in ("data", "updates")]
    caches = 4
    graph_inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(inputs[name].dtype),
                                                  ["batch_size"] + list(inputs[name].shape[1:]))
                    for name in shared]
    nodes, outputs = [], []
    for i in range(caches):
        for role in ("data", "updates"):
            array = inputs[role]
            leading = "cache_batch" if role == "data" else "batch_size"  # CB: the cache has its own slot count
            dims = [leading] + list(array.shape[1:])
            if role == "data":
                dims[-2] = "ctx_len"
            graph_inputs.append(helper.make_tensor_value_info(
                f"{role}{i}", helper.np_dtype_to_tensor_dtype(array.dtype), dims))
        call_inputs = [f"{name}{i}" if name in ("data", "updates") else name for name in names]
        nodes.append(helper.make_node(op_type, call_inputs, [f"out{i}"], domain=QUALCOMM))
        outputs.append(helper.make_tensor_value_info(f"out{i}", helper.np_dtype_to_tensor_dtype(inputs["data"].dtype),
                                                     None))
    model = helper.make_model(helper.make_graph(nodes, "step", graph_inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(QUALCOMM, 1)],
                              functions=[custom_ops.custom_op_function(op_type)])
    counts = optimized_op_counts(model)
    assert counts["NonZero"] == 1 and counts["ScatterND"] == caches, counts
    assert counts["Shape"] == 0 and counts["CumSum"] == 0, counts
    # and the shared work gives every write its own right answer
    feeds = {name: inputs[name] for name in shared}
    rng = np.random.default_rng(5)
    for i in range(caches):
        feeds[f"data{i}"] = random_data(rng, inputs["data"].shape, inputs["data"].dtype)
        feeds[f"updates{i}"] = random_data(rng, inputs["updates"].shape, inputs["updates"].dtype)
    results = inference_session(model.SerializeToString()).run(None, feeds)
    reference = {"CtxScatter": reference_ctx_scatter, "CtxScatter3D": reference_ctx_scatter_3d,
                 "CtxScatterCB": reference_ctx_scatter_cb, "CtxScatterCB3D": reference_ctx_scatter_cb_3d}[op_type]
    for i, result in enumerate(results):
        expected = reference(*[feeds[f"{name}{i}" if name in ("data", "updates") else name] for name in names])
        np.testing.assert_array_equal(result, expected)


# ---- CtxScatter3DInt: the int32 3-D scatter (index tables) ------------------------------------


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_ctx_scatter_3d_int_builds_an_index_table(opset, index_dtype):
    """The use QEfficient makes of it: a [B, C, 1] table of INT32_MAX receives token numbers at packed
    destinations; tokens not routed here carry destination INT32_MAX and write nothing."""
    table = np.full((2, 5, 1), INT32_MAX, dtype=np.int32)
    destinations = np.array([[0, INT32_MAX, 1, INT32_MAX], [INT32_MAX, INT32_MAX, INT32_MAX, 0]], dtype=index_dtype)
    tokens = np.broadcast_to(np.arange(4, dtype=np.int32)[None, :, None], (2, 4, 1)).copy()
    inputs = {"data": table, "position_ids": destinations, "updates": tokens}
    out = check_and_run("CtxScatter3DInt", inputs, opset=opset)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out[..., 0], [[0, 2, INT32_MAX, INT32_MAX, INT32_MAX],
                                                [3, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX]])
    np.testing.assert_array_equal(out, reference_ctx_scatter_3d(table, destinations, tokens))


# ---- invalid positions among valid ones, whole invalid rows, padding next to invalid -----------------


SCATTER_CASES = {  # position rows for a cache of 6 slots; each row mixes the conventions differently
    "invalid-between-valid": [[1, INT32_MAX, 4], [INT32_MAX, 0, INT32_MAX]],
    "whole-row-invalid": [[INT32_MAX, INT32_MAX, INT32_MAX], [2, 3, 5]],
    "invalid-and-padding": [[INT32_MAX, -1, 0], [-1, INT32_MAX, INT32_MAX]],
    "writes-slot-zero-and-invalid": [[0, INT32_MAX, INT32_MAX], [INT32_MAX, INT32_MAX, 0]],
}


@pytest.mark.parametrize("rows", SCATTER_CASES.values(), ids=SCATTER_CASES.keys())
@pytest.mark.parametrize("op_type", ["CtxScatter", "CtxScatter3D"])
def test_scatter_writes_exactly_the_valid_positions(op_type, rows):
    rng = np.random.default_rng(20)
    position_ids = np.array(rows, dtype=np.int64)
    heads = (2,) if op_type == "CtxScatter" else ()
    data = random_data(rng, (2, *heads, 6, 3), np.float32)
    updates = random_data(rng, (2, *heads, 3, 3), np.float32)
    out = check_and_run(op_type, {"data": data, "position_ids": position_ids, "updates": updates})
    reference = reference_ctx_scatter if heads else reference_ctx_scatter_3d
    np.testing.assert_array_equal(out, reference(data, position_ids, updates))


@pytest.mark.parametrize("rows", SCATTER_CASES.values(), ids=SCATTER_CASES.keys())
@pytest.mark.parametrize("op_type", ["CtxScatterCB", "CtxScatterCB3D"])
@pytest.mark.parametrize("slots", [[[3], [1]], [[0], [2]]], ids=["descending", "ascending"])
def test_cb_scatter_writes_exactly_the_valid_positions(op_type, rows, slots):
    rng = np.random.default_rng(21)
    position_ids, batch_index = np.array(rows, dtype=np.int32), np.array(slots, dtype=np.int32)
    heads = (2,) if op_type == "CtxScatterCB" else ()
    data = random_data(rng, (4, *heads, 6, 3), np.float16)
    updates = random_data(rng, (2, *heads, 3, 3), np.float16)
    inputs = {"data": data, "batch_index": batch_index, "position_ids": position_ids, "updates": updates}
    out = check_and_run(op_type, inputs)
    reference = reference_ctx_scatter_cb if heads else reference_ctx_scatter_cb_3d
    np.testing.assert_array_equal(out, reference(data, batch_index, position_ids, updates))


# ---- CtxGather / CtxGather3D --------------------------------------------------------------------


def gather_indices(rng, shape, ctx_len, dtype):
    """Random slots including a negative one (from the end) and the invalid one (reads slot 0)."""
    indices = rng.integers(-ctx_len, ctx_len, size=shape)
    indices.reshape(-1)[-1] = INT32_MAX
    return indices.astype(dtype)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
@pytest.mark.parametrize("index_batch, index_heads", [(1, 1), (2, 1), (1, 3), (2, 3)])
def test_ctx_gather_reads_broadcast_indices(opset, index_dtype, data_dtype, index_batch, index_heads):
    rng = np.random.default_rng(7)
    batch, heads, ctx_len, head_dim, num_read = 2, 3, 8, 4, 6
    data = random_data(rng, (batch, heads, ctx_len, head_dim), data_dtype)
    ctx_indices = gather_indices(rng, (index_batch, index_heads, num_read), ctx_len, index_dtype)
    comp_ctx_len = np.array(num_read, dtype=np.int64)
    inputs = {"data": data, "ctx_indices": ctx_indices, "comp_ctx_len": comp_ctx_len}
    out = check_and_run("CtxGather", inputs, opset=opset)
    assert out.dtype == data_dtype
    np.testing.assert_array_equal(out, reference_ctx_gather(data, ctx_indices, num_read))


def test_ctx_gather_invalid_index_reads_slot_zero():
    rng = np.random.default_rng(8)
    data = random_data(rng, (2, 2, 5, 3), np.float32)
    ctx_indices = np.array([[[0, 1, 2, INT32_MAX, INT32_MAX]]], dtype=np.int64)
    comp_ctx_len = np.array(5, dtype=np.int64)
    out = check_and_run("CtxGather", {"data": data, "ctx_indices": ctx_indices, "comp_ctx_len": comp_ctx_len})
    np.testing.assert_array_equal(out[:, :, :3], data[:, :, :3])
    np.testing.assert_array_equal(out[:, :, 3], data[:, :, 0])
    np.testing.assert_array_equal(out[:, :, 4], data[:, :, 0])


def test_ctx_gather_reads_the_qefficient_decode_pattern():
    """arange(ctx_len) with slots past max(position_ids) set to INT32_MAX, comp_ctx_len = ctx_len."""
    rng = np.random.default_rng(9)
    ctx_len = 8
    data = random_data(rng, (1, 2, ctx_len, 4), np.float32)
    slots, max_position = np.arange(ctx_len), 4
    ctx_indices = np.where(slots > max_position, INT32_MAX, slots)[None, None].astype(np.int32)
    comp_ctx_len = np.array(ctx_len, dtype=np.int64)
    out = check_and_run("CtxGather", {"data": data, "ctx_indices": ctx_indices, "comp_ctx_len": comp_ctx_len})
    np.testing.assert_array_equal(out[:, :, :5], data[:, :, :5])
    np.testing.assert_array_equal(out[:, :, 5:], np.repeat(data[:, :, :1], 3, axis=2))


def test_ctx_gather_reads_comp_ctx_len_slots():
    """As in QEfficient, the indices are broadcast to [B, H, comp_ctx_len]: one index is read
    comp_ctx_len times."""
    rng = np.random.default_rng(16)
    data = random_data(rng, (2, 2, 6, 3), np.float32)
    ctx_indices = np.array([[[3]]], dtype=np.int64)
    comp_ctx_len = np.array(4, dtype=np.int64)
    out = check_and_run("CtxGather", {"data": data, "ctx_indices": ctx_indices, "comp_ctx_len": comp_ctx_len})
    np.testing.assert_array_equal(out, np.repeat(data[:, :, 3:4], 4, axis=2))


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
@pytest.mark.parametrize("index_batch", [1, 3])
def test_ctx_gather_3d_reads_broadcast_indices(opset, index_dtype, data_dtype, index_batch):
    rng = np.random.default_rng(10)
    data = random_data(rng, (3, 7, 5), data_dtype)
    ctx_indices = gather_indices(rng, (index_batch, 4), 7, index_dtype)
    out = check_and_run("CtxGather3D", {"data": data, "ctx_indices": ctx_indices}, opset=opset)
    np.testing.assert_array_equal(out, reference_ctx_gather_3d(data, ctx_indices))


# ---- CtxGatherCB / CtxGatherCB3D ------------------------------------------------------------------


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
@pytest.mark.parametrize("index_heads", [1, 2])
def test_ctx_gather_cb_reads_from_each_rows_cache_slot(opset, index_dtype, data_dtype, index_heads):
    rng = np.random.default_rng(11)
    full_batch, heads, ctx_len, head_dim, num_read = 3, 2, 8, 4, 5
    data = random_data(rng, (full_batch, heads, ctx_len, head_dim), data_dtype)
    batch_index = np.array([[2], [0]], dtype=index_dtype)
    ctx_indices = gather_indices(rng, (2, index_heads, num_read), ctx_len, index_dtype)
    comp_ctx_len = np.array(num_read, dtype=np.int64)
    inputs = {
        "data": data, "batch_index": batch_index, "ctx_indices": ctx_indices, "comp_ctx_len": comp_ctx_len
    }
    out = check_and_run("CtxGatherCB", inputs, opset=opset)
    assert out.shape == (2, heads, num_read, head_dim)
    expected = reference_ctx_gather(data, ctx_indices, num_read, slots=batch_index[:, 0])
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
def test_ctx_gather_cb_3d_reads_from_each_rows_cache_slot(opset, index_dtype, data_dtype):
    rng = np.random.default_rng(12)
    data = random_data(rng, (3, 7, 5), data_dtype)
    batch_index = np.array([[2], [0]], dtype=index_dtype)
    ctx_indices = gather_indices(rng, (2, 4), 7, index_dtype)
    inputs = {"data": data, "batch_index": batch_index, "ctx_indices": ctx_indices}
    out = check_and_run("CtxGatherCB3D", inputs, opset=opset)
    np.testing.assert_array_equal(out, reference_ctx_gather_3d(data, ctx_indices, slots=batch_index[:, 0]))


# ---- CtxGatherBlockedKV / CtxGatherBlockedKVCB: one block of the cache ----------------------------


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
def test_ctx_gather_blocked_kv_reads_one_block(opset, index_dtype, data_dtype):
    """Block [4, 8) of a 10-slot cache with the live context ending at 5: slots past it are INT32_MAX."""
    rng = np.random.default_rng(17)
    batch, heads, ctx_len, head_dim = 2, 3, 10, 4
    data = random_data(rng, (batch, heads, ctx_len, head_dim), data_dtype)
    block = np.arange(4, 8)
    ctx_indices = np.broadcast_to(np.where(block > 5, INT32_MAX, block), (batch, heads, 4)).astype(index_dtype)
    out = check_and_run("CtxGatherBlockedKV", {"data": data, "ctx_indices": ctx_indices}, opset=opset)
    assert out.dtype == data_dtype
    np.testing.assert_array_equal(out[:, :, :2], data[:, :, 4:6])
    np.testing.assert_array_equal(out[:, :, 2:], np.repeat(data[:, :, :1], 2, axis=2))
    np.testing.assert_array_equal(out, reference_ctx_gather(data, ctx_indices, 4))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
def test_ctx_gather_blocked_kv_reads_per_head_indices(index_dtype):
    rng = np.random.default_rng(18)
    data = random_data(rng, (2, 3, 8, 4), np.float32)
    ctx_indices = gather_indices(rng, (2, 3, 5), 8, index_dtype)
    out = check_and_run("CtxGatherBlockedKV", {"data": data, "ctx_indices": ctx_indices})
    np.testing.assert_array_equal(out, reference_ctx_gather(data, ctx_indices, 5))


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("data_dtype", DATA_DTYPES)
@pytest.mark.parametrize("index_heads", [1, 3])
def test_ctx_gather_blocked_kv_cb_reads_each_rows_slot(opset, index_dtype, data_dtype, index_heads):
    rng = np.random.default_rng(19)
    data = random_data(rng, (4, 3, 8, 4), data_dtype)
    batch_index = np.array([[3], [0], [2]], dtype=index_dtype)
    ctx_indices = gather_indices(rng, (3, index_heads, 5), 8, index_dtype)
    inputs = {"data": data, "batch_index": batch_index, "ctx_indices": ctx_indices}
    out = check_and_run("CtxGatherBlockedKVCB", inputs, opset=opset)
    assert out.shape == (3, 3, 5, 4)
    np.testing.assert_array_equal(out, reference_ctx_gather(data, ctx_indices, 5, slots=batch_index[:, 0]))


# ---- CustomRMSNorm -----------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [17, 18, 19, 20, 21])
@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 1e-5), (np.float16, 2e-3)])
@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16)])
def test_rms_norm_matches_reference(opset, dtype, tolerance, shape):
    rng = np.random.default_rng(13)
    hidden = random_data(rng, shape, dtype)
    weight = random_data(rng, (shape[-1],), dtype)
    epsilon = 1e-5
    inputs = {"hidden": hidden, "weight": weight}
    out = check_and_run("CustomRMSNorm", inputs, opset=opset, attributes={"epsilon": epsilon})
    assert out.dtype == dtype
    expected = reference_rms_norm(hidden, weight, epsilon)
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)


def test_rms_norm_uses_the_epsilon_attribute():
    hidden = np.zeros((1, 4), dtype=np.float32)
    hidden[0, 0] = 1e-3  # mean(x^2) = 2.5e-7, so epsilon dominates the denominator
    weight = np.ones(4, dtype=np.float32)
    for epsilon in (1e-6, 1e-2):
        inputs = {"hidden": hidden, "weight": weight}
        out = check_and_run("CustomRMSNorm", inputs, attributes={"epsilon": epsilon})
        np.testing.assert_allclose(out, reference_rms_norm(hidden, weight, epsilon), rtol=1e-5)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("shape", [(1,), (8,), (3, 1), (2, 3, 8)])
def test_rms_norm_with_a_constant_weight_runs_in_a_default_onnxruntime_session(opset, shape):
    """The body is the chain onnxruntime fuses into SimplifiedLayerNormalization; with the weight as
    Mul's first operand its fusion mis-wired a hidden size of 1 and the model failed to load (found by
    the fuzzer). A plain session with every optimization on, as a user would open one."""
    import onnxruntime as ort

    import qtrace
    import qtrace.primitives as qp

    weight = np.linspace(0.5, 1.5, shape[-1]).astype(np.float32)
    lowered = qtrace.lower(lambda x: qp.rms_norm(x, weight, eps=1e-5), (qtrace.ShapeDtype(shape, np.float32),),
                           opset=opset)
    session = ort.InferenceSession(lowered.model.SerializeToString(), providers=["CPUExecutionProvider"])
    hidden = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    (out,) = session.run(None, {session.get_inputs()[0].name: hidden})
    np.testing.assert_allclose(out, reference_rms_norm(hidden, weight, 1e-5), rtol=1e-5, atol=1e-6)


# ---- every op at every supported opset, shapes, symbolic dims ----------------------------------------


def example_inputs(op_type):
    """Concrete inputs for op_type (B=2, H=3, C=8, D=4, S=2, K=5, N=3) and its output shape."""
    rng = np.random.default_rng(14)

    def floats(*shape):
        return random_data(rng, shape, np.float32)

    def ints(*shape):
        return random_data(rng, shape, np.int32)

    positions = np.array([[1, 5], [0, -1]], dtype=np.int64)
    slots = np.array([[2], [0]], dtype=np.int64)
    slots_read = np.arange(5, dtype=np.int64)
    comp_ctx_len = np.array(5, dtype=np.int64)
    examples = {
        "CtxScatter": ([floats(2, 3, 8, 4), positions, floats(2, 3, 2, 4)], (2, 3, 8, 4)),
        "CtxScatter3D": ([floats(2, 8, 4), positions, floats(2, 2, 4)], (2, 8, 4)),
        "CtxScatter3DInt": ([ints(2, 8, 4), positions, ints(2, 2, 4)], (2, 8, 4)),
        "CtxScatterCB": ([floats(3, 3, 8, 4), slots, positions, floats(2, 3, 2, 4)], (3, 3, 8, 4)),
        "CtxScatterCB3D": ([floats(3, 8, 4), slots, positions, floats(2, 2, 4)], (3, 8, 4)),
        "CtxGather": ([floats(2, 3, 8, 4), slots_read[None, None], comp_ctx_len], (2, 3, 5, 4)),
        "CtxGather3D": ([floats(2, 8, 4), slots_read[None]], (2, 5, 4)),
        "CtxGatherBlockedKV": ([floats(2, 3, 8, 4), np.tile(slots_read, (2, 3, 1))], (2, 3, 5, 4)),
        "CtxGatherCB": (
            [floats(3, 3, 8, 4), slots, np.tile(slots_read, (2, 1, 1)), comp_ctx_len],
            (2, 3, 5, 4),
        ),
        "CtxGatherCB3D": ([floats(3, 8, 4), slots, np.tile(slots_read, (2, 1))], (2, 5, 4)),
        "CtxGatherBlockedKVCB": ([floats(3, 3, 8, 4), slots, np.tile(slots_read, (2, 1, 1))], (2, 3, 5, 4)),
        "CustomRMSNorm": ([floats(2, 3, 4), floats(4)], (2, 3, 4)),
    }
    arrays, output_shape = examples[op_type]
    return dict(zip(CONTRACT[op_type][1], arrays)), output_shape


def attributes_for(op_type):
    return {"epsilon": 1e-6} if op_type == "CustomRMSNorm" else None


@pytest.mark.parametrize("opset", [17, 18, 19, 20, 21])
@pytest.mark.parametrize("op_type", list(CONTRACT))
def test_every_op_checks_and_runs_at_every_opset(op_type, opset):
    inputs, expected_shape = example_inputs(op_type)
    out = check_and_run(op_type, inputs, opset=opset, attributes=attributes_for(op_type))
    assert out.shape == expected_shape


def inferred_output_shape(model, **options):
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, **options)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("op_type", list(CONTRACT))
def test_shape_inference_gives_the_output_shape(op_type, opset):
    # The gathers broadcast their indices to a shape computed with Shape ops (and, for CtxGather
    # and CtxGatherCB, the comp_ctx_len input), so their batch/head dims need data propagation.
    inputs, expected_shape = example_inputs(op_type)
    model = make_model(op_type, inputs, opset=opset, attributes=attributes_for(op_type))
    assert inferred_output_shape(model, data_prop=True) == expected_shape


@pytest.mark.parametrize(
    "op_type", ["CtxScatter", "CtxScatter3D", "CtxScatter3DInt", "CtxScatterCB", "CtxScatterCB3D", "CustomRMSNorm"]
)
def test_shape_inference_needs_no_data_propagation_for_scatters_and_rms_norm(op_type):
    inputs, expected_shape = example_inputs(op_type)
    model = make_model(op_type, inputs, attributes=attributes_for(op_type))
    assert inferred_output_shape(model) == expected_shape


def test_shape_inference_keeps_symbolic_dims():
    inputs, _ = example_inputs("CtxScatterCB")
    symbolic = {
        "data": ["full_batch_size", 3, "ctx_len", 4],
        "batch_index": ["batch_size", 1],
        "position_ids": ["batch_size", "seq_len"],
        "updates": ["batch_size", 3, "seq_len", 4],
    }
    model = make_model("CtxScatterCB", inputs, input_dims=symbolic)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = inferred.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["full_batch_size", 3, "ctx_len", 4]


@pytest.mark.parametrize("op_type", list(CONTRACT))
def test_one_model_with_symbolic_dims_runs_at_two_sizes(op_type):
    inputs, _ = example_inputs(op_type)
    symbolic = {name: [f"{name}_{axis}" for axis in range(array.ndim)] for name, array in inputs.items()}
    model = make_model(op_type, inputs, attributes=attributes_for(op_type), input_dims=symbolic)
    onnx.checker.check_model(model, full_check=True)
    session = inference_session(model.SerializeToString())
    rng = np.random.default_rng(15)
    for batch, ctx_len in [(2, 8), (4, 16)]:
        feeds, expected = sized_inputs(op_type, rng, batch, ctx_len)
        (out,) = session.run(None, feeds)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def sized_inputs(op_type, rng, batch, ctx_len):
    """Inputs for op_type at a given batch and context length, with their reference output."""
    heads, head_dim, seq_len, num_read, full_batch = 2, 4, 3, ctx_len // 2, batch + 1
    positions = distinct_positions(rng, batch, seq_len, ctx_len, np.int64)
    slots = rng.permutation(full_batch)[:batch].reshape(batch, 1).astype(np.int64)
    if op_type == "CtxScatter":
        data = random_data(rng, (batch, heads, ctx_len, head_dim), np.float32)
        updates = random_data(rng, (batch, heads, seq_len, head_dim), np.float32)
        feeds = {"data": data, "position_ids": positions, "updates": updates}
        return feeds, reference_ctx_scatter(data, positions, updates)
    if op_type == "CtxScatter3D":
        data = random_data(rng, (batch, ctx_len, head_dim), np.float32)
        updates = random_data(rng, (batch, seq_len, head_dim), np.float32)
        feeds = {"data": data, "position_ids": positions, "updates": updates}
        return feeds, reference_ctx_scatter_3d(data, positions, updates)
    if op_type == "CtxScatter3DInt":
        data = random_data(rng, (batch, ctx_len, head_dim), np.int32)
        updates = random_data(rng, (batch, seq_len, head_dim), np.int32)
        feeds = {"data": data, "position_ids": positions, "updates": updates}
        return feeds, reference_ctx_scatter_3d(data, positions, updates)
    if op_type == "CtxScatterCB":
        data = random_data(rng, (full_batch, heads, ctx_len, head_dim), np.float32)
        updates = random_data(rng, (batch, heads, seq_len, head_dim), np.float32)
        feeds = {"data": data, "batch_index": slots, "position_ids": positions, "updates": updates}
        return feeds, reference_ctx_scatter_cb(data, slots, positions, updates)
    if op_type == "CtxScatterCB3D":
        data = random_data(rng, (full_batch, ctx_len, head_dim), np.float32)
        updates = random_data(rng, (batch, seq_len, head_dim), np.float32)
        feeds = {"data": data, "batch_index": slots, "position_ids": positions, "updates": updates}
        return feeds, reference_ctx_scatter_cb_3d(data, slots, positions, updates)
    if op_type == "CtxGather":
        data = random_data(rng, (batch, heads, ctx_len, head_dim), np.float32)
        indices = gather_indices(rng, (1, 1, num_read), ctx_len, np.int64)
        feeds = {"data": data, "ctx_indices": indices, "comp_ctx_len": np.array(num_read, dtype=np.int64)}
        return feeds, reference_ctx_gather(data, indices, num_read)
    if op_type == "CtxGather3D":
        data = random_data(rng, (batch, ctx_len, head_dim), np.float32)
        indices = gather_indices(rng, (batch, num_read), ctx_len, np.int64)
        return {"data": data, "ctx_indices": indices}, reference_ctx_gather_3d(data, indices)
    if op_type == "CtxGatherBlockedKV":
        data = random_data(rng, (batch, heads, ctx_len, head_dim), np.float32)
        indices = gather_indices(rng, (batch, heads, num_read), ctx_len, np.int64)
        return {"data": data, "ctx_indices": indices}, reference_ctx_gather(data, indices, num_read)
    if op_type == "CtxGatherBlockedKVCB":
        data = random_data(rng, (full_batch, heads, ctx_len, head_dim), np.float32)
        indices = gather_indices(rng, (batch, 1, num_read), ctx_len, np.int64)
        feeds = {"data": data, "batch_index": slots, "ctx_indices": indices}
        return feeds, reference_ctx_gather(data, indices, num_read, slots=slots[:, 0])
    if op_type == "CtxGatherCB":
        data = random_data(rng, (full_batch, heads, ctx_len, head_dim), np.float32)
        indices = gather_indices(rng, (batch, heads, num_read), ctx_len, np.int64)
        feeds = {"data": data, "batch_index": slots, "ctx_indices": indices,
                 "comp_ctx_len": np.array(num_read, dtype=np.int64)}
        return feeds, reference_ctx_gather(data, indices, num_read, slots=slots[:, 0])
    if op_type == "CtxGatherCB3D":
        data = random_data(rng, (full_batch, ctx_len, head_dim), np.float32)
        indices = gather_indices(rng, (batch, num_read), ctx_len, np.int64)
        feeds = {"data": data, "batch_index": slots, "ctx_indices": indices}
        return feeds, reference_ctx_gather_3d(data, indices, slots=slots[:, 0])
    assert op_type == "CustomRMSNorm"
    hidden = random_data(rng, (batch, ctx_len, head_dim), np.float32)
    weight = random_data(rng, (head_dim,), np.float32)
    feeds = {"hidden": hidden, "weight": weight}
    return feeds, reference_rms_norm(hidden, weight, 1e-6).astype(np.float32)


# ---- property: scatter then gather reads back what was written ---------------------------------


@settings(max_examples=25, deadline=None, database=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 3),
    ctx_len=st.integers(2, 9),
    head_dim=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    index_dtype=st.sampled_from(INDEX_DTYPES),
)
def test_scatter_then_gather_matches_reference(batch, heads, ctx_len, head_dim, seed, index_dtype):
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(1, ctx_len + 1))
    data = random_data(rng, (batch, heads, ctx_len, head_dim), np.float32)
    positions = distinct_positions(rng, batch, seq_len, ctx_len, index_dtype)
    invalid = rng.random(positions.shape) < 0.3
    positions[invalid] = INT32_MAX
    updates = random_data(rng, (batch, heads, seq_len, head_dim), np.float32)
    scattered = check_and_run("CtxScatter", {"data": data, "position_ids": positions, "updates": updates})
    np.testing.assert_array_equal(scattered, reference_ctx_scatter(data, positions, updates))

    # Read back the written rows (invalid positions read slot 0).
    comp_ctx_len = np.array(seq_len, dtype=np.int64)
    indices = positions[:, None, :]
    inputs = {"data": scattered, "ctx_indices": indices, "comp_ctx_len": comp_ctx_len}
    gathered = check_and_run("CtxGather", inputs)
    np.testing.assert_array_equal(gathered, reference_ctx_gather(scattered, indices, seq_len))
    written = ~invalid[:, None, :, None] & np.ones(gathered.shape, dtype=bool)
    np.testing.assert_array_equal(gathered[written], updates[written])


# ---- property: every ctx op against its reference, with the conventions mixed at random -----------


def convention_positions(rng, batch, seq_len, ctx_len, dtype, *, continuous_batching):
    """Distinct slots per row, some INT32_MAX, some rows wholly invalid, and padding -1: any number of
    times with continuous batching (it writes nothing), else at most once and only if the last slot is
    not written otherwise (it writes the last slot)."""
    positions = distinct_positions(rng, batch, seq_len, ctx_len, np.int64)
    positions[rng.random(positions.shape) < 0.3] = INT32_MAX
    positions[rng.random(batch) < 0.2] = INT32_MAX
    for row in positions:
        if continuous_batching:
            row[rng.random(seq_len) < 0.3] = -1
        elif ctx_len - 1 not in row and rng.random() < 0.5:
            row[rng.integers(seq_len)] = -1
    return positions.astype(dtype)


def random_case(op_type, rng):
    """Inputs for op_type with random sizes and index conventions, and the reference output."""
    batch, heads, ctx_len, head_dim = (int(rng.integers(1, n)) for n in (4, 4, 9, 4))
    full_batch, seq_len, num_read = batch + int(rng.integers(0, 3)), int(rng.integers(1, ctx_len + 1)), 5
    index_dtype = INDEX_DTYPES[int(rng.integers(2))]
    data_dtype = np.int32 if op_type == "CtxScatter3DInt" else DATA_DTYPES[int(rng.integers(3))]
    cb = "CB" in op_type
    has_heads = "3D" not in op_type
    cache_batch = full_batch if cb else batch
    data = random_data(rng, (cache_batch, heads, ctx_len, head_dim) if has_heads else (cache_batch, ctx_len, head_dim),
                       data_dtype)
    slots = rng.permutation(full_batch)[:batch].reshape(batch, 1).astype(index_dtype)
    feeds = {"data": data}
    if cb:
        feeds["batch_index"] = slots
    if op_type.startswith("CtxScatter"):
        positions = convention_positions(rng, batch, seq_len, ctx_len, index_dtype, continuous_batching=cb)
        updates = random_data(rng, (batch, heads, seq_len, head_dim) if has_heads else (batch, seq_len, head_dim),
                              data_dtype)
        feeds.update(position_ids=positions, updates=updates)
        reference = {"CtxScatter": reference_ctx_scatter, "CtxScatterCB": reference_ctx_scatter_cb,
                     "CtxScatterCB3D": reference_ctx_scatter_cb_3d}.get(op_type, reference_ctx_scatter_3d)
        return feeds, reference(*feeds.values())
    index_batch = batch if cb or op_type == "CtxGatherBlockedKV" or rng.random() < 0.5 else 1
    index_heads = heads if op_type == "CtxGatherBlockedKV" or rng.random() < 0.5 else 1
    indices = gather_indices(rng, (index_batch, index_heads, num_read) if has_heads else (index_batch, num_read),
                             ctx_len, index_dtype)
    indices[rng.random(indices.shape) < 0.3] = INT32_MAX
    feeds["ctx_indices"] = indices
    if op_type in ("CtxGather", "CtxGatherCB"):
        feeds["comp_ctx_len"] = np.array(num_read, dtype=np.int64)
    reads_from = slots[:, 0] if cb else None
    if has_heads:
        return feeds, reference_ctx_gather(data, indices, num_read, slots=reads_from)
    return feeds, reference_ctx_gather_3d(data, indices, slots=reads_from)


CTX_OPS = [op for op in CONTRACT if op.startswith("Ctx")]


@pytest.mark.parametrize("op_type", CTX_OPS)
@settings(max_examples=15, deadline=None, database=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_ctx_op_matches_its_reference_with_mixed_conventions(op_type, seed):
    feeds, expected = random_case(op_type, np.random.default_rng(seed))
    out = check_and_run(op_type, feeds)
    assert out.dtype == expected.dtype
    np.testing.assert_array_equal(out, expected)


# ---- cost: one copy of the cache per write, only the rows read per read ---------------------------


def consumers_of_data(function):
    """What reads the cache, but the corner read whose only use is the head count (see below)."""
    corner = corner_reads(function)
    return [node.op_type for node in function.node if "data" in node.input and node.name not in corner]


def corner_reads(function) -> set[str]:
    """The nodes of `Gather(Gather(data, [0], axis=2), [0], axis=0)` that feed only Shape: one slot of
    each head of the first batch row, read for its static shape [1, H, 1, D] (onnxruntime folds that
    Shape to a constant and drops the reads)."""
    def single_index(node):
        (tensor,) = [a.t for a in node.attribute if a.name == "value"] or [None]
        return tensor is not None and list(tensor.dims) == [1] and onnx.numpy_helper.to_array(tensor).tolist() == [0]

    producers = {output: node for node in function.node for output in node.output}
    consumers = lambda name: [node for node in function.node if name in node.input]  # noqa: E731
    found = set()
    for first in consumers("data"):
        if first.op_type != "Gather" or not single_index(producers[first.input[1]]):
            continue
        seconds = consumers(first.output[0])
        if [node.op_type for node in seconds] != ["Gather"] or not single_index(producers[seconds[0].input[1]]):
            continue
        axes = [helper.get_attribute_value(a) for node in (first, seconds[0]) for a in node.attribute if a.name == "axis"]
        assert axes == [2, 0], axes  # the [B, H, 1, D] slot first: never a copy of a whole batch row
        assert {node.op_type for node in consumers(seconds[0].output[0])} == {"Shape"}
        found |= {first.name, seconds[0].name}
    return found


@pytest.mark.parametrize("op_type", ["CtxScatter", "CtxScatter3D", "CtxScatter3DInt", "CtxScatterCB", "CtxScatterCB3D"])
def test_a_scatter_copies_the_cache_once(op_type):
    """The cache feeds one ScatterND (its one copy) and otherwise only Shape: no scratch slot
    concatenated and sliced off, no cache rows gathered and written back."""
    function = custom_ops.custom_op_function(op_type)
    consumers = consumers_of_data(function)
    assert consumers.count("ScatterND") == 1 and set(consumers) <= {"ScatterND", "Shape"}, consumers
    assert not {"Slice", "Expand", "ScatterElements"} & {node.op_type for node in function.node}
    producers = {output: node.op_type for node in function.node for output in node.output}
    for node in function.node:  # a Concat may only join shape vectors
        if node.op_type == "Concat":
            assert {producers[name] for name in node.input} <= {"Shape", "Constant"}, node


@pytest.mark.parametrize("op_type", [op for op in CTX_OPS if op.startswith("CtxGather")])
def test_a_gather_reads_only_the_rows_it_returns(op_type):
    """The cache feeds one GatherND, or a Flatten (a view) feeding one Gather: never a Gather of whole
    cache slots before the read."""
    function = custom_ops.custom_op_function(op_type)
    readers = [op for op in consumers_of_data(function) if op != "Shape"]
    assert readers in (["GatherND"], ["Flatten"]), readers
    if readers == ["Flatten"]:
        (flatten,) = [node for node in function.node if node.op_type == "Flatten"]
        assert [node.op_type for node in function.node if flatten.output[0] in node.input] == ["Gather"]
