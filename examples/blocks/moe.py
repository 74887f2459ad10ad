"""Mixture of experts: routers, expert execution, shared experts and the MoE config knobs.

A MoE layer sends each token to `experts_per_token` of `num_experts` gated MLPs chosen by a router
and sums their outputs, weighted by the router (or scales the token before the expert, Llama 4),
plus an always-on shared expert where the family has one. Which layers are MoE is read from the
config (`moe_layers`); the others keep a dense gated MLP.

Routers (`MoeConfig.router`), each from the router's logits [T, E]:
- softmax_topk (Mixtral, Qwen3-MoE): softmax over all experts, top-k, renormalised to sum 1
  (Qwen3-MoE only with norm_topk_prob);
- topk_softmax (GraniteMoE, gpt-oss): top-k of the logits, softmax over those k;
- sigmoid_topk (GLM-4-MoE): sigmoid scores; the experts are chosen by score + a correction bias
  (the bias decides the choice only), optionally among the best `topk_group` of `n_group` groups;
  the chosen scores are renormalised (+1e-20) and multiplied by routed_scaling_factor;
- sigmoid_input (Llama 4): top-k of the logits; sigmoid(logit) scales the token *before* its expert.

Expert weights stay as the checkpoint stores them: stacks [E, out, in] (rows of nn.Linear,
`expert_layout` "out_in") or [E, in, out] ("in_out", gpt-oss and Llama 4), or one tensor per expert,
which the causal-LM driver stacks in the main graph (a Concat of the file's tensors, never a copy
made by qtrace). Every product is arranged so that no expert matrix is transposed: out_in stacks
multiply column vectors (W @ x), in_out stacks multiply row vectors (x @ W). Gate and up are separate
stacks, one stack in two halves, or interleaved columns (gpt-oss); they are split after the matmul.

Two ways to run the experts (`MoeConfig.moe_strategy`, `qtrace export --moe-strategy`):
- gather: for every (token, choice) the chosen expert's matrices are gathered and applied with a
  batched matmul. Reads k experts per token (cheap decode), but materialises T*k expert matrices;
- dense: every expert runs on every token (E batched GEMMs over the step's T tokens) and each
  output is weighted by the token's routing weight, 0 for experts it did not choose. Reads each
  expert once per step, whatever T (cheap prefill), but computes E/k times the FLOPs.
The default is gather, by measurement (benchmarks/bench_moe.py, onnxruntime CPU, three runs): dense
prefill takes 0.23-0.29x (Mixtral-shaped) and 0.85-1.21x (Qwen3-MoE-shaped) of gather's time, but dense
decode takes 2.2-4.7x and 6.1-7.1x, and a generation runs far more decode steps than prefill chunks.
A prefill-only export with many tokens per chunk is where dense pays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from qtrace.primitives import arange, clip, minimum, repeat, sigmoid, softmax, take, top_k, where

from ..config import DecoderConfig
from ..weights import BIAS, EXPERTS, EXPERTS_IN_OUT, LINEAR, Weight, WeightMap
from .layers import ACTIVATIONS, gated_mlp, linear

SOFTMAX_TOPK, TOPK_SOFTMAX = "softmax_topk", "topk_softmax"
SIGMOID_TOPK, SIGMOID_INPUT = "sigmoid_topk", "sigmoid_input"
ROUTERS = (SOFTMAX_TOPK, TOPK_SOFTMAX, SIGMOID_TOPK, SIGMOID_INPUT)
OUT_IN, IN_OUT = "out_in", "in_out"
SEPARATE, HALVES, INTERLEAVED = "separate", "halves", "interleaved"
GATHER, DENSE = "gather", "dense"
MOE_STRATEGIES = (GATHER, DENSE)
DEFAULT_MOE_STRATEGY = GATHER
CLAMPED_SWIGLU = "clamped_swiglu"  # gpt-oss: min(gate, L) * sigmoid(alpha * min(gate, L)) * (clip(up, -L, L) + 1)


@dataclass(frozen=True)
class MoeConfig(DecoderConfig):
    """DecoderConfig plus the MoE knobs (see the module docstring). `intermediate_size` stays the
    dense layers' MLP width; experts have `moe_intermediate_size`, the shared expert
    `shared_intermediate_size` (0: none)."""

    num_experts: int = 1
    experts_per_token: int = 1
    moe_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()
    router: str = SOFTMAX_TOPK
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    shared_intermediate_size: int = 0
    expert_layout: str = OUT_IN
    gate_up: str = SEPARATE
    expert_act: str = "silu"  # an ACTIVATIONS name, or CLAMPED_SWIGLU
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    moe_strategy: str = DEFAULT_MOE_STRATEGY

    def is_moe(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]


# -- routing ----------------------------------------------------------------------------------------------


def one_hot(indices: Any, size: int) -> Any:
    """bool [..., size]: indices[...] == j."""
    return indices[..., None] == arange(size)


def _limit_groups(choice: Any, cfg: MoeConfig) -> Any:
    """DeepSeek-style group limiting: only experts of the topk_group groups whose two best scores sum
    highest stay eligible (the others get -inf)."""
    groups, per_group = cfg.n_group, cfg.num_experts // cfg.n_group
    grouped = choice.reshape(choice.shape[0], groups, per_group)
    group_scores = top_k(grouped, 2)[0].sum(axis=-1)                            # [T, G]
    _, best = top_k(group_scores, cfg.topk_group)                               # [T, topk_group]
    kept = one_hot(best, groups).astype(np.int32).sum(axis=1) > 0               # [T, G]
    return where(repeat(kept, per_group, axis=1), choice, np.array(-np.inf, choice.dtype))


def route(x: Any, p: dict[str, Any], cfg: MoeConfig) -> tuple[Any, Any]:
    """Tokens x [T, H] -> (chosen experts [T, k] int64, their weights [T, k])."""
    logits = linear(x, p["router"], p.get("router_bias"))                      # [T, E]
    k = cfg.experts_per_token
    if cfg.router == SOFTMAX_TOPK:
        weights, experts = top_k(softmax(logits, axis=-1), k)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(axis=-1, keepdims=True)
    elif cfg.router == TOPK_SOFTMAX:
        top, experts = top_k(logits, k)
        weights = softmax(top, axis=-1)
    elif cfg.router == SIGMOID_TOPK:
        scores = sigmoid(logits)
        choice = scores + p["router_correction_bias"] if "router_correction_bias" in p else scores
        if cfg.n_group > 1:
            choice = _limit_groups(choice, cfg)
        _, experts = top_k(choice, k)
        # the unbiased scores of the chosen experts (a one-hot sum picks them exactly)
        weights = where(one_hot(experts, cfg.num_experts), scores[:, None, :], np.array(0, scores.dtype)).sum(axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights = weights * cfg.routed_scaling_factor
    elif cfg.router == SIGMOID_INPUT:
        top, experts = top_k(logits, k)
        weights = sigmoid(top)
    else:
        raise ValueError(f"unknown router {cfg.router!r}")
    return experts, weights


def dense_weights(experts: Any, weights: Any, num_experts: int) -> Any:
    """[T, E]: each token's routing weight for every expert (0 where it chose none)."""
    return where(one_hot(experts, num_experts), weights[..., None], np.array(0, weights.dtype)).sum(axis=1)


# -- the experts' MLP -------------------------------------------------------------------------------------


def _gate_and_up(p: dict[str, Any]) -> list[Any]:
    return [p["experts_gate_up"]] if "experts_gate_up" in p else [p["experts_gate"], p["experts_up"]]


def _glu(parts: list[Any], axis: int, cfg: MoeConfig) -> Any:
    """act(gate) * up from the gate/up projections (one fused array or two), features on `axis`."""
    if len(parts) == 2:
        gate, up = parts
    else:
        fused = parts[0]
        width = fused.shape[axis]
        index = [slice(None)] * fused.ndim
        first, second = list(index), list(index)
        if cfg.gate_up == INTERLEAVED:
            first[axis], second[axis] = slice(0, width, 2), slice(1, width, 2)
        else:
            first[axis], second[axis] = slice(0, width // 2), slice(width // 2, width)
        gate, up = fused[tuple(first)], fused[tuple(second)]
    if cfg.expert_act == CLAMPED_SWIGLU:
        gate = minimum(gate, cfg.swiglu_limit)
        up = clip(up, -cfg.swiglu_limit, cfg.swiglu_limit)
        return (up + 1) * (gate * sigmoid(gate * cfg.swiglu_alpha))
    return ACTIVATIONS[cfg.expert_act](gate) * up


def _apply_gathered(x: Any, stack: Any, experts: Any, cfg: MoeConfig) -> Any:
    """x [T, 1 or k, in] through each token's chosen experts' matrices -> [T, k, out]."""
    chosen = take(stack, experts, axis=0)                                       # [T, k, out, in] or [T, k, in, out]
    if cfg.expert_layout == OUT_IN:
        return (chosen @ x[..., None])[..., 0]
    return (x[..., None, :] @ chosen)[..., 0, :]


def experts_gather(x: Any, experts: Any, weights: Any, p: dict[str, Any], cfg: MoeConfig) -> Any:
    """The gather-per-token form: tokens x [T, H] -> [T, H]."""
    scale_input = cfg.router == SIGMOID_INPUT
    tokens = x[:, None, :] * weights[..., None] if scale_input else x[:, None, :]   # [T, k or 1, H]
    projected = []
    for stack in _gate_and_up(p):
        projected.append(_apply_gathered(tokens, stack, experts, cfg))
    if "experts_gate_up_bias" in p:
        projected[0] = projected[0] + take(p["experts_gate_up_bias"], experts, axis=0)
    hidden = _glu(projected, -1, cfg)                                           # [T, k, I]
    out = _apply_gathered(hidden, p["experts_down"], experts, cfg)               # [T, k, H]
    if "experts_down_bias" in p:
        out = out + take(p["experts_down_bias"], experts, axis=0)
    if not scale_input:
        out = out * weights[..., None]
    return out.sum(axis=1)


def experts_dense(x: Any, experts: Any, weights: Any, p: dict[str, Any], cfg: MoeConfig) -> Any:
    """The all-experts form: every expert on every token, weighted by the dense routing weights."""
    routing = dense_weights(experts, weights, cfg.num_experts).T               # [E, T]
    scale_input = cfg.router == SIGMOID_INPUT
    if cfg.expert_layout == OUT_IN:
        # activations [E, features, T]: W [E, out, in] @ x^T
        feature_axis, per_token = -2, routing[:, None, :]
        tokens = x.T * per_token if scale_input else x.T                       # [E or 1.., H, T]

        def project(stack: Any, h: Any) -> Any:
            return stack @ h

        def bias(b: Any) -> Any:
            return b[:, :, None]
    else:
        # activations [E, T, features]: x @ W [E, in, out]
        feature_axis, per_token = -1, routing[:, :, None]
        tokens = x[None] * per_token if scale_input else x

        def project(stack: Any, h: Any) -> Any:
            return h @ stack

        def bias(b: Any) -> Any:
            return b[:, None, :]
    projected = [project(stack, tokens) for stack in _gate_and_up(p)]
    if "experts_gate_up_bias" in p:
        projected[0] = projected[0] + bias(p["experts_gate_up_bias"])
    out = project(p["experts_down"], _glu(projected, feature_axis, cfg))
    if "experts_down_bias" in p:
        out = out + bias(p["experts_down_bias"])
    if not scale_input:
        out = out * per_token
    out = out.sum(axis=0)
    return out.T if cfg.expert_layout == OUT_IN else out


def shared_expert(x: Any, p: dict[str, Any], cfg: MoeConfig) -> Any:
    return gated_mlp(x, {k: p["shared_" + k] for k in ("gate_proj", "up_proj", "down_proj")}, cfg.hidden_act)


def moe(x: Any, p: dict[str, Any], cfg: MoeConfig) -> Any:
    """The MoE feed-forward of hidden states x [B, S, H]."""
    tokens = x.reshape(-1, x.shape[-1])                                         # [T, H]
    experts, weights = route(tokens, p, cfg)
    run = experts_dense if cfg.moe_strategy == DENSE else experts_gather
    out = run(tokens, experts, weights, p, cfg)
    if "shared_gate_proj" in p:
        out = out + shared_expert(tokens, p, cfg)
    return out.reshape(x.shape)


def feed_forward(x: Any, p: dict[str, Any], cfg: DecoderConfig) -> Any:
    """A layer's MLP: the MoE block when the layer has a router, else the dense gated MLP."""
    return moe(x, p, cfg) if "router" in p else gated_mlp(x, p, cfg.hidden_act)


# -- weight maps ------------------------------------------------------------------------------------------


def per_expert(template: str, key: str, shape: tuple[int, ...], num_experts: int) -> WeightMap:
    """One tensor per expert (template has {j}), as params `key.0` ... `key.{E-1}`: the driver stacks
    them into one [E, ...] operand."""
    return {f"{key}.{j}": Weight(template.format(j=j), shape, EXPERTS) for j in range(num_experts)}


def stacked(name: str, shape: tuple[int, ...], layout: str = OUT_IN) -> Weight:
    return Weight(name, shape, EXPERTS if layout == OUT_IN else EXPERTS_IN_OUT)


def router_weights(cfg: MoeConfig, name: str, bias: str | None = None) -> WeightMap:
    weights = {"router": Weight(name, (cfg.num_experts, cfg.hidden_size), LINEAR)}
    if bias:
        weights["router_bias"] = Weight(bias, (cfg.num_experts,), BIAS)
    return weights


def per_expert_gated_mlp(cfg: MoeConfig, prefix: str, names: tuple[str, str, str] = ("gate_proj", "up_proj",
                                                                                    "down_proj")) -> WeightMap:
    """Experts stored one nn.Linear each: {prefix}{j}.{gate,up,down}.weight ([out, in])."""
    d, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    gate, up, down = names
    return {**per_expert(prefix + "{j}." + gate + ".weight", "experts_gate", (i, d), e),
            **per_expert(prefix + "{j}." + up + ".weight", "experts_up", (i, d), e),
            **per_expert(prefix + "{j}." + down + ".weight", "experts_down", (d, i), e)}


def shared_expert_weights(cfg: MoeConfig, prefix: str) -> WeightMap:
    d, i = cfg.hidden_size, cfg.shared_intermediate_size
    return {"shared_gate_proj": Weight(prefix + "gate_proj.weight", (i, d)),
            "shared_up_proj": Weight(prefix + "up_proj.weight", (i, d)),
            "shared_down_proj": Weight(prefix + "down_proj.weight", (d, i))}


def moe_layer_pattern(num_layers: int, sparse: Any) -> tuple[bool, ...]:
    return tuple(bool(sparse(i)) for i in range(num_layers))


def with_moe_strategy(model: Any, strategy: str) -> Any:
    """The model with its experts run the given way (`gather` or `dense`); a model without MoE layers
    is refused, since the choice would change nothing."""
    from ..config import ConfigError, replace

    if strategy not in MOE_STRATEGIES:
        raise ConfigError(f"--moe-strategy must be one of {', '.join(MOE_STRATEGIES)}, got {strategy!r}")
    if not isinstance(model.cfg, MoeConfig) or not any(model.cfg.moe_layers):
        raise ConfigError(f"--moe-strategy {strategy}: {model.cfg.architecture} has no mixture-of-experts layers")
    return type(model)(model.arch, replace(model.cfg, moe_strategy=strategy), model.params)
