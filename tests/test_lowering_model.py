"""What a lowered model looks like as a whole: local functions for @qtrace.function, scoped node names,
source metadata, retained-state output names, constant reshapes, opsets, float16, reproducible bytes,
and the errors bad input gets (docs/architecture.md: "Lowering", "Cloud AI 100 conventions", "Source locations")."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import numpy as np
import onnx
import pytest

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype
from qtrace.core import Primitive

from test_lowering import all_nodes, assert_matches, assert_shape_inference_agrees, line_of, save_and_check

LOCAL = "qtrace.local"
_rng = np.random.default_rng(42)
LAYER_WEIGHTS = [_rng.standard_normal((8, 8)).astype(np.float32) * 0.3 for _ in range(3)]
NORM = _rng.uniform(0.5, 1.5, 8).astype(np.float32)
HEAD = _rng.standard_normal((8, 5)).astype(np.float32)


@qtrace.function
def decoder_layer(x: Any, w: Any, cache: Any, position_ids: Any) -> Any:
    h = qp.rms_norm(x, NORM, eps=1e-5)
    h = qp.silu(h @ w)  # marker: layer body
    cache = qp.ctx_scatter(cache, position_ids, h[:, None, :, :])
    return x + h, cache


def tiny_lm(x: Any, position_ids: Any, past_key_0: Any, past_key_1: Any, past_key_2: Any) -> Any:
    caches = [past_key_0, past_key_1, past_key_2]
    for i, w in enumerate(LAYER_WEIGHTS):
        with qtrace.scope(f"layers.{i}"):
            x, caches[i] = decoder_layer(x, w, caches[i], position_ids)
    logits = x @ HEAD  # marker: lm head
    return {"logits": logits, "new_0": caches[0], "new_1": caches[1], "new_2": caches[2]}


TINY_SPECS = (ShapeDtype(("B", "S", 8)), ShapeDtype(("B", "S"), "int64")) + (ShapeDtype(("B", 1, "C", 8)),) * 3


def tiny_inputs(batch: int = 2, seq: int = 3, ctx_len: int = 6, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    positions = np.stack([rng.permutation(ctx_len)[:seq] for _ in range(batch)]).astype(np.int64)
    caches = [rng.standard_normal((batch, 1, ctx_len, 8)).astype(np.float32) for _ in range(3)]
    return [rng.standard_normal((batch, seq, 8)).astype(np.float32), positions, *caches]


@pytest.fixture(scope="module")
def tiny() -> Any:
    return qtrace.lower(tiny_lm, TINY_SPECS)


# -- @qtrace.function -> ONNX local function -------------------------------------------------------------
def test_function_body_is_one_local_function_called_three_times(tiny: Any) -> None:
    local = [f for f in tiny.model.functions if f.domain == LOCAL]
    assert len(local) == 1
    calls = [n for n in tiny.model.graph.node if n.domain == LOCAL and n.op_type == local[0].name]
    assert len(calls) == 3
    assert (LOCAL, 1) in {(o.domain, o.version) for o in tiny.model.opset_import}


def test_model_with_local_function_runs_like_numpy(tiny: Any) -> None:
    for sizes in ((2, 3, 6), (1, 1, 4)):
        args = tiny_inputs(*sizes)
        got, expected = tiny.run(*args), tiny_lm(*args)
        for i in range(3):
            assert_matches(got[f"new_{i}"], expected[f"new_{i}"], f"new_{i}")
        assert_matches(got["logits"], expected["logits"], "logits")


def test_model_with_local_function_passes_full_check(tiny: Any, tmp_path: Any) -> None:
    save_and_check(tiny, tmp_path)


def test_model_with_local_function_shape_inference_agrees(tiny: Any) -> None:
    assert_shape_inference_agrees(tiny.model, tiny.graph)


# -- names and metadata ------------------------------------------------------------------------------------
def test_node_names_carry_the_scope(tiny: Any) -> None:
    calls = [n for n in tiny.model.graph.node if n.domain == LOCAL]
    assert sorted(n.name.split("/")[0] for n in calls) == ["layers.0", "layers.1", "layers.2"]


def test_every_node_has_a_source_line(tiny: Any) -> None:
    for node in all_nodes(tiny.model):
        sources = [p.value for p in node.metadata_props if p.key == "qtrace.source"]
        assert len(sources) == 1, f"node {node.name} ({node.op_type}) has no qtrace.source"
        assert os.path.basename(__file__) + ":" in sources[0], sources[0]


def test_source_metadata_points_at_the_line_that_made_the_node(tiny: Any) -> None:
    (head,) = [n for n in tiny.model.graph.node if n.op_type == "MatMul"]
    (source,) = [p.value for p in head.metadata_props if p.key == "qtrace.source"]
    assert f"{os.path.basename(__file__)}:{line_of(tiny_lm, 'marker: lm head')} in tiny_lm" in source
    (body,) = [f for f in tiny.model.functions if f.domain == LOCAL]
    (matmul,) = [n for n in body.node if n.op_type == "MatMul"]
    (source,) = [p.value for p in matmul.metadata_props if p.key == "qtrace.source"]
    assert f":{line_of(decoder_layer, 'marker: layer body')} in decoder_layer" in source


def test_source_metadata_covers_shape_and_identity_nodes() -> None:
    def fn(x: Any) -> Any:
        y = x.reshape(x.shape[1], x.shape[0])  # marker: symbolic reshape
        return y, y

    lowered = qtrace.lower(fn, (ShapeDtype(("A", "B")),))
    line = line_of(fn, "marker: symbolic reshape")
    for node in lowered.model.graph.node:
        sources = [p.value for p in node.metadata_props if p.key == "qtrace.source"]
        assert sources and f":{line} in fn" in sources[0], f"{node.op_type} {node.name}: {sources}"


# -- retained state ----------------------------------------------------------------------------------------
def test_scatter_chain_outputs_are_named_input_retained_state(tiny: Any) -> None:
    assert tiny.output_names == ["logits"] + [f"past_key_{i}_RetainedState" for i in range(3)]
    assert [o.name for o in tiny.model.graph.output] == tiny.output_names


def test_cache_lists_give_qefficient_retained_state_names() -> None:
    def step(position_ids: Any, new: Any, past_key: Any, past_value: Any) -> Any:
        keys = [qp.ctx_scatter(cache, position_ids, new) for cache in past_key]
        values = [qp.ctx_scatter(cache, position_ids, new * 2.0) for cache in past_value]
        return {"logits": new.sum(-1), "past_key": keys, "past_value": values}

    cache = ShapeDtype(("batch_size", 1, "ctx_len", 2))
    specs = (ShapeDtype(("batch_size", "seq_len"), "int64"), ShapeDtype(("batch_size", 1, "seq_len", 2)),
             [cache, cache], [cache, cache])
    model = qtrace.lower(step, specs).model
    assert [i.name for i in model.graph.input] == ["position_ids", "new", "past_key.0", "past_key.1",
                                                   "past_value.0", "past_value.1"]
    assert [o.name for o in model.graph.output] == ["logits", "past_key.0_RetainedState", "past_key.1_RetainedState",
                                                    "past_value.0_RetainedState", "past_value.1_RetainedState"]


def test_retained_state_naming_can_be_turned_off() -> None:
    lowered = qtrace.lower(tiny_lm, TINY_SPECS, retained_state=False)
    assert [o.name for o in lowered.model.graph.output] == ["logits", "new_0", "new_1", "new_2"]


def test_two_scatters_of_one_input_are_one_retained_state() -> None:
    def fn(cache: Any, position_ids: Any, k: Any) -> Any:
        once = qp.ctx_scatter(cache, position_ids, k)
        return {"updated": qp.ctx_scatter(once, position_ids + 1, k * 2.0)}

    specs = (ShapeDtype(("B", 1, "C", 2)), ShapeDtype(("B", "S"), "int64"), ShapeDtype(("B", 1, "S", 2)))
    assert [o.name for o in qtrace.lower(fn, specs).model.graph.output] == ["cache_RetainedState"]


def test_input_returned_unchanged_keeps_its_output_name() -> None:
    lowered = qtrace.lower(lambda cache, x: {"same": cache, "y": x * 2.0},
                           (ShapeDtype((2, 3)), ShapeDtype((2,))))
    assert [o.name for o in lowered.model.graph.output] == ["same", "y"]


# -- constant shapes -------------------------------------------------------------------------------------
SHAPE_ARITHMETIC = {"Shape", "Gather", "Unsqueeze", "Concat"}


def test_static_reshape_emits_no_shape_arithmetic() -> None:
    lowered = qtrace.lower(lambda x: x.reshape(4, 6).T.reshape(2, 12), (ShapeDtype((2, 3, 4)),))
    assert {n.op_type for n in lowered.model.graph.node} & SHAPE_ARITHMETIC == set()


def test_reshape_keeping_symbolic_dims_emits_no_shape_arithmetic() -> None:
    def fn(x: Any) -> Any:
        heads = x.reshape(x.shape[0], x.shape[1], 2, 4)
        return heads.reshape(x.shape[0], x.shape[1], 8), x.reshape(-1, 8)

    lowered = qtrace.lower(fn, (ShapeDtype(("B", "S", 8)),))
    assert {n.op_type for n in lowered.model.graph.node} & SHAPE_ARITHMETIC == set()


def test_attention_shaped_model_emits_no_shape_arithmetic() -> None:
    def attention(x: Any) -> Any:
        batch, seq = x.shape[0], x.shape[1]
        q = (x @ LAYER_WEIGHTS[0]).reshape(batch, seq, 2, 4).transpose(0, 2, 1, 3)
        k = (x @ LAYER_WEIGHTS[1]).reshape(batch, seq, 2, 4).transpose(0, 2, 3, 1)
        probs = qp.softmax(q @ k * 0.5, axis=-1)
        return (probs @ q).transpose(0, 2, 1, 3).reshape(batch, seq, 8)

    lowered = qtrace.lower(attention, (ShapeDtype(("B", "S", 8)),))
    assert {n.op_type for n in lowered.model.graph.node} & SHAPE_ARITHMETIC == set()
    x = np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    assert_matches(lowered.run(x), attention(x))


# -- opsets ----------------------------------------------------------------------------------------------
def _opset_sensitive(x: Any) -> Any:
    """Reductions change form at opset 18, Gelu becomes an ONNX op at 20."""
    return x.sum(-1), x.mean(1), x.max(-1), x.min(0), qp.rms_norm(x, NORM[:4]), qp.gelu(x), qp.gelu(x, "tanh")


@pytest.mark.parametrize("opset", [17, 18, 19, 20, 21])
def test_each_supported_opset_is_declared_and_runs(opset: int, tmp_path: Any) -> None:
    lowered = qtrace.lower(_opset_sensitive, (ShapeDtype(("B", 3, 4)),), opset=opset)
    assert ("", opset) in {(o.domain, o.version) for o in lowered.model.opset_import}
    save_and_check(lowered, tmp_path)
    x = np.random.default_rng(opset).standard_normal((2, 3, 4)).astype(np.float32)
    for got, expected in zip(lowered.run(x), _opset_sensitive(x)):
        assert_matches(got, expected)


@pytest.mark.parametrize("opset, axes_as_input", [(17, False), (18, True)])
def test_reduce_mean_takes_axes_as_input_from_opset_18(opset: int, axes_as_input: bool) -> None:
    lowered = qtrace.lower(lambda x: x.mean(-1), (ShapeDtype(("B", 4)),), opset=opset, passes=())
    (node,) = [n for n in lowered.model.graph.node if n.op_type == "ReduceMean"]
    assert (len(node.input) == 2) == axes_as_input
    assert any(a.name == "axes" for a in node.attribute) == (not axes_as_input)


# -- float16 -----------------------------------------------------------------------------------------------
def test_float16_lowering_has_float16_inputs_and_outputs(tiny: Any) -> None:
    lowered = qtrace.lower(tiny_lm, TINY_SPECS, dtype="float16")
    f16 = onnx.TensorProto.FLOAT16
    types = {v.name: v.type.tensor_type.elem_type for v in list(lowered.model.graph.input) + list(lowered.model.graph.output)}
    assert types == {"x": f16, "position_ids": onnx.TensorProto.INT64, "past_key_0": f16, "past_key_1": f16,
                     "past_key_2": f16, "logits": f16, "past_key_0_RetainedState": f16,
                     "past_key_1_RetainedState": f16, "past_key_2_RetainedState": f16}


def test_float16_lowering_runs_close_to_float32_reference(tmp_path: Any) -> None:
    lowered = qtrace.lower(tiny_lm, TINY_SPECS, dtype="float16")
    save_and_check(lowered, tmp_path)
    args = tiny_inputs()
    got, expected = lowered.run(*args), tiny_lm(*args)
    for name, ref in expected.items():
        out = got[name]
        assert out.dtype == np.float16
        np.testing.assert_allclose(out.astype(np.float32), ref, rtol=2e-2, atol=2e-2, err_msg=name)


def test_float16_lowering_keeps_a_large_mask_finite() -> None:
    def masked(x: Any) -> Any:
        return qp.softmax(np.where(x > 0, x, np.float32(-1e30)), axis=-1)

    lowered = qtrace.lower(masked, (ShapeDtype(("B", 4)),), dtype="float16")
    x = np.array([[1.0, -1.0, 2.0, -3.0], [-1.0, -2.0, -3.0, 0.5]], np.float32)
    got = lowered.run(x)
    np.testing.assert_allclose(got.astype(np.float32), masked(x), atol=2e-3)


def test_float16_lowering_of_a_float32_arange_runs() -> None:
    def rope_angles(position_ids: Any) -> Any:
        inv_freq = 1.0 / (10000.0 ** (qp.arange(position_ids.shape[1], dtype=np.float32) / 8.0))
        return np.cos(position_ids.astype(np.float32)[:, :, None] * inv_freq)

    lowered = qtrace.lower(rope_angles, (ShapeDtype(("B", "S"), "int64"),), dtype="float16")
    onnx.checker.check_model(lowered.model, full_check=True)
    positions = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], np.int64)
    np.testing.assert_allclose(lowered.run(positions).astype(np.float32), rope_angles(positions), atol=5e-3)


# -- reproducibility -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("external_data", [False, True])
def test_lowering_twice_gives_byte_identical_files(tmp_path: Any, external_data: bool) -> None:
    files = []
    for attempt in ("first", "second"):
        directory = tmp_path / attempt
        lowered = qtrace.lower(tiny_lm, TINY_SPECS)
        written = lowered.save(directory / "model.onnx", external_data=external_data, size_threshold=64)
        files.append({os.path.basename(p): open(p, "rb").read() for p in written})
    assert files[0].keys() == files[1].keys()
    assert len(files[0]) == (2 if external_data else 1)
    for name in files[0]:
        assert files[0][name] == files[1][name], name


def test_lowering_in_another_process_gives_identical_bytes(tmp_path: Any) -> None:
    script = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_lowering_model as m; "
              "m.qtrace.lower(m.tiny_lm, m.TINY_SPECS).save(sys.argv[1])")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    # run from another working directory too: nothing in the bytes may depend on it
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "other.onnx")], check=True, env=env,
                   cwd=str(tmp_path))
    qtrace.lower(tiny_lm, TINY_SPECS).save(tmp_path / "here.onnx")
    assert (tmp_path / "other.onnx").read_bytes() == (tmp_path / "here.onnx").read_bytes()


# -- errors ------------------------------------------------------------------------------------------------
def _no_rule(name: str) -> Primitive:
    """A primitive that has a shape rule and numpy reference but no lowering (not registered anywhere)."""
    return Primitive(name, lambda x: x, lambda x: x)


def test_all_primitives_without_a_rule_fail_together() -> None:
    first, second = _no_rule("frobnicate"), _no_rule("defrobnicate")

    def fn(x: Any) -> Any:
        a = first.bind(x)  # marker: first
        b = second.bind(x * 2.0)  # marker: second
        return a + b, first.bind(b)

    with pytest.raises(qtrace.LoweringError) as info:
        qtrace.lower(fn, (ShapeDtype(("B", 3)),))
    message = str(info.value)
    assert "frobnicate" in message and "defrobnicate" in message
    assert f":{line_of(fn, 'marker: first')}" in message and f":{line_of(fn, 'marker: second')}" in message


def test_unsupported_dtype_for_an_op_is_a_qtrace_error() -> None:
    def fn(x: Any) -> Any:
        return np.exp(x)  # marker: exp of ints

    with pytest.raises(qtrace.DTypeError) as info:
        qtrace.lower(fn, (ShapeDtype(("B",), "int64"),))
    assert "exp" in str(info.value) and "i64" in str(info.value)
    assert info.value.location.line == line_of(fn, "marker: exp of ints")


@pytest.mark.parametrize("fn, dtype, onnx_op", [
    (lambda x: x @ x, "int8", "MatMul"),
    (lambda x: -x, "uint8", "Neg"),
    (lambda x: x ** x, "int16", "Pow"),
    (lambda x: x.max(0), "int16", "ReduceMax"),
], ids=["matmul_int8", "neg_uint8", "pow_int16", "max_int16"])
def test_dtype_onnx_does_not_accept_is_a_lowering_error(fn: Any, dtype: str, onnx_op: str) -> None:
    with pytest.raises(qtrace.LoweringError) as info:
        qtrace.lower(fn, (ShapeDtype((2, 2), dtype),))
    assert onnx_op in str(info.value) and dtype in str(info.value)
    assert info.value.location is not None and info.value.location.file == __file__


def test_float16_is_the_only_conversion_dtype() -> None:
    with pytest.raises(qtrace.LoweringError, match="float16"):
        qtrace.lower(lambda x: x + 1.0, (ShapeDtype((2,)),), dtype="int8")


def test_two_inputs_with_one_name_is_an_error() -> None:
    with pytest.raises(qtrace.TraceError, match="'x'"):
        qtrace.lower(lambda a, b: a + b, (ShapeDtype((2,)), ShapeDtype((2,))), input_names=["x", "x"])


def test_two_outputs_with_one_name_is_an_error() -> None:
    with pytest.raises(qtrace.TraceError, match="'y'"):
        qtrace.lower(lambda a: (a + 1.0, a * 2.0), (ShapeDtype((2,)),), output_names=["y", "y"])


def test_output_named_like_an_input_is_an_error() -> None:
    with pytest.raises(qtrace.QtraceError, match="'x'"):
        qtrace.lower(lambda x: {"x": x + 1.0}, (ShapeDtype((2,)),))


def test_retained_state_names_that_collide_are_an_error() -> None:
    def fn(cache: Any, position_ids: Any, k: Any) -> Any:
        return {"a": qp.ctx_scatter(cache, position_ids, k), "b": qp.ctx_scatter(cache, position_ids, k * 2.0)}

    specs = (ShapeDtype(("B", 1, "C", 2)), ShapeDtype(("B", "S"), "int64"), ShapeDtype(("B", 1, "S", 2)))
    with pytest.raises(qtrace.QtraceError, match="cache_RetainedState"):
        qtrace.lower(fn, specs)


def test_constant_named_like_an_output_is_renamed(tmp_path: Any) -> None:
    weight = np.arange(3, dtype=np.float32)
    lowered = qtrace.lower(lambda x: {"weight": x + weight}, (ShapeDtype((3,)),))
    save_and_check(lowered, tmp_path)
    assert_matches(lowered.run(np.ones(3, np.float32))["weight"], np.ones(3, np.float32) + weight)


@pytest.mark.parametrize("result", ["hello", 3, 1.5], ids=["str", "int", "float"])
def test_output_that_is_not_a_traced_value_is_an_error(result: Any) -> None:
    with pytest.raises(qtrace.TraceError, match="not an array"):
        qtrace.lower(lambda x: (x + 1.0, result), (ShapeDtype((2,)),))


def test_retained_state_output_with_another_shape_is_an_error() -> None:
    def fn(cache: Any, position_ids: Any, k: Any) -> Any:
        return {"cache_RetainedState": qp.ctx_scatter(cache, position_ids, k)[:, :, :-1]}  # marker: shrunk

    specs = (ShapeDtype(("B", 1, "C", 2)), ShapeDtype(("B", "S"), "int64"), ShapeDtype(("B", 1, "S", 2)))
    with pytest.raises(qtrace.ShapeError) as info:
        qtrace.lower(fn, specs)
    assert "cache_RetainedState" in str(info.value) and "f32[B,1,C,2]" in str(info.value)
    assert info.value.location.line == line_of(fn, "marker: shrunk")


def test_retained_state_output_with_another_dtype_is_an_error() -> None:
    def fn(cache: Any, position_ids: Any, k: Any) -> Any:
        return {"cache_RetainedState": qp.ctx_scatter(cache, position_ids, k).astype(np.float16)}

    specs = (ShapeDtype(("B", 1, "C", 2)), ShapeDtype(("B", "S"), "int64"), ShapeDtype(("B", 1, "S", 2)))
    with pytest.raises(qtrace.ShapeError, match="cache_RetainedState"):
        qtrace.lower(fn, specs)


def test_reversing_a_symbolic_dim_runs_at_two_sizes():
    """x[:, ::-1] keeps a symbolic length; onnxruntime reverses like numpy at any size."""
    lowered = qtrace.lower(lambda x: x[:, ::-1], (qtrace.ShapeDtype(("b", "s")),))
    assert str(lowered.graph.outputs[0].aval) == "f32[b,s]"
    for size in (3, 6):
        x = np.arange(2 * size, dtype=np.float32).reshape(2, size)
        np.testing.assert_array_equal(lowered.run(x), x[:, ::-1])


def test_a_constant_a_rule_returns_stays_shared_inside_a_function() -> None:
    """arange(2) lowers to the cached constant [0, 1]; the later Unsqueeze axes (0, 1) reuse the same
    bytes, so the constant must keep its name (regression: it was renamed and the axes dangled)."""
    @qtrace.function
    def body(x: Any) -> Any:
        return x + qp.expand_dims(qp.arange(2), (0, 1)).astype(np.float32)

    lowered = qtrace.lower(lambda x: body(x) * 2, (ShapeDtype(("b", 3, 2)),), passes=["shape_check"])
    onnx.checker.check_model(lowered.model, full_check=True)
    x = np.random.default_rng(0).random((2, 3, 2)).astype(np.float32)
    np.testing.assert_allclose(lowered.run(x), (x + np.arange(2)) * 2, rtol=1e-6)


def test_assigning_to_a_reversed_symbolic_dim_runs_at_two_sizes():
    def fn(x: Any, v: Any) -> Any:
        x[:, ::-1] = v
        return x

    lowered = qtrace.lower(fn, (ShapeDtype((2, "s")), ShapeDtype((2, "s"))))
    for size in (3, 5):
        x = np.zeros((2, size), np.float32)
        v = np.arange(2 * size, dtype=np.float32).reshape(2, size)
        expected = x.copy()
        expected[:, ::-1] = v
        np.testing.assert_array_equal(lowered.run(x, v), expected)
