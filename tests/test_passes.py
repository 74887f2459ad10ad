"""Passes (docs/architecture.md, "Passes"): every registered pass keeps Graph.eval unchanged (on
hypothesis-generated graphs and on the example models); the pass manager runs passes by name, dumps
the IR after each and, in debug mode, names a pass that breaks the graph; shape_check reports
inconsistencies with the node's line and context; `qtrace dump`. (Shape errors in the examples
pointing at the example's file:line: test_source_locations.py.)"""

from __future__ import annotations

import collections
import copy
import functools
import math
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import qtrace
import qtrace.primitives as qp
from qtrace import CheckError, ShapeDtype
from qtrace.cli import main as cli_main
from qtrace.examples import numpy_decoder
from qtrace.examples.checkpoint import random_model
from qtrace.examples.families.llama import tiny_config
from qtrace.ir import Graph
from qtrace.passes import DEFAULT_PIPELINE, PASSES, register_pass, run_pipeline
from qtrace.passes.shape_check import check_graph
from qtrace.primitives import PRIMITIVES

from conftest import assert_located

EXAMPLES_DIR = os.path.dirname(numpy_decoder.__file__)
# Every pass registered by qtrace itself that keeps values; a pass added later is picked up here
# automatically. float16 changes the model's precision by design (tested on its own below).
BUILTIN_PASSES = sorted(name for name in PASSES if not name.startswith("test_") and name != "float16")


def ops(graph: Graph) -> collections.Counter:
    return collections.Counter(node.op for node in graph.nodes)


def assert_same_results(before, after, scale_tolerance: float = 1e-5) -> None:
    assert len(before) == len(after)
    for want, have in zip(before, after):
        assert have.shape == want.shape and have.dtype == want.dtype
        finite = np.abs(want[np.isfinite(want)]) if np.issubdtype(want.dtype, np.floating) else np.abs(want)
        atol = scale_tolerance * max(1.0, float(finite.max()) if finite.size else 1.0)
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=atol, equal_nan=True)


# -- hypothesis-generated graphs ------------------------------------------------------------------------
# A program is a list of steps over a pool of f32[batch,3,4] values; each step reads pool entries and
# appends one. The steps cover what the passes rewrite (written-out fusions, identities, cancelling
# pairs, foldable constants, duplicates, dead code) and keep values bounded so float error stays small.

VEC = np.linspace(-1.0, 1.0, 4, dtype=np.float32)        # broadcasts over the last axis
VEC_T = np.linspace(0.5, 1.5, 3, dtype=np.float32)[:, None]  # [3,1], for transposed values
NORM_WEIGHT = np.linspace(0.8, 1.2, 4, dtype=np.float32)


def _softmax(a, axis):
    e = np.exp(a - a.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


STEPS = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * np.tanh(b),
    "div": lambda a, b: a / (np.abs(b) + 1),
    "maximum": lambda a, b: np.maximum(a, b),
    "where": lambda a, b: np.where(a > b, a, b * 0.5),
    "add_vector": lambda a, b: a + VEC,
    "exp": lambda a, b: np.exp(np.tanh(a)),
    "neg": lambda a, b: -a,
    "sqrt": lambda a, b: np.sqrt(np.abs(a) + 1),
    "center": lambda a, b: a - a.mean(-1, keepdims=True),
    "scale_by_max": lambda a, b: a * np.tanh(a.max(1, keepdims=True)),
    "scale_by_sum": lambda a, b: a / (np.abs(a).sum(axis=(1, 2), keepdims=True) + 1),
    "transpose_twice": lambda a, b: a.transpose(0, 2, 1).transpose(0, 2, 1),
    "transpose_around": lambda a, b: (a.transpose(0, 2, 1) * VEC[:, None]).transpose(0, 2, 1) + b,
    "transpose_add": lambda a, b: (a.transpose(0, 2, 1) * VEC_T.T[None] + b.transpose(0, 2, 1)).transpose(0, 2, 1),
    "reshape_twice": lambda a, b: a.reshape(a.shape[0], 12).reshape(a.shape[0], 2, 6).reshape(a.shape),
    "cast_lossless": lambda a, b: a.astype(np.float64).astype(np.float32),
    "cast_lossy": lambda a, b: a.astype(np.float16).astype(np.float32),
    "times_one_plus_zero": lambda a, b: 0.0 + a * 1.0,
    "identity_reshape": lambda a, b: a.reshape(a.shape) / 1.0,
    "broadcast_constant": lambda a, b: qp.broadcast_to(VEC, a.shape) + a,
    "broadcast_value": lambda a, b: qp.broadcast_to(a[:, :1, :], a.shape) * np.tanh(b),
    "fold_constant": lambda a, b: a * qp.exp(qp.negative(VEC)),
    "duplicate": lambda a, b: np.exp(np.tanh(a)) + np.exp(np.tanh(a)),
    "dead_code": lambda a, b: (a * b * 3.0, a)[1],
    "rms_norm": lambda a, b: a * (1 / np.sqrt(np.mean(a * a, -1, keepdims=True) + 1e-5)) * NORM_WEIGHT,
    "softmax_last": lambda a, b: _softmax(a, -1),
    "softmax_middle": lambda a, b: _softmax(a, 1),
    "silu": lambda a, b: a * (1 / (1 + np.exp(-a))),
    "gelu": lambda a, b: 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3))),
    "gelu_erf": lambda a, b: 0.5 * a * (1 + qp.erf(a / math.sqrt(2))),
}

step = st.tuples(st.sampled_from(sorted(STEPS)), st.integers(0, 63), st.integers(0, 63))
programs = st.fixed_dictionaries({
    "steps": st.lists(step, min_size=1, max_size=10),
    "outputs": st.lists(st.integers(0, 63), min_size=1, max_size=3),
    "as_function": st.booleans(),  # run the steps as a @qtrace.function called twice
})
VALUE = ShapeDtype(("batch", 3, 4))


def build_model(program):
    def steps(x, y):
        pool = [x, y]
        for name, i, j in program["steps"]:
            pool.append(STEPS[name](pool[i % len(pool)], pool[j % len(pool)]))
        return tuple(pool[2 + k % (len(pool) - 2)] for k in program["outputs"])

    if not program["as_function"]:
        return steps

    block = qtrace.function(steps, name="block")

    def model(x, y):  # y is the same value in both calls: work on it alone can be hoisted
        first = block(x, y)
        return first + block(first[0], y)

    return model


def program_inputs(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(2)]


@pytest.mark.parametrize("pass_name", BUILTIN_PASSES)
@settings(max_examples=30, deadline=None)
@given(program=programs)
def test_pass_keeps_values_of_generated_graphs(pass_name, program):
    graph = qtrace.trace(build_model(program), (VALUE, VALUE))
    inputs = program_inputs()
    before = graph.eval_flat(inputs)
    run_pipeline(graph, [pass_name])
    check_graph(graph)
    assert_same_results(before, graph.eval_flat(inputs))


@settings(max_examples=30, deadline=None)
@given(program=programs)
def test_default_pipeline_keeps_values_of_generated_graphs(program):
    graph = qtrace.trace(build_model(program), (VALUE, VALUE))
    inputs = program_inputs(1)
    before = graph.eval_flat(inputs)
    run_pipeline(graph)
    assert_same_results(before, graph.eval_flat(inputs))


# -- the example models ---------------------------------------------------------------------------------


def llama_model(layer_functions: bool):
    model = random_model(tiny_config())
    cfg = model.cfg
    fn, args = model.signature(layer_functions=layer_functions)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (2, 3))
    positions = np.array([[0, 1, 2], [4, 5, 6]])
    cache = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.empty_cache(2, 8).items()}
    return fn, args, (ids, positions, cache)


def numpy_decoder_model():
    cfg = numpy_decoder.DecoderConfig(num_layers=2)
    fn, args = numpy_decoder.decoder_signature(cfg, numpy_decoder.init_params(cfg))
    return fn, args, numpy_decoder.example_inputs(cfg)


EXAMPLE_MODELS = {
    "llama_with_layer_functions": functools.partial(llama_model, True),
    "llama_inlined": functools.partial(llama_model, False),
    "numpy_decoder": numpy_decoder_model,
}


def eval_outputs(graph, inputs):
    return list(graph.eval(*copy.deepcopy(inputs)).values())


@pytest.mark.parametrize("pass_name", BUILTIN_PASSES + ["<default pipeline>"])
@pytest.mark.parametrize("model", sorted(EXAMPLE_MODELS))
def test_pass_keeps_values_of_example_model(model, pass_name):
    fn, args, inputs = EXAMPLE_MODELS[model]()
    graph = qtrace.trace(fn, args)
    before = eval_outputs(graph, inputs)
    run_pipeline(graph, None if pass_name.startswith("<") else [pass_name])
    check_graph(graph)
    assert_same_results(before, eval_outputs(graph, inputs))


# -- the pass manager -----------------------------------------------------------------------------------


def written_softmax(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


SCORES = ShapeDtype(("batch", 8))


def test_pipeline_runs_the_named_passes_in_order():
    graph = qtrace.trace(written_softmax, (SCORES,))
    report = run_pipeline(graph, ["shape_check", "fuse", "dce"])
    assert [r.name for r in report.records] == ["shape_check", "fuse", "dce"]
    assert ops(graph) == {"softmax": 1}


def test_pipeline_records_node_counts_and_whether_a_pass_changed_the_graph():
    graph = qtrace.trace(written_softmax, (SCORES,))
    traced = len(graph.nodes)
    report = run_pipeline(graph, ["shape_check", "fuse"])
    check, fuse = report.records
    assert (check.nodes_before, check.nodes_after, check.changed) == (traced, traced, False)
    assert (fuse.nodes_before, fuse.nodes_after, fuse.changed) == (traced, 1, True)


def test_unknown_pass_is_an_error_naming_it_and_runs_nothing():
    graph = qtrace.trace(written_softmax, (SCORES,))
    printed = str(graph)
    with pytest.raises(CheckError, match="no_such_pass") as info:
        run_pipeline(graph, ["fuse", "no_such_pass"])
    assert "fuse" in str(info.value)  # the registered passes are listed
    assert str(graph) == printed


def test_default_pipeline_is_used_when_no_passes_are_named():
    graph = qtrace.trace(written_softmax, (SCORES,))
    report = run_pipeline(graph)
    assert [r.name for r in report.records] == list(DEFAULT_PIPELINE)


def test_lower_runs_the_given_passes():
    lowered = qtrace.lower(written_softmax, (SCORES,), passes=["canonicalize", "fuse"])
    assert [r.name for r in lowered.pass_report.records] == ["canonicalize", "fuse"]
    assert ops(lowered.graph) == {"softmax": 1}
    assert [n.op_type for n in lowered.model.graph.node] == ["Softmax"]


def test_lower_with_no_passes_keeps_the_written_form():
    lowered = qtrace.lower(written_softmax, (SCORES,), passes=[])
    assert lowered.pass_report.records == []
    assert "softmax" not in ops(lowered.graph)
    assert "Exp" in {n.op_type for n in lowered.model.graph.node}


def test_lower_with_an_unknown_pass_is_an_error():
    with pytest.raises(CheckError, match="no_such_pass"):
        qtrace.lower(written_softmax, (SCORES,), passes=["no_such_pass"])


def dump_files(directory) -> set[str]:
    return set(os.listdir(directory))


def without_comments(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


def test_dump_dir_holds_the_trace_each_pass_and_a_summary(tmp_path):
    graph = qtrace.trace(written_softmax, (SCORES,))
    traced_text, traced_nodes = str(graph), len(graph.nodes)
    run_pipeline(graph, ["canonicalize", "fuse"], dump_dir=str(tmp_path))
    assert dump_files(tmp_path) == {"00-trace.ir", "00-trace.dot", "01-canonicalize.ir", "01-canonicalize.dot",
                                    "02-fuse.ir", "02-fuse.dot", "summary.txt"}
    assert without_comments((tmp_path / "00-trace.ir").read_text()) == traced_text
    assert without_comments((tmp_path / "02-fuse.ir").read_text()) == str(graph)
    assert (tmp_path / "02-fuse.dot").read_text().startswith("digraph")
    lines = [line for line in (tmp_path / "summary.txt").read_text().splitlines() if re.match(r"\d\d ", line)]
    counts = [tuple(map(int, re.search(r"nodes\s+(\d+)\s*->\s*(\d+)", line).groups())) for line in lines]
    assert counts == [(traced_nodes, traced_nodes), (traced_nodes, len(graph.nodes))]
    assert "canonicalize" in lines[0] and "fuse" in lines[1]


def test_lower_writes_dumps_to_dump_dir(tmp_path):
    qtrace.lower(written_softmax, (SCORES,), passes=["fuse"], dump_dir=str(tmp_path))
    assert {"00-trace.ir", "01-fuse.ir", "01-fuse.dot", "summary.txt"} <= dump_files(tmp_path)
    assert "= softmax(" in (tmp_path / "01-fuse.ir").read_text()
    assert "= softmax(" not in (tmp_path / "00-trace.ir").read_text()


def test_qtrace_dump_environment_variable_writes_dumps(tmp_path, monkeypatch):
    monkeypatch.setenv("QTRACE_DUMP", str(tmp_path / "dumps"))
    qtrace.lower(written_softmax, (SCORES,), passes=["canonicalize", "fuse"])
    assert {"00-trace.ir", "01-canonicalize.ir", "02-fuse.ir", "summary.txt"} <= dump_files(tmp_path / "dumps")


@pytest.fixture
def temporary_pass():
    """Register passes for one test only."""
    names = []

    def register(name, fn):
        register_pass(name)(fn)
        names.append(name)

    yield register
    for name in names:
        PASSES.pop(name, None)


def turn_adds_into_subs(graph: Graph) -> bool:
    """A broken pass: types stay right, values change."""
    for node in [n for n in graph.nodes if n.op == "add"]:
        (new,) = graph.apply(PRIMITIVES["sub"], *node.inputs, location=node.location)
        graph.replace_all_uses(node.outputs[0], new)
        graph.remove_node(node)
    return True


def mislabel_a_dtype(graph: Graph) -> bool:
    """A broken pass: records a value with a type its producer does not give."""
    out = graph.nodes[0].outputs[0]
    out.aval = ShapeDtype(out.shape, "float16")
    return True


def test_debug_mode_names_a_pass_that_changes_values(temporary_pass):
    temporary_pass("test_turn_adds_into_subs", turn_adds_into_subs)
    graph = qtrace.trace(lambda x, y: x + y, (SCORES, SCORES))
    with pytest.raises(CheckError, match="pass test_turn_adds_into_subs changed the value of output"):
        run_pipeline(graph, ["canonicalize", "test_turn_adds_into_subs", "dce"], debug=True)


def test_debug_mode_accepts_a_fusion_that_rounds_once_in_float16():
    # the fused GELU rounds once where the written-out chain rounded at each of its steps: in float16
    # that moves outputs by about 1e-3, which is float rounding, not a changed function
    graph = qtrace.trace(lambda x: 0.5 * x * (1 + qp.erf(x / np.float16(math.sqrt(2)))),
                         (ShapeDtype((64, 64), "float16"),))
    report = run_pipeline(graph, ["canonicalize", "fuse"], debug=True)
    assert collections.Counter(n.op for n in graph.nodes)["gelu"] == 1, report


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_the_debug_tolerance_follows_the_dtypes_epsilon(dtype):
    import ml_dtypes

    from qtrace.dtypes import bfloat16, machine_epsilon

    dtype = bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    assert machine_epsilon(dtype) == float(ml_dtypes.finfo(dtype).eps)


def test_debug_mode_names_a_float16_pass_that_changes_values(temporary_pass):
    temporary_pass("test_turn_adds_into_subs", turn_adds_into_subs)
    graph = qtrace.trace(lambda x, y: x + y, (ShapeDtype((4, 8), "float16"),) * 2)
    with pytest.raises(CheckError, match="pass test_turn_adds_into_subs changed the value of output"):
        run_pipeline(graph, ["test_turn_adds_into_subs"], debug=True)


def test_debug_mode_names_a_pass_that_breaks_types(temporary_pass):
    temporary_pass("test_mislabel_a_dtype", mislabel_a_dtype)
    graph = qtrace.trace(lambda x: np.exp(x) * 2.0, (SCORES,))
    with pytest.raises(CheckError, match="pass test_mislabel_a_dtype broke the graph") as info:
        run_pipeline(graph, ["canonicalize", "test_mislabel_a_dtype"], debug=True)
    assert info.value.op == "exp"


def test_debug_mode_accepts_passes_that_keep_values():
    cfg = numpy_decoder.DecoderConfig(num_layers=1)
    fn, args = numpy_decoder.decoder_signature(cfg, numpy_decoder.init_params(cfg))
    report = run_pipeline(qtrace.trace(fn, args), debug=True)
    assert [r.name for r in report.records] == list(DEFAULT_PIPELINE)


# -- shape_check ----------------------------------------------------------------------------------------


def hand_built_graph():
    graph = Graph("by_hand")
    x = graph.add_input("x", ShapeDtype(("batch", 4)))
    w = graph.add_constant(np.ones(4, np.float32), "w")
    (scaled,) = graph.apply(PRIMITIVES["mul"], x, w)
    (total,) = graph.apply(PRIMITIVES["reduce_sum"], scaled, axes=(1,), keepdims=True)
    graph.set_outputs([total], ["total"])
    return graph, x, w, scaled, total


def test_shape_check_accepts_a_graph_built_with_apply():
    graph, *_ = hand_built_graph()
    check_graph(graph)
    np.testing.assert_allclose(graph.eval_flat([np.full((2, 4), 2.0, np.float32)])[0], [[8.0], [8.0]])


def test_shape_check_reports_a_node_added_with_a_wrong_type_with_context():
    graph, x, w, scaled, total = hand_built_graph()
    bad = graph.add_node(PRIMITIVES["exp"], [total], {}, [ShapeDtype(("batch", 4))])
    graph.set_outputs([bad.outputs[0]], ["total"])
    with pytest.raises(CheckError) as info:
        check_graph(graph)
    error = info.value
    assert error.op == "exp"
    assert "recorded as f32[batch,4] but the rule gives f32[batch,1]" in error.message
    marked = [line for line in error.message.splitlines() if line.startswith(">>")]
    assert len(marked) == 1 and "exp(" in marked[0]
    assert any("reduce_sum(" in line for line in error.message.splitlines())  # the equation before it


def test_shape_check_reports_a_node_whose_operands_the_rule_rejects():
    graph, x, w, scaled, total = hand_built_graph()
    wrong = graph.add_constant(np.ones(3, np.float32), "wrong")
    bad = graph.add_node(PRIMITIVES["add"], [scaled, wrong], {}, [scaled.aval])
    graph.set_outputs([bad.outputs[0]], ["total"])
    with pytest.raises(CheckError, match="the shape rule rejects this node"):
        check_graph(graph)


def test_shape_check_reports_a_node_reading_a_value_from_another_graph():
    graph, *_ = hand_built_graph()
    stranger = Graph("other").add_input("y", ShapeDtype(("batch", 4)))
    bad = graph.add_node(PRIMITIVES["neg"], [stranger], {}, [stranger.aval])
    graph.set_outputs([bad.outputs[0]], ["total"])
    with pytest.raises(CheckError, match="is not defined before this node"):
        check_graph(graph)


def test_shape_check_reports_a_constant_whose_data_disagrees_with_its_type():
    graph, x, w, scaled, total = hand_built_graph()
    w.const = np.ones(5, np.float32)
    with pytest.raises(CheckError, match="constant w"):
        check_graph(graph)


def test_shape_check_reports_an_edited_example_graph_at_the_example_line_with_symbolic_shapes():
    cfg = numpy_decoder.DecoderConfig(num_layers=1)
    fn, args = numpy_decoder.decoder_signature(cfg, numpy_decoder.init_params(cfg))
    graph = qtrace.trace(fn, args)
    (query,) = [n for n in graph.nodes if n.op == "matmul" and n.inputs[1].name == "layers.0.wq"]
    query.outputs[0].aval = ShapeDtype(query.outputs[0].shape[:2] + (31,))
    with pytest.raises(CheckError) as info:
        run_pipeline(graph, ["shape_check"])
    assert_located(info.value, numpy_decoder.attention, 'q = (x @ p["wq"])')
    assert "recorded as f32[batch_size,seq_len,31] but the rule gives f32[batch_size,seq_len,32]" in str(info.value)


# -- `qtrace dump` --------------------------------------------------------------------------------------

DECODER_TARGET = os.path.join(EXAMPLES_DIR, "numpy_decoder.py") + ":decoder"


def test_cli_dump_prints_the_optimized_ir_and_the_pass_summary(capsys):
    assert cli_main(["dump", DECODER_TARGET]) == 0
    out = capsys.readouterr().out
    assert out.count("= rms_norm(") == 5 and out.count("= softmax(") == 2 and "= reduce_mean(" not in out
    summary = [line for line in out.splitlines() if re.match(r"# \d\d ", line)]
    assert [line.split()[2] for line in summary] == list(DEFAULT_PIPELINE)


def test_cli_dump_after_trace_prints_the_traced_ir(capsys):
    assert cli_main(["dump", DECODER_TARGET, "--after", "trace"]) == 0
    out = capsys.readouterr().out
    assert "= reduce_mean(" in out and "rms_norm(" not in out
    assert "input_ids: i64[batch_size,seq_len]" in out


def test_cli_dump_after_a_pass_stops_there(capsys):
    assert cli_main(["dump", DECODER_TARGET, "--after", "fuse"]) == 0
    summary = [line.split()[2] for line in capsys.readouterr().out.splitlines() if re.match(r"# \d\d ", line)]
    assert summary == list(DEFAULT_PIPELINE[:DEFAULT_PIPELINE.index("fuse") + 1])


def test_cli_dump_takes_example_specs_for_a_file_without_example_args(tmp_path, capsys):
    source = tmp_path / "model.py"
    source.write_text("import numpy as np\n\ndef scores(s):\n    e = np.exp(s - s.max(-1, keepdims=True))\n"
                      "    return e / e.sum(-1, keepdims=True)\n")
    assert cli_main(["dump", f"{source}:scores", "--example", "f32[b,8]"]) == 0
    out = capsys.readouterr().out
    assert "graph scores(s: f32[b,8])" in out and "= softmax(s) {axis=1}" in out


def test_cli_dump_dot_prints_graphviz(capsys):
    assert cli_main(["dump", DECODER_TARGET, "--dot"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("digraph") and "rms_norm" in out


def test_cli_dump_reports_an_unknown_pass_to_stop_after(capsys):
    assert cli_main(["dump", DECODER_TARGET, "--after", "no_such_pass"]) == 2
    assert "--after must be trace or one of" in capsys.readouterr().err


def test_cli_dump_reports_a_missing_function(capsys):
    assert cli_main(["dump", os.path.join(EXAMPLES_DIR, "numpy_decoder.py") + ":no_such_function"]) == 2
    assert "has no no_such_function" in capsys.readouterr().err


def test_dump_example_specs_use_the_ir_dtype_names(tmp_path, capsys):
    """`i8[3]` is int8 as in the IR dump (numpy alone would read "i8" as int64)."""
    from qtrace.cli import main

    source = tmp_path / "model.py"
    source.write_text("def double(x):\n    return x + x\n")
    assert main(["dump", f"{source}:double", "--example", "i8[3]", "--after", "trace"]) == 0
    assert "x: i8[3]" in capsys.readouterr().out
