"""The IR dump (docs/architecture.md, "The IR"): one equation per line,

    %name: dtype[shape] = op(operands) {params}    # file.py:line (function)

inside `graph name(inputs) { ... return {output names: values} }`, identical on every run."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import textwrap

import numpy as np

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype

from conftest import line_of


def normalized(dump: str) -> str:
    """The dump with the padding before each `#` comment collapsed to two spaces."""
    return "\n".join(re.sub(r"\s+# ", "  # ", line.rstrip()) for line in dump.splitlines())


def attention_scores(q, k):
    scores = q @ k.T  # line: scores
    return {"probs": qp.softmax(scores * 0.5, axis=-1)}  # line: probs


def test_dump_of_a_small_function_is_the_golden_text():
    graph = qtrace.trace(attention_scores, (ShapeDtype(("seq_len", 4)), ShapeDtype(("ctx_len", 4))))
    scores, probs = line_of(attention_scores, "# line: scores"), line_of(attention_scores, "# line: probs")
    expected = textwrap.dedent(f"""\
        graph attention_scores(q: f32[seq_len,4], k: f32[ctx_len,4]) {{
          %0: f32[4,ctx_len] = transpose(k) {{perm=(1,0)}}  # test_printer.py:{scores} (attention_scores)
          %1: f32[seq_len,ctx_len] = matmul(q, %0)  # test_printer.py:{scores} (attention_scores)
          %2: f32[seq_len,ctx_len] = mul(%1, 0.5:f32)  # test_printer.py:{probs} (attention_scores)
          %3: f32[seq_len,ctx_len] = softmax(%2) {{axis=1}}  # test_printer.py:{probs} (attention_scores)
          return {{probs: %3}}
        }}""")
    assert normalized(str(graph)) == expected


EQUATION = re.compile(
    r"^  (?:%[\w./]+: \w+\[[\w,*+-]*\]|_)(?:, (?:%[\w./]+: \w+\[[\w,*+-]*\]|_))* = [a-z_]+\([^)]*\)"
    r"(?: \{[^}]*\})?\s+# [\w.]+\.py:\d+ \([\w<>]+\)$")
HEADER = re.compile(r"^(graph|function) [\w.]+\((?:[\w.]+: \w+\[[\w,*+-]*\](?:, )?)*\) \{$")
CONSTANT = re.compile(r"^  const [\w.]+: \w+\[[\w,*+-]*\]$")
RETURN = re.compile(r"^  return \{(?:[\w.]+: %?[\w./]+(?:, )?)*\}$")


def decoder_step(params, input_ids, position_ids, past_key):
    hidden = qp.take(params["embed.weight"], input_ids, axis=0)
    hidden = qp.rms_norm(hidden, params["norm"], eps=1e-5)
    keys = (hidden @ params["wk"]).reshape(hidden.shape[0], hidden.shape[1], 1, 4).transpose(0, 2, 1, 3)
    past_key = qp.ctx_scatter(past_key, position_ids, keys)
    return {"logits": hidden @ params["embed.weight"].T, "past_key.0_RetainedState": past_key}


def decoder_graph():
    rng = np.random.default_rng(0)
    params = {"embed.weight": rng.standard_normal((10, 4)).astype(np.float32),
              "norm": np.ones(4, np.float32), "wk": rng.standard_normal((4, 4)).astype(np.float32)}
    return qtrace.trace(functools.partial(decoder_step, params),
                        (ShapeDtype(("batch_size", "seq_len"), "int64"), ShapeDtype(("batch_size", "seq_len"), "int64"),
                         ShapeDtype(("batch_size", 1, "ctx_len", 4))))


def test_every_line_of_a_dump_has_the_section_3_form():
    lines = str(decoder_graph()).splitlines()
    assert HEADER.match(lines[0]), lines[0]
    assert lines[-1] == "}"
    assert RETURN.match(lines[-2]), lines[-2]
    for line in lines[1:-2]:
        assert CONSTANT.match(line) or EQUATION.match(line), line


def test_dump_header_lists_inputs_with_their_types():
    first = str(decoder_graph()).splitlines()[0]
    assert first == ("graph decoder_step(input_ids: i64[batch_size,seq_len], position_ids: i64[batch_size,seq_len], "
                     "past_key: f32[batch_size,1,ctx_len,4]) {")


def test_dump_shows_parameters_constants_and_named_outputs():
    dump = str(decoder_graph())
    assert "  const embed.weight: f32[10,4]" in dump
    assert "= take(embed.weight, input_ids) {axis=0}" in dump
    assert "= rms_norm(%" in dump and "{eps=1e-05}" in dump
    assert "= ctx_scatter(past_key, position_ids, %" in dump
    assert re.search(r"return \{logits: %\S+, past_key\.0_RetainedState: %\S+\}", dump)


def test_dump_is_the_same_text_when_traced_twice():
    assert str(decoder_graph()) == str(decoder_graph())


SCRIPT = """
import functools, sys
import numpy as np
import qtrace, qtrace.primitives as qp
from qtrace import ShapeDtype

def block(weights, x, positions, cache):
    h = qp.rms_norm(x, weights["norm"]) @ weights["w"]
    with qtrace.scope("attn"):
        parts = np.split(h, 2, axis=-1)
        cache = qp.ctx_scatter(cache, positions, parts[0][:, None])
    return {"out": qp.softmax(parts[1] * 0.5), "cache": cache}

weights = {"norm": np.ones(8, np.float32), "w": np.ones((8, 8), np.float32)}
graph = qtrace.trace(functools.partial(block, weights),
                     (ShapeDtype(("b", "s", 8)), ShapeDtype(("b", "s"), "int64"), ShapeDtype(("b", 1, "c", 4))))
sys.stdout.write(str(graph))
"""


def test_dump_is_the_same_text_across_processes_with_different_hash_seeds(tmp_path):
    script = tmp_path / "model.py"
    script.write_text(SCRIPT)
    dumps = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                             check=True)
        dumps.append(run.stdout)
    assert dumps[0] == dumps[1]
    assert dumps[0].startswith("graph block(x: f32[b,s,8], positions: i64[b,s], cache: f32[b,1,c,4]) {")


def test_unused_outputs_print_as_underscore():
    graph = qtrace.trace(lambda x: np.split(x, [1], axis=0)[1], (ShapeDtype((3,)),))
    (line,) = [line for line in str(graph).splitlines() if "split(" in line]
    assert line.startswith("  _, %")


def test_scalar_constants_print_inline_with_their_dtype():
    graph = qtrace.trace(lambda x: x * 2 + 1.5, (ShapeDtype((3,), "float16"),))
    dump = str(graph)
    assert "mul(x, 2.0:f16)" in dump
    assert re.search(r"add\(%\w+, 1\.5:f16\)", dump)


def test_scoped_values_print_with_their_scope():
    def fn(x):
        with qtrace.scope("layers.0/mlp"):
            return x * 2

    assert "%layers.0/mlp/0: f32[2] = mul(x, 2.0:f32)" in str(qtrace.trace(fn, (ShapeDtype((2,)),)))


@qtrace.function
def doubled(x):
    return x * 2


def test_function_bodies_print_once_before_the_graph():
    graph = qtrace.trace(lambda x: doubled(doubled(x)), (ShapeDtype((2,)),))
    dump = str(graph)
    assert dump.count("function doubled(x: f32[2]) {") == 1
    assert dump.index("function doubled(") < dump.index("graph ")
    assert dump.count("= call(") == 2 and "{function=doubled}" in dump


def test_dot_output_has_a_box_per_operation_and_an_ellipse_per_input():
    graph = qtrace.trace(lambda x, y: np.exp(x) + y, (ShapeDtype((2,)), ShapeDtype((2,))))
    dot = graph.to_dot()
    assert dot.startswith('digraph "lambda" {')
    assert dot.count("shape=box") == 2
    assert dot.count("shape=ellipse,") == 2 + 1  # two inputs, one output
    assert dot == graph.to_dot()
