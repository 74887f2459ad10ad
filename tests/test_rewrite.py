"""The rewrite engine (qtrace/passes/rewrite.py, docs/architecture.md "The rewrite engine"): every
rule names the file:line it was written at; the pass report and the IR dumps count which rules fired;
overlapping patterns apply largest first unless a priority says otherwise (LayerNorm over RMSNorm is
tested in test_fusion.py); a rule that declines
leaves the graph as it was; rewriting that never converges is an error naming the rule. Also the
doors the passes go through: the Graph methods (networkx is read-only to them) and the core's
primitive registry (no pass imports qtrace.primitives)."""

from __future__ import annotations

import ast
import collections
import inspect
import os

import networkx
import numpy as np
import pytest

import qtrace
import qtrace.passes
from qtrace import CheckError, ShapeDtype
from qtrace.core import PRIMITIVES
from qtrace.examples import numpy_decoder
from qtrace.passes import fuse as fuse_module, run_pipeline
from qtrace.passes.fuse import FUSIONS
from qtrace.passes.pattern import Pat, Var
from qtrace.passes.rewrite import RuleSet, rewrite
from qtrace.passes.simplify import RULES as CANONICAL_RULES

HIDDEN = ShapeDtype(("batch", "seq", 8))
EPS = 1e-5
W = np.linspace(0.5, 1.5, 8).astype(np.float32)


def ops(graph) -> collections.Counter:
    return collections.Counter(node.op for node in graph.nodes)


def label_of(rules: RuleSet, fn) -> str:
    (label,) = {rule.label for rule in rules.rules if rule.fn is fn}
    return label


def random_input(shape=(2, 3, 8), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- every rule knows where it was written ----------------------------------------------------------------


@pytest.mark.parametrize("rules", [FUSIONS, CANONICAL_RULES], ids=["fusions", "canonical"])
def test_every_rule_names_the_file_and_line_of_its_function(rules):
    for rule in rules.rules:
        lines, first = inspect.getsourcelines(rule.fn)
        assert rule.defined_at == f"{os.path.basename(inspect.getsourcefile(rule.fn))}:{first}", rule.name
        assert any(f"def {rule.fn.__name__}(" in line for line in lines)


def test_fusions_with_different_builders_have_different_labels():
    builders = {rule.fn for rule in FUSIONS.rules}
    assert len({rule.label for rule in FUSIONS.rules}) == len(builders) >= 7


# -- what fired, in the report and the dumps -----------------------------------------------------------------

LAYERS = 2


def decoder_graph():
    cfg = numpy_decoder.DecoderConfig(num_layers=LAYERS)
    fn, args = numpy_decoder.decoder_signature(cfg, numpy_decoder.init_params(cfg))
    return qtrace.trace(fn, args)


def test_pass_report_counts_each_fusion_that_fired():
    report = run_pipeline(decoder_graph())
    (fuse_record,) = [r for r in report.records if r.name == "fuse"]
    expected = {fuse_module.fuse_rms_norm: 2 * LAYERS + 1, fuse_module.fuse_softmax: LAYERS,
                fuse_module.fuse_sigmoid: LAYERS, fuse_module.fuse_silu: LAYERS,
                fuse_module.fuse_ctx_scatter: 2 * LAYERS, fuse_module.fuse_ctx_gather: 2 * LAYERS}
    assert dict(fuse_record.fired) == {label_of(FUSIONS, fn): count for fn, count in expected.items()}
    assert f"{label_of(FUSIONS, fuse_module.fuse_rms_norm)} x{2 * LAYERS + 1}" in report.summary()


def test_ir_dump_after_a_pass_starts_with_the_rules_it_fired(tmp_path):
    graph = decoder_graph()
    run_pipeline(graph, ["canonicalize", "fuse"], dump_dir=str(tmp_path))
    header = [line for line in (tmp_path / "02-fuse.ir").read_text().splitlines() if line.startswith("#")]
    assert header[0].startswith("# after fuse ")
    assert f"#   {label_of(FUSIONS, fuse_module.fuse_softmax)} x{LAYERS}" in header


# -- overlapping patterns ---------------------------------------------------------------------------------


def exp_of_negation_rules() -> RuleSet:
    """A rule whose small pattern, exp(-x), sits inside the sigmoid fusion's 1 / (1 + exp(-x)) and is
    rooted before it: applied first, it would leave nothing for the sigmoid to match."""
    rules = RuleSet()

    @rules.rule(Pat("exp", Pat("neg", Var("x"))))
    def exp_of_negation_as_reciprocal(graph, root, m):  # exp(-x) = 1 / exp(x)
        (exp,) = graph.apply(PRIMITIVES["exp"], m["x"])
        return graph.apply(PRIMITIVES["reciprocal"], exp)

    return rules


def test_overlapping_patterns_apply_the_largest_match_first():
    rules = exp_of_negation_rules() + FUSIONS
    graph = qtrace.trace(lambda x: 1 / (1 + np.exp(-x)), (HIDDEN,))
    x = random_input()
    before = graph.eval(x)
    fired = rewrite(graph, rules)
    assert dict(fired) == {label_of(FUSIONS, fuse_module.fuse_sigmoid): 1}  # not the smaller, earlier-rooted one
    assert ops(graph) == {"sigmoid": 1}
    np.testing.assert_allclose(graph.eval(x), before, rtol=1e-6)


def double_negation_rules(small_rule_priority: int) -> RuleSet:
    rules = RuleSet()

    @rules.rule(Pat("neg", Pat("neg", Var("x"))))
    def cancel_double_negation(graph, root, m):
        return m["x"]

    @rules.rule(Pat("neg", Var("y")), priority=small_rule_priority)
    def negation_as_subtraction(graph, root, m):
        zero = graph.add_constant(np.zeros((), m["y"].dtype), "zero")
        return graph.apply(PRIMITIVES["sub"], zero, m["y"])

    return rules


@pytest.mark.parametrize("priority,winner", [(0, "cancel_double_negation"), (1, "negation_as_subtraction")])
def test_a_declared_priority_overrides_the_larger_pattern(priority, winner):
    graph = qtrace.trace(lambda x: -(-x), (HIDDEN,))
    x = random_input()
    fired = rewrite(graph, double_negation_rules(priority))
    assert {label.split()[0] for label in fired} == {winner}
    np.testing.assert_array_equal(graph.eval(x), x)


# -- declining, and not converging --------------------------------------------------------------------------


def test_a_fusion_that_declines_leaves_the_graph_as_it_was():
    # Matches the RMSNorm pattern, but the weight is 2-D: the builder declines before building anything.
    graph = qtrace.trace(lambda x: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * W[None, :], (HIDDEN,))
    run_pipeline(graph, ["canonicalize"])
    printed = str(graph)
    assert not rewrite(graph, FUSIONS)
    assert str(graph) == printed


def test_rewriting_that_never_converges_is_an_error_naming_the_rule():
    rules, calls = RuleSet(), collections.Counter()

    @rules.rule("add")
    def swap_operands(graph, root, m):  # each rewrite makes a new add that matches again
        calls["swap"] += 1
        if calls["swap"] > 100_000:  # without a guard the engine would loop forever: fail instead
            raise AssertionError("the rewrite engine has no loop guard")
        return graph.apply(root.primitive, root.inputs[1], root.inputs[0])

    graph = qtrace.trace(lambda x, y: x + y, (HIDDEN, HIDDEN))
    with pytest.raises(CheckError, match=r"did not converge: rule swap_operands \(test_rewrite\.py:\d+\)"):
        rewrite(graph, rules)


# -- the doors the passes go through -------------------------------------------------------------------------


def test_networkx_view_of_a_graph_is_read_only():
    graph = qtrace.trace(lambda x: x + 1.0, (HIDDEN,))
    with pytest.raises(networkx.NetworkXError):
        graph.nx.add_node("intruder")
    assert len(graph.nx) == len(graph.inputs) + len(graph.constants) + 2  # the add node and its output


def test_passes_do_not_import_qtrace_primitives():
    """Passes learn what a primitive is from the core's registry (its traits), not from qtrace.primitives."""
    directory = os.path.dirname(qtrace.passes.__file__)
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(directory, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                assert "primitives" not in module, f"{name} imports {module}"
            elif isinstance(node, ast.Import):
                assert not any("primitives" in alias.name for alias in node.names), name
