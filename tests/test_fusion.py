"""fuse (docs/architecture.md, "Passes"): every written-out spelling of RMSNorm, LayerNorm, softmax,
sigmoid/silu, GELU and the KV-cache index assignments becomes one node, computing what it computed
before; near-misses (another axis, eps used differently, an intermediate with a second consumer, a
constant that is close to the formula's but not it, indices that are not the cache grid) stay as
written; LayerNorm and RMSNorm never take each other's forms. Also: a Llama-style decoder and a GPT-2
block written in plain numpy lower to single nodes."""

from __future__ import annotations

import collections
import copy
import math

import numpy as np
import pytest

import qtrace
import qtrace.primitives as qp
from qtrace import ShapeDtype
from qtrace.examples import numpy_decoder
from qtrace.passes import run_pipeline

EPS = 1e-5
D = 8
W = (1.0 + 0.1 * np.random.default_rng(1).standard_normal(D)).astype(np.float32)
HIDDEN = ShapeDtype(("batch", "seq", D))


def ops(graph) -> collections.Counter:
    return collections.Counter(node.op for node in graph.nodes)


def random_inputs(graph, seed: int = 0, sizes: dict | None = None) -> list[np.ndarray]:
    """One array per graph input: symbolic dims take `sizes` (default 3), floats are normal, ints
    are valid distinct positions."""
    from qtrace.dims import substitute

    rng = np.random.default_rng(seed)
    arrays = []
    for value in graph.inputs:
        names = {n for d in value.shape if not isinstance(d, int) for n in d.names}
        shape = tuple(substitute(d, {n: (sizes or {}).get(n, 3) for n in names}) for d in value.shape)
        if value.dtype.kind == "f":
            arrays.append(rng.standard_normal(shape).astype(value.dtype))
        else:  # positions: each row a distinct set (numpy's scatter order is unspecified for repeats)
            rows = [rng.permutation(8)[:shape[-1]] for _ in range(int(np.prod(shape[:-1])))]
            arrays.append(np.array(rows, dtype=value.dtype).reshape(shape))
    return arrays


def fuse(fn, *specs, passes=("canonicalize", "fuse"), sizes=None, rtol=1e-5, atol=1e-5):
    """Trace fn, run the passes and check Graph.eval is unchanged on random inputs; the graph."""
    graph = qtrace.trace(fn, specs)
    inputs = random_inputs(graph, sizes=sizes)
    before = graph.eval_flat(inputs)
    run_pipeline(graph, list(passes))
    after = graph.eval_flat(inputs)
    for want, have in zip(before, after):
        assert have.dtype == want.dtype and have.shape == want.shape
        np.testing.assert_allclose(have, want, rtol=rtol, atol=atol)
    return graph


# -- RMSNorm --------------------------------------------------------------------------------------------

RMS_NORM_SPELLINGS = {
    "mul_by_one_over_sqrt": lambda x: x * (1 / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)) * W,
    "div_by_sqrt": lambda x: x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * W,
    "rsqrt": lambda x: x * qp.rsqrt((x * x).mean(-1, keepdims=True) + EPS) * W,
    "reciprocal_of_sqrt": lambda x: x * np.reciprocal(np.sqrt((x * x).mean(-1, keepdims=True) + EPS)) * W,
    "power_of_two": lambda x: x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + EPS) * W,
    "np_square": lambda x: x / np.sqrt(np.mean(np.square(x), -1, keepdims=True) + EPS) * W,
    "eps_first_weight_first": lambda x: W * (x / np.sqrt(EPS + np.mean(x * x, -1, keepdims=True))),
    "axis_2_of_rank_3": lambda x: x / np.sqrt(np.mean(x * x, axis=2, keepdims=True) + EPS) * W,
}


@pytest.mark.parametrize("spelling", sorted(RMS_NORM_SPELLINGS))
def test_rms_norm_spelling_fuses_to_one_node(spelling):
    graph = fuse(RMS_NORM_SPELLINGS[spelling], HIDDEN)
    assert ops(graph) == {"rms_norm": 1}


def test_rms_norm_fused_node_has_the_written_eps_and_weight():
    graph = fuse(RMS_NORM_SPELLINGS["div_by_sqrt"], HIDDEN)
    (node,) = graph.nodes
    assert node.params["eps"] == pytest.approx(EPS, rel=1e-6)
    assert np.array_equal(node.inputs[1].const, W)


def test_rms_norm_with_weight_as_graph_input_fuses():
    graph = fuse(lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * w, HIDDEN, ShapeDtype((D,)))
    assert ops(graph) == {"rms_norm": 1}


def hf_rms_norm(x, w):
    """Hugging Face's LlamaRMSNorm: statistics in float32, result cast back, then scaled."""
    h = x.astype(np.float32)
    return (h * (1 / np.sqrt(np.mean(h * h, -1, keepdims=True) + EPS))).astype(x.dtype) * w


def test_rms_norm_with_float32_upcast_fuses_in_float16_model():
    graph = fuse(hf_rms_norm, ShapeDtype(("batch", D), "float16"), ShapeDtype((D,), "float16"), rtol=2e-3, atol=2e-3)
    assert ops(graph)["rms_norm"] == 1
    assert not {"reduce_mean", "sqrt", "div", "mul"} & set(ops(graph))


def test_rms_norm_with_float32_upcast_keeps_float32_accuracy_for_large_activations():
    # float16 squares overflow past 256: the written form avoids that by upcasting, the fused one must too.
    graph = qtrace.trace(hf_rms_norm, (ShapeDtype(("batch", D), "float16"), ShapeDtype((D,), "float16")))
    x = np.full((2, D), 300.0, np.float16)
    w = np.ones(D, np.float16)
    run_pipeline(graph, ["canonicalize", "fuse"])
    assert ops(graph)["rms_norm"] == 1
    np.testing.assert_allclose(graph.eval(x, w), np.ones((2, D)), rtol=1e-3)


RMS_NORM_NEAR_MISSES = {
    "mean_over_another_axis": lambda x: x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + EPS) * W,
    "eps_outside_the_sqrt": lambda x: x / (np.sqrt(np.mean(x * x, -1, keepdims=True)) + EPS) * W,
    "eps_added_twice": lambda x: x / (np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) + EPS) * W,
    "square_of_another_value": lambda x: x / np.sqrt(np.mean((x + 1) * (x + 1), -1, keepdims=True) + EPS) * W,
    "weight_not_one_dimensional": lambda x: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS) * W[None, :],
}


@pytest.mark.parametrize("near_miss", sorted(RMS_NORM_NEAR_MISSES))
def test_rms_norm_near_miss_does_not_fuse(near_miss):
    graph = fuse(RMS_NORM_NEAR_MISSES[near_miss], HIDDEN)
    assert "rms_norm" not in ops(graph)


def test_rms_norm_with_traced_eps_does_not_fuse():
    graph = fuse(lambda x, eps: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * W, HIDDEN, ShapeDtype(()))
    assert "rms_norm" not in ops(graph)


def test_rms_norm_whose_mean_square_is_also_returned_does_not_fuse():
    def fn(x):
        mean_square = np.mean(x * x, -1, keepdims=True)
        return x / np.sqrt(mean_square + EPS) * W, mean_square

    graph = fuse(fn, HIDDEN)
    assert "rms_norm" not in ops(graph)


def test_rms_norm_whose_inverse_rms_has_a_second_consumer_does_not_fuse():
    def fn(x):
        inv_rms = 1 / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)
        return x * inv_rms * W + inv_rms

    graph = fuse(fn, HIDDEN)
    assert "rms_norm" not in ops(graph)


# -- LayerNorm ------------------------------------------------------------------------------------------

B = (0.1 * np.random.default_rng(2).standard_normal(D)).astype(np.float32)


def centred(x):
    return x - x.mean(-1, keepdims=True)


LAYER_NORM_SPELLINGS = {  # name: (spelling, has weight, has bias)
    "np_var": (lambda x: (x - np.mean(x, -1, keepdims=True)) / np.sqrt(np.var(x, -1, keepdims=True) + EPS) * W + B,
               True, True),
    "method_var_rsqrt": (lambda x: (x - x.mean(-1, keepdims=True)) * qp.rsqrt(x.var(-1, keepdims=True) + EPS) * W + B,
                         True, True),
    "centred_square_computed_once": (lambda x: (lambda d: d / np.sqrt((d * d).mean(-1, keepdims=True) + EPS) * W + B)(
        centred(x)), True, True),
    "one_mean_subtracted_twice_pow": (lambda x: (lambda m: (x - m) / np.sqrt(np.mean((x - m) ** 2, -1, keepdims=True)
                                                                           + EPS) * W + B)(x.mean(-1, keepdims=True)),
                                      True, True),
    "reciprocal_of_sqrt": (lambda x: centred(x) * np.reciprocal(np.sqrt(x.var(-1, keepdims=True) + EPS)) * W + B,
                           True, True),
    "one_over_sqrt_np_square": (lambda x: (lambda d: d * (1 / np.sqrt(np.mean(np.square(d), -1, keepdims=True) + EPS)))(
        centred(x)) * W + B, True, True),
    "weight_and_bias_first_eps_first": (lambda x: B + W * (centred(x) / np.sqrt(EPS + x.var(-1, keepdims=True))),
                                        True, True),
    "no_affine": (lambda x: centred(x) / np.sqrt(x.var(-1, keepdims=True) + EPS), False, False),
    "weight_only": (lambda x: centred(x) / np.sqrt(x.var(-1, keepdims=True) + EPS) * W, True, False),
    "bias_only": (lambda x: centred(x) / np.sqrt(x.var(-1, keepdims=True) + EPS) + B, False, True),
    "axis_2_of_rank_3": (lambda x: (x - x.mean(2, keepdims=True)) / np.sqrt(x.var(2, keepdims=True) + EPS) * W + B,
                         True, True),
}


@pytest.mark.parametrize("spelling", sorted(LAYER_NORM_SPELLINGS))
def test_layer_norm_spelling_fuses_to_one_node(spelling):
    fn, has_weight, has_bias = LAYER_NORM_SPELLINGS[spelling]
    graph = fuse(fn, HIDDEN, passes=("canonicalize", "fuse", "simplify"))
    assert ops(graph) == {"layer_norm": 1}
    (node,) = graph.nodes
    assert node.params["eps"] == pytest.approx(EPS, rel=1e-6)
    np.testing.assert_array_equal(node.inputs[1].const, W if has_weight else np.ones(D, np.float32))
    assert len(node.inputs) == 2 + has_bias
    if has_bias:
        np.testing.assert_array_equal(node.inputs[2].const, B)


def test_layer_norm_with_weight_and_bias_as_graph_inputs_fuses():
    graph = fuse(lambda x, w, b: centred(x) / np.sqrt(x.var(-1, keepdims=True) + EPS) * w + b, HIDDEN,
                 ShapeDtype((D,)), ShapeDtype((D,)))
    assert ops(graph) == {"layer_norm": 1}


def test_layer_norm_fused_matches_torch_style_formula():
    graph = fuse(LAYER_NORM_SPELLINGS["np_var"][0], ShapeDtype(("batch", D)),
                 passes=("canonicalize", "fuse", "simplify"))
    x = np.random.default_rng(4).standard_normal((3, D)).astype(np.float32) * 3 + 1
    mean = x.astype(np.float64).mean(-1, keepdims=True)
    expected = (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + EPS) * W + B
    np.testing.assert_allclose(graph.eval(x), expected, rtol=1e-5, atol=1e-6)


LAYER_NORM_NEAR_MISSES = {
    "eps_outside_the_sqrt": lambda x: centred(x) / (np.sqrt(x.var(-1, keepdims=True)) + EPS) * W + B,
    "eps_added_to_the_std": lambda x: centred(x) / (x.std(-1, keepdims=True) + EPS) * W + B,
    "no_mean_subtraction": lambda x: x / np.sqrt(x.var(-1, keepdims=True) + EPS) * W + B,
    "variance_over_another_axis": lambda x: centred(x) / np.sqrt(x.var(1, keepdims=True) + EPS) * W + B,
    "mean_over_another_axis": lambda x: (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPS) * W,
    "unbiased_variance": lambda x: centred(x) / np.sqrt(x.var(-1, keepdims=True, ddof=1) + EPS) * W + B,
    "centred_on_another_mean": lambda x: (x - (x + 1).mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True)
                                                                                          + EPS),
}


@pytest.mark.parametrize("near_miss", sorted(LAYER_NORM_NEAR_MISSES))
def test_layer_norm_near_miss_does_not_fuse(near_miss):
    graph = fuse(LAYER_NORM_NEAR_MISSES[near_miss], HIDDEN)
    assert not {"layer_norm", "rms_norm"} & set(ops(graph))


def test_layer_norm_weight_that_is_not_one_dimensional_stays_a_multiplication():
    graph = fuse(lambda x: centred(x) / np.sqrt(x.var(-1, keepdims=True) + EPS) * W[None, :], HIDDEN)
    assert ops(graph)["layer_norm"] == 1 and ops(graph)["mul"] == 1


def test_layer_norm_whose_variance_is_also_returned_does_not_fuse():
    def fn(x):
        variance = x.var(-1, keepdims=True)
        return centred(x) / np.sqrt(variance + EPS) * W, variance

    graph = fuse(fn, HIDDEN)
    assert not {"layer_norm", "rms_norm"} & set(ops(graph))


def test_centred_rms_norm_is_a_layer_norm_not_an_rms_norm():
    """(x - mean) normalized by its own RMS matches the RMSNorm patterns too (with x - mean for x): the
    LayerNorm fusion has priority."""
    graph = fuse(LAYER_NORM_SPELLINGS["centred_square_computed_once"][0], HIDDEN)
    assert ops(graph) == {"layer_norm": 1}


def test_rms_norm_declines_a_centred_input_that_layer_norm_cannot_take():
    """The centred value is also returned, so LayerNorm cannot replace it; RMSNorm does not take it
    either (LayerNorm's priority holds whatever order the nodes are visited in)."""
    def fn(x):
        d = centred(x)
        return d / np.sqrt((d * d).mean(-1, keepdims=True) + EPS) * W, d

    graph = fuse(fn, HIDDEN)
    assert not {"layer_norm", "rms_norm"} & set(ops(graph))


@pytest.mark.parametrize("spelling", sorted(RMS_NORM_SPELLINGS))
def test_rms_norm_spelling_is_never_a_layer_norm(spelling):
    assert "layer_norm" not in ops(fuse(RMS_NORM_SPELLINGS[spelling], HIDDEN))


def test_layer_norm_fusions_are_tried_before_rms_norm_at_a_shared_root():
    from qtrace.passes.fuse import FUSIONS, LAYER_NORM_PRIORITY

    order = [rule.name for rule in FUSIONS.by_root()["mul"]]
    first_rms = min(i for i, name in enumerate(order) if name == "fuse_rms_norm")
    assert all(i < first_rms for i, name in enumerate(order) if name.startswith("fuse_layer_norm"))
    assert {r.priority for r in FUSIONS.rules if r.name.startswith("fuse_layer_norm")} == {LAYER_NORM_PRIORITY} == {1}


# -- softmax --------------------------------------------------------------------------------------------


def softmax_last_axis(s):
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


SOFTMAX_SPELLINGS = {
    "methods": (softmax_last_axis, -1),
    "numpy_functions": (lambda s: (lambda e: e / np.sum(e, axis=-1, keepdims=True))(
        np.exp(s - np.max(s, axis=-1, keepdims=True))), -1),
    "middle_axis": (lambda s: (lambda e: e / e.sum(1, keepdims=True))(np.exp(s - s.max(1, keepdims=True))), 1),
    "masked_scores": (lambda s: softmax_last_axis(np.where(s > 1.5, -np.inf, s)), -1),
}


@pytest.mark.parametrize("spelling", sorted(SOFTMAX_SPELLINGS))
def test_softmax_spelling_fuses_to_one_node_on_its_axis(spelling):
    fn, axis = SOFTMAX_SPELLINGS[spelling]
    graph = fuse(fn, ShapeDtype(("batch", 4, 6)))
    (node,) = [n for n in graph.nodes if n.op == "softmax"]
    assert node.params["axis"] == axis % 3
    assert not {"exp", "reduce_max", "reduce_sum", "div"} & set(ops(graph))


def test_softmax_fused_matches_numpy():
    graph = fuse(softmax_last_axis, ShapeDtype(("batch", 5)))
    s = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    expected = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    np.testing.assert_allclose(graph.eval(s), expected, rtol=1e-6)


SOFTMAX_NEAR_MISSES = {
    "sum_over_another_axis": lambda s: (lambda e: e / e.sum(1, keepdims=True))(np.exp(s - s.max(-1, keepdims=True))),
    "max_of_another_value": lambda s: (lambda e: e / e.sum(-1, keepdims=True))(
        np.exp(s - (s * 2).max(-1, keepdims=True))),
    "over_two_axes": lambda s: (lambda e: e / e.sum((1, 2), keepdims=True))(np.exp(s - s.max((1, 2), keepdims=True))),
}


@pytest.mark.parametrize("near_miss", sorted(SOFTMAX_NEAR_MISSES))
def test_softmax_near_miss_does_not_fuse(near_miss):
    graph = fuse(SOFTMAX_NEAR_MISSES[near_miss], ShapeDtype(("batch", 4, 6)))
    assert "softmax" not in ops(graph)


def test_softmax_whose_exponentials_are_also_returned_does_not_fuse():
    def fn(s):
        e = np.exp(s - s.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True), e

    graph = fuse(fn, ShapeDtype(("batch", 6)))
    assert "softmax" not in ops(graph)


# -- sigmoid and silu -----------------------------------------------------------------------------------


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_sigmoid_written_out_fuses_to_one_node():
    graph = fuse(sigmoid, HIDDEN)
    assert ops(graph) == {"sigmoid": 1}


SILU_SPELLINGS = {
    "x_times_sigmoid": lambda x: x * sigmoid(x),
    "sigmoid_times_x": lambda x: sigmoid(x) * x,
    "x_times_primitive_sigmoid": lambda x: x * qp.sigmoid(x),
    "one_over_one_plus_exp": lambda x: x * (1 / (1 + np.exp(-x))),
}


@pytest.mark.parametrize("spelling", sorted(SILU_SPELLINGS))
def test_silu_spelling_fuses_to_one_node(spelling):
    graph = fuse(SILU_SPELLINGS[spelling], HIDDEN)
    assert ops(graph) == {"silu": 1}


def test_silu_fused_matches_numpy():
    graph = fuse(SILU_SPELLINGS["x_times_sigmoid"], ShapeDtype((4,)))
    x = np.array([-3.0, -0.5, 0.0, 2.0], np.float32)
    np.testing.assert_allclose(graph.eval(x), x / (1 + np.exp(-x)), rtol=1e-6)


SIGMOID_NEAR_MISSES = {
    "exp_without_negation": lambda x: 1 / (1 + np.exp(x)),
    "two_over": lambda x: 2 / (1 + np.exp(-x)),
    "one_minus": lambda x: 1 / (1 - np.exp(-x)),
    # A rewrite must keep the function up to float rounding: 5e-4 off is another function.
    "numerator_1.0005": lambda x: 1.0005 / (1 + np.exp(-x)),
    "denominator_1.0005": lambda x: 1 / (1.0005 + np.exp(-x)),
}


@pytest.mark.parametrize("near_miss", sorted(SIGMOID_NEAR_MISSES))
def test_sigmoid_near_miss_does_not_fuse(near_miss):
    graph = fuse(SIGMOID_NEAR_MISSES[near_miss], HIDDEN)
    assert not {"sigmoid", "silu"} & set(ops(graph))


def test_sigmoid_whose_two_ones_are_one_constant_fuses():
    one = np.float32(1.0)  # the same array object twice: one graph constant, as after CSE
    graph = fuse(lambda x: one / (one + np.exp(-x)), HIDDEN)
    assert ops(graph) == {"sigmoid": 1}


def test_silu_of_sigmoid_of_another_value_is_not_silu():
    graph = fuse(lambda x, y: x * sigmoid(y), HIDDEN, HIDDEN)
    assert ops(graph) == {"sigmoid": 1, "mul": 1}


def test_silu_whose_sigmoid_is_also_returned_does_not_fuse():
    def fn(x):
        gate = sigmoid(x)
        return x * gate, gate

    graph = fuse(fn, HIDDEN)
    assert ops(graph) == {"sigmoid": 1, "mul": 1}


# -- GELU -----------------------------------------------------------------------------------------------

GELU_SPELLINGS = {
    "erf_div_sqrt2": (lambda x: 0.5 * x * (1 + qp.erf(x / math.sqrt(2))), "none"),
    "erf_times_inverse_sqrt2": (lambda x: x * 0.5 * (1 + qp.erf(x * (1 / math.sqrt(2)))), "none"),
    "erf_half_last": (lambda x: x * (1 + qp.erf(x / math.sqrt(2))) * 0.5, "none"),
    "tanh_pow3": (lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))), "tanh"),
    "tanh_cube_by_products": (lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * (x * x * x)))),
                              "tanh"),
}


@pytest.mark.parametrize("spelling", sorted(GELU_SPELLINGS))
def test_gelu_spelling_fuses_to_one_node(spelling):
    fn, approximate = GELU_SPELLINGS[spelling]
    graph = fuse(fn, HIDDEN)
    (node,) = graph.nodes
    assert node.op == "gelu" and node.params["approximate"] == approximate


GELU_NEAR_MISSES = {
    "erf_of_x_over_2": lambda x: 0.5 * x * (1 + qp.erf(x / 2)),
    "tanh_with_another_coefficient": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.05 * x ** 3))),
    "erf_of_another_value": lambda x: 0.5 * x * (1 + qp.erf((x + 1) / math.sqrt(2))),
    # Constants within 1e-3 of GELU's are still other functions (8e-4, 2e-5, 3e-4 and 4e-4 relative).
    "half_is_0.5004": lambda x: 0.5004 * x * (1 + qp.erf(x / math.sqrt(2))),
    "sqrt2_is_1.4142": lambda x: 0.5 * x * (1 + qp.erf(x / 1.4142)),
    "coefficient_0.0447": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.0447 * x ** 3))),
    "sqrt_2_over_pi_0.7976": lambda x: 0.5 * x * (1 + np.tanh(0.7976 * (x + 0.044715 * x ** 3))),
}


@pytest.mark.parametrize("near_miss", sorted(GELU_NEAR_MISSES))
def test_gelu_near_miss_does_not_fuse(near_miss):
    graph = fuse(GELU_NEAR_MISSES[near_miss], HIDDEN)
    assert "gelu" not in ops(graph)


def test_gelu_constant_computed_in_float32_arithmetic_fuses():
    # sqrt(2 / pi) computed in float32 is one unit in the last place off the correctly rounded constant.
    k = np.sqrt(np.float32(2) / np.float32(math.pi))
    assert k != np.float32(math.sqrt(2 / math.pi))
    graph = fuse(lambda x: 0.5 * x * (1 + np.tanh(k * (x + 0.044715 * x ** 3))), HIDDEN)
    assert ops(graph) == {"gelu": 1}


@pytest.mark.parametrize("spelling", sorted(GELU_SPELLINGS))
def test_gelu_spelling_fuses_in_a_float16_model(spelling):
    """Python constants become float16 there (0.044715 -> 0.04471): rounded in the constant's dtype,
    they are still the formula's numbers."""
    fn, approximate = GELU_SPELLINGS[spelling]
    graph = fuse(fn, ShapeDtype(("batch", D), "float16"), rtol=2e-3, atol=2e-3)
    assert ops(graph) == {"gelu": 1} and graph.nodes[0].params["approximate"] == approximate


RMS_NORM_CONSTANT_NEAR_MISSES = {
    "power_2.0005": lambda x: x / np.sqrt(np.mean(x ** 2.0005, -1, keepdims=True) + EPS) * W,
    "numerator_1.0005": lambda x: x * (1.0005 / np.sqrt(np.mean(x * x, -1, keepdims=True) + EPS)) * W,
}


@pytest.mark.parametrize("near_miss", sorted(RMS_NORM_CONSTANT_NEAR_MISSES))
def test_rms_norm_with_a_constant_close_to_the_formulas_does_not_fuse(near_miss):
    graph = fuse(RMS_NORM_CONSTANT_NEAR_MISSES[near_miss], HIDDEN, sizes={"batch": 2, "seq": 3})
    assert "rms_norm" not in ops(graph)


# -- KV cache: index assignment and index reads -----------------------------------------------------------

HEADS, HEAD_DIM = 2, 4
CACHE = ShapeDtype(("batch", HEADS, "ctx_len", HEAD_DIM))
POSITIONS = ShapeDtype(("batch", "seq"), "int64")
NEW_KV = ShapeDtype(("batch", HEADS, "seq", HEAD_DIM))
KV_SIZES = {"batch": 2, "seq": 3, "ctx_len": 8}


def write_cache(cache, position_ids, kv):
    batch = position_ids.shape[0]
    b_idx = qp.arange(batch)[:, None, None]
    h_idx = qp.arange(cache.shape[1])[None, :, None]
    cache[b_idx, h_idx, position_ids[:, None, :]] = kv
    return cache


def test_cache_index_assignment_fuses_to_ctx_scatter():
    graph = fuse(write_cache, CACHE, POSITIONS, NEW_KV, sizes=KV_SIZES)
    assert ops(graph)["ctx_scatter"] == 1 and "index_put" not in ops(graph)
    (node,) = [n for n in graph.nodes if n.op == "ctx_scatter"]
    assert node.inputs[1] is graph.inputs[1]  # position_ids itself, not a reshaped copy


def test_ctx_scatter_fused_matches_numpy_assignment():
    graph = qtrace.trace(write_cache, (CACHE, POSITIONS, NEW_KV))
    run_pipeline(graph, ["canonicalize", "fuse", "simplify"])
    rng = np.random.default_rng(3)
    cache = rng.standard_normal((2, HEADS, 8, HEAD_DIM)).astype(np.float32)
    positions = np.array([[5, 0, 2], [7, 6, 1]])
    kv = rng.standard_normal((2, HEADS, 3, HEAD_DIM)).astype(np.float32)
    expected = cache.copy()
    for b in range(2):
        for s in range(3):
            expected[b, :, positions[b, s], :] = kv[b, :, s, :]
    np.testing.assert_array_equal(graph.eval(cache, positions, kv), expected)


def test_cache_index_assignment_with_reshaped_batch_index_fuses():
    def fn(cache, position_ids, kv):
        batch = position_ids.shape[0]
        cache[qp.arange(batch).reshape(batch, 1, 1), qp.arange(HEADS)[None, :, None], position_ids[:, None, :]] = kv
        return cache

    graph = fuse(fn, CACHE, POSITIONS, NEW_KV, sizes=KV_SIZES)
    assert ops(graph)["ctx_scatter"] == 1 and "index_put" not in ops(graph)


def test_three_dimensional_cache_index_assignment_fuses_to_ctx_scatter():
    def fn(cache, position_ids, kv):
        cache[qp.arange(position_ids.shape[0])[:, None], position_ids] = kv
        return cache

    graph = fuse(fn, ShapeDtype(("batch", "ctx_len", HEAD_DIM)), POSITIONS, ShapeDtype(("batch", "seq", HEAD_DIM)),
                 sizes=KV_SIZES)
    assert ops(graph)["ctx_scatter"] == 1 and "index_put" not in ops(graph)


def test_cache_assignment_with_permuted_batch_rows_does_not_fuse():
    def fn(cache, position_ids, kv):
        cache[np.array([1, 0])[:, None, None], qp.arange(HEADS)[None, :, None], position_ids[:, None, :]] = kv
        return cache

    graph = fuse(fn, ShapeDtype((2, HEADS, "ctx_len", HEAD_DIM)), ShapeDtype((2, "seq"), "int64"),
                 ShapeDtype((2, HEADS, "seq", HEAD_DIM)), sizes=KV_SIZES)
    assert "ctx_scatter" not in ops(graph) and ops(graph)["index_put"] == 1


def test_cache_assignment_with_a_constant_head_index_does_not_fuse():
    def fn(cache, position_ids, kv):
        batch = position_ids.shape[0]
        cache[qp.arange(batch)[:, None, None], np.zeros((1, HEADS, 1), np.int64), position_ids[:, None, :]] = kv
        return cache

    graph = fuse(fn, CACHE, POSITIONS, NEW_KV, sizes=KV_SIZES)
    assert "ctx_scatter" not in ops(graph)


def test_cache_assignment_with_updates_broadcast_over_heads_does_not_fuse():
    def fn(cache, position_ids, kv):
        batch = position_ids.shape[0]
        cache[qp.arange(batch)[:, None, None], qp.arange(HEADS)[None, :, None], position_ids[:, None, :]] = kv
        return cache

    graph = fuse(fn, CACHE, POSITIONS, ShapeDtype(("batch", 1, "seq", HEAD_DIM)), sizes=KV_SIZES)
    assert "ctx_scatter" not in ops(graph)


def read_cache(cache, position_ids):
    batch = position_ids.shape[0]
    slots = qp.arange(cache.shape[2])
    return cache[qp.arange(batch)[:, None, None], qp.arange(HEADS)[None, :, None], slots[None, None, :]]


def test_cache_index_read_fuses_to_ctx_gather():
    graph = fuse(read_cache, CACHE, POSITIONS, sizes=KV_SIZES)
    assert ops(graph)["ctx_gather"] == 1 and "gather" not in ops(graph)


def test_index_read_of_a_computed_array_is_not_a_cache_read():
    graph = fuse(lambda cache, position_ids: read_cache(cache * 2, position_ids), CACHE, POSITIONS, sizes=KV_SIZES)
    assert "ctx_gather" not in ops(graph) and ops(graph)["gather"] == 1


def test_index_read_of_a_computed_array_reads_by_batch_without_row_numbers():
    graph = fuse(lambda cache, position_ids: read_cache(cache * 2, position_ids), CACHE, POSITIONS, sizes=KV_SIZES)
    (gather,) = [n for n in graph.nodes if n.op == "gather"]
    assert gather.params["batch_dims"] == 2 and len(gather.inputs) == 2
    assert ops(graph)["arange"] == 1  # the slot numbers it reads; the batch and head numbers are gone
    fn = lambda cache, position_ids: read_cache(cache * 2, position_ids)  # noqa: E731
    cache = np.random.default_rng(6).standard_normal((3, HEADS, 8, HEAD_DIM)).astype(np.float32)
    position_ids = np.zeros((3, 2), np.int64)
    (out,) = qtrace.lower(fn, (CACHE, POSITIONS)).session().run(None, {"cache": cache, "position_ids": position_ids})
    np.testing.assert_array_equal(out, 2 * cache)


LAST_TOKEN_SPECS = (ShapeDtype(("batch", "seq", D)), ShapeDtype(("batch", "seq"), "int64"))


def hidden_at_last_position(h, position_ids):
    last = qp.argmax(position_ids, axis=1, keepdims=True)                   # [B,1]
    return (h * 2)[qp.arange(h.shape[0])[:, None], last]                   # [B,1,D]


def test_gather_by_row_numbers_is_a_batched_gather():
    graph = fuse(hidden_at_last_position, *LAST_TOKEN_SPECS, passes=("canonicalize", "fuse", "simplify"))
    (gather,) = [n for n in graph.nodes if n.op == "gather"]
    assert gather.params == {"axis": 1, "batch_dims": 1} and "arange" not in ops(graph)
    lowered = qtrace.lower(hidden_at_last_position, LAST_TOKEN_SPECS)
    assert sorted(n.op_type for n in lowered.model.graph.node) == ["ArgMax", "GatherND", "Mul", "Unsqueeze"]
    rng = np.random.default_rng(4)
    h = rng.standard_normal((3, 5, D)).astype(np.float32)
    position_ids = np.array([[0, 1, 2, -1, -1], [0, 1, 2, 3, 4], [7, 8, -1, -1, -1]])
    (out,) = lowered.session().run(None, {"h": h, "position_ids": position_ids})
    np.testing.assert_array_equal(out, (2 * h)[[[0], [1], [2]], [[2], [4], [1]]])


@pytest.mark.parametrize("rows", [
    lambda b: qp.arange(b)[::-1][:, None],                 # not each row's own number
    lambda b: (qp.arange(b) * 0)[:, None],                 # every row reads row 0
    lambda b: qp.arange(b)[None, :],                       # the row numbers along the wrong axis
], ids=["reversed", "zeros", "transposed"])
def test_gather_by_other_row_indices_stays_a_plain_gather(rows):
    def fn(h, position_ids):
        return (h * 2)[rows(h.shape[0]), qp.argmax(position_ids, axis=1, keepdims=True)]

    graph = fuse(fn, *LAST_TOKEN_SPECS)
    assert all(not n.params.get("batch_dims") for n in graph.nodes if n.op == "gather")


# -- the plain-numpy decoder (examples/numpy_decoder.py) ------------------------------------------------

DECODER_LAYERS = 2


@pytest.fixture(scope="module")
def decoder():
    cfg = numpy_decoder.DecoderConfig(num_layers=DECODER_LAYERS)
    fn, args = numpy_decoder.decoder_signature(cfg, numpy_decoder.init_params(cfg))
    return cfg, fn, args


def test_numpy_decoder_traces_without_fused_primitives(decoder):
    _, fn, args = decoder
    traced = ops(qtrace.trace(fn, args))
    assert not {"rms_norm", "softmax", "silu", "sigmoid", "ctx_scatter", "ctx_gather"} & set(traced)
    assert traced["index_put"] == 2 * DECODER_LAYERS


def test_numpy_decoder_lowers_norms_softmax_silu_and_cache_ops_to_single_nodes(decoder):
    _, fn, args = decoder
    graph = qtrace.trace(fn, args)
    run_pipeline(graph)
    counts = ops(graph)
    assert counts["rms_norm"] == 2 * DECODER_LAYERS + 1
    assert counts["softmax"] == DECODER_LAYERS and counts["silu"] == DECODER_LAYERS
    assert counts["ctx_scatter"] == 2 * DECODER_LAYERS and counts["ctx_gather"] == 2 * DECODER_LAYERS
    assert not {"exp", "sqrt", "reduce_mean", "reduce_max", "reduce_sum", "index_put", "gather"} & set(counts)


def test_numpy_decoder_after_all_passes_matches_eager_numpy(decoder):
    cfg, fn, args = decoder
    graph = qtrace.trace(fn, args)
    run_pipeline(graph)
    inputs = numpy_decoder.example_inputs(cfg)
    expected = fn(*copy.deepcopy(inputs))  # eagerly, the model writes into its cache arguments
    got = graph.eval(*copy.deepcopy(inputs))
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)


# -- a GPT-2 block written in plain numpy -----------------------------------------------------------------

GPT2_HEADS, GPT2_HEAD_DIM = 2, 4
_gpt2_rng = np.random.default_rng(9)
GPT2 = {name: (_gpt2_rng.standard_normal(shape) * scale).astype(np.float32) for name, shape, scale in [
    ("ln_1.w", (D,), 0.1), ("ln_1.b", (D,), 0.1), ("c_attn", (D, 3 * D), D ** -0.5), ("c_attn.b", (3 * D,), 0.1),
    ("c_proj", (D, D), D ** -0.5), ("c_proj.b", (D,), 0.1), ("ln_2.w", (D,), 0.1), ("ln_2.b", (D,), 0.1),
    ("c_fc", (D, 4 * D), D ** -0.5), ("c_fc.b", (4 * D,), 0.1), ("mlp.c_proj", (4 * D, D), (4 * D) ** -0.5),
    ("mlp.c_proj.b", (D,), 0.1)]}
for _name in ("ln_1.w", "ln_2.w"):
    GPT2[_name] += 1


def gpt2_block(x):
    """GPT-2's block as its paper code writes it: LayerNorms, Conv1D ([in, out]) projections, causal
    softmax attention and the tanh GELU, all spelled out."""
    def layer_norm(h, w, b):
        mean = h.mean(-1, keepdims=True)
        return (h - mean) / np.sqrt(np.mean((h - mean) ** 2, -1, keepdims=True) + EPS) * w + b

    batch, seq = x.shape[0], x.shape[1]
    q, k, v = np.split(layer_norm(x, GPT2["ln_1.w"], GPT2["ln_1.b"]) @ GPT2["c_attn"] + GPT2["c_attn.b"], 3, axis=-1)
    q, k, v = (t.reshape(batch, seq, GPT2_HEADS, GPT2_HEAD_DIM).transpose(0, 2, 1, 3) for t in (q, k, v))
    positions = qp.arange(seq)
    scores = np.where(positions[None, :] > positions[:, None], -np.inf,
                      q @ k.transpose(0, 1, 3, 2) / math.sqrt(GPT2_HEAD_DIM))
    e = np.exp(scores - scores.max(-1, keepdims=True))
    attn = ((e / e.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, D)
    h = x + attn @ GPT2["c_proj"] + GPT2["c_proj.b"]
    up = layer_norm(h, GPT2["ln_2.w"], GPT2["ln_2.b"]) @ GPT2["c_fc"] + GPT2["c_fc.b"]
    gelu = 0.5 * up * (1 + np.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up ** 3)))
    return h + gelu @ GPT2["mlp.c_proj"] + GPT2["mlp.c_proj.b"]


def test_gpt2_block_lowers_each_written_out_layer_norm_to_one_layer_normalization_node():
    lowered = qtrace.lower(gpt2_block, (ShapeDtype(("batch", "seq", D)),))
    node_types = collections.Counter(node.op_type for node in lowered.model.graph.node)
    assert node_types["LayerNormalization"] == 2
    assert not {"ReduceMean", "Sqrt", "Pow", "Reciprocal"} & set(node_types)
    x = np.random.default_rng(10).standard_normal((2, 5, D)).astype(np.float32)
    np.testing.assert_allclose(lowered.run(x), gpt2_block(x), rtol=1e-4, atol=1e-5)
