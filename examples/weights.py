"""Weight maps: how a family's params pytree is made from checkpoint tensors.

A weight map is a dict from a params path ("embed_tokens", "layers.3.q_proj") to a `Weight`: the
checkpoint tensor's name and shape, what kind of weight it is (which decides how random weights are
drawn and that linear weights are transposed for the layers), the rows of a fused tensor the param
takes (a split of qkv_proj or gate_up_proj, still a zero-copy view of the file), and a constant
added at load (Gemma's RMSNorm multiplies by 1 + w). Checkpoint loading, random models and writing
test checkpoints all go through the map, so a family states its tensor names once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from qtrace.weights import is_deferred

from .config import DecoderConfig

LINEAR, NORM, BIAS, EMBEDDING = "linear", "norm", "bias", "embedding"
CONV1D = "conv1d"  # a linear weight stored [in_features, out_features] (GPT-2's Conv1D): used as it is
# Expert matrices: never transposed (the MoE block multiplies them as stored), [.., out, in] like
# nn.Linear rows, or [.., in, out] (stacks that gpt-oss and Llama 4 store as kernels).
EXPERTS, EXPERTS_IN_OUT = "experts", "experts_in_out"


@dataclass(frozen=True)
class Weight:
    name: str                            # the checkpoint tensor
    shape: tuple[int, ...]               # the checkpoint tensor's shape
    kind: str = LINEAR                   # linear ([out, in]), conv1d ([in, out]), norm, bias, embedding, experts
    rows: tuple[int, int] | None = None  # the param is rows [start, stop) of the tensor
    offset: float = 0.0                  # added to the tensor at load

    @property
    def param_shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return self.shape
        return (self.rows[1] - self.rows[0],) + self.shape[1:]


WeightMap = dict[str, Weight]


def fused(name: str, parts: dict[str, int], in_features: int) -> dict[str, Weight]:
    """Params that are consecutive row blocks of one fused linear tensor [sum(parts), in_features]."""
    total, start, out = sum(parts.values()), 0, {}
    for key, size in parts.items():
        out[key] = Weight(name, (total, in_features), LINEAR, rows=(start, start + size))
        start += size
    return out


def attention_weights(cfg: DecoderConfig, prefix: str, *, bias: bool | None = None, o_bias: bool = False,
                      qk_norm: str | None = None, fused_qkv: str | None = None,
                      norm_offset: float = 0.0) -> dict[str, Weight]:
    """q/k/v/o_proj under `prefix` (e.g. "model.layers.0.self_attn."), their biases, and q/k norms
    over each head ("head") or the whole projection ("projection")."""
    d = cfg.hidden_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    bias = cfg.attention_bias if bias is None else bias
    if fused_qkv:
        weights = fused(prefix + fused_qkv + ".weight", {"q_proj": q, "k_proj": kv, "v_proj": kv}, d)
    else:
        weights = {f"{n}_proj": Weight(f"{prefix}{n}_proj.weight", (size, d)) for n, size in (("q", q), ("k", kv), ("v", kv))}
    weights["o_proj"] = Weight(prefix + "o_proj.weight", (d, q))
    if bias:
        for n, size in (("q", q), ("k", kv), ("v", kv)):
            weights[f"{n}_bias"] = Weight(f"{prefix}{n}_proj.bias", (size,), BIAS)
    if o_bias:
        weights["o_bias"] = Weight(prefix + "o_proj.bias", (d,), BIAS)
    if qk_norm is not None:
        q_size, k_size = (cfg.head_dim, cfg.head_dim) if qk_norm == "head" else (q, kv)
        weights["q_norm"] = Weight(prefix + "q_norm.weight", (q_size,), NORM, offset=norm_offset)
        weights["k_norm"] = Weight(prefix + "k_norm.weight", (k_size,), NORM, offset=norm_offset)
    return weights


def gated_mlp_weights(cfg: DecoderConfig, prefix: str, *, fused_gate_up: str | None = None) -> dict[str, Weight]:
    d, i = cfg.hidden_size, cfg.intermediate_size
    if fused_gate_up:
        weights = fused(prefix + fused_gate_up + ".weight", {"gate_proj": i, "up_proj": i}, d)
    else:
        weights = {"gate_proj": Weight(prefix + "gate_proj.weight", (i, d)),
                   "up_proj": Weight(prefix + "up_proj.weight", (i, d))}
    weights["down_proj"] = Weight(prefix + "down_proj.weight", (d, i))
    return weights


def norms(cfg: DecoderConfig, prefix: str, names: tuple[str, ...], offset: float = 0.0) -> dict[str, Weight]:
    return {n: Weight(f"{prefix}{n}.weight", (cfg.hidden_size,), NORM, offset=offset) for n in names}


def causal_lm_weights(cfg: DecoderConfig, layer: Callable[[int], dict[str, Weight]], *,
                      embed: str = "model.embed_tokens.weight", final_norm: str = "model.norm.weight",
                      head: str = "lm_head.weight", norm_offset: float = 0.0) -> WeightMap:
    """The whole map: embeddings, every layer's weights (as "layers.{i}.<key>"), final norm, head
    (the embedding matrix itself when the config ties them)."""
    shape = (cfg.vocab_size, cfg.hidden_size)
    weights: WeightMap = {"embed_tokens": Weight(embed, shape, EMBEDDING),
                          "norm": Weight(final_norm, (cfg.hidden_size,), NORM, offset=norm_offset)}
    weights["lm_head"] = weights["embed_tokens"] if cfg.tie_word_embeddings else Weight(head, shape)
    for i in range(cfg.num_hidden_layers):
        for key, weight in layer(i).items():
            weights[f"layers.{i}.{key}"] = weight
    return weights


# -- from tensors to params -----------------------------------------------------------------------------


def checkpoint_shapes(weights: WeightMap) -> dict[str, Weight]:
    """One entry per checkpoint tensor (a fused tensor appears once)."""
    tensors: dict[str, Weight] = {}
    for weight in weights.values():
        tensors.setdefault(weight.name, weight)
    return tensors


def random_tensors(weights: WeightMap, seed: int = 0, dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """Checkpoint tensors of a random model with unit-scale activations: linears ~ N(0, 1/fan_in),
    embeddings ~ N(0, 0.25), biases ~ N(0, 0.01), norms 1 + N(0, 0.01) (as stored: a norm loaded with
    offset 1 is stored near 0)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, weight in checkpoint_shapes(weights).items():
        noise = rng.standard_normal(weight.shape)
        if weight.kind in (LINEAR, EXPERTS):
            value = noise / math.sqrt(weight.shape[-1])
        elif weight.kind == CONV1D:
            value = noise / math.sqrt(weight.shape[0])
        elif weight.kind == EXPERTS_IN_OUT:
            value = noise / math.sqrt(weight.shape[-2])
        elif weight.kind == EMBEDDING:
            value = 0.5 * noise
        elif weight.kind == NORM:
            value = 1.0 - weight.offset + 0.1 * noise
        else:
            value = 0.1 * noise
        tensors[name] = value.astype(dtype)
    return tensors


def take_rows(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a tensor. Of a memory map, a new memory map of exactly that region, so
    an export can still reference the checkpoint file in place."""
    if isinstance(array, np.memmap) and array.filename and array.flags.c_contiguous:
        row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
        return np.memmap(array.filename, dtype=array.dtype, mode="r", offset=int(array.offset) + start * row_bytes,
                         shape=(stop - start,) + array.shape[1:])
    return array[start:stop]


def _put(items: list[Any], index: int, value: Any, empty: Any) -> None:
    while len(items) <= index:
        items.append(empty())
    items[index] = value


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"layers.0.q_proj": a, "layers.0.experts_up.1": b, "norm": c} ->
    {"layers": [{"q_proj": a, "experts_up": [.., b]}], "norm": c} (a key ending in .j is a list:
    one tensor per expert)."""
    params: dict[str, Any] = {}
    for path, value in flat.items():
        if path.startswith("layers."):
            _, index, key = path.split(".", 2)
            layers = params.setdefault("layers", [])
            if len(layers) <= int(index):
                _put(layers, int(index), {}, dict)
            name, _, item = key.rpartition(".")
            if item.isdigit():
                _put(layers[int(index)].setdefault(name, []), int(item), value, lambda: None)
            else:
                layers[int(index)][key] = value
        else:
            params[path] = value
    return params


def params_from_tensors(weights: WeightMap, tensors: dict[str, np.ndarray], dtype: Any,
                        convert: Callable[[np.ndarray, Any], np.ndarray] | None = None) -> dict[str, Any]:
    """The params pytree: each param its tensor (or rows of it), offset applied, in `dtype`.
    `convert(array, dtype)` converts tensors of another dtype (default: numpy's conversion)."""
    convert = convert or (lambda a, t: np.asarray(a, dtype=t))
    flat: dict[str, Any] = {}
    made: dict[tuple, Any] = {}  # a tensor used twice (tied embeddings) stays one array
    for path, weight in weights.items():
        key = (weight.name, weight.rows, weight.offset)
        if key not in made:
            array = tensors[weight.name]
            if weight.rows is not None:
                array = take_rows(array, *weight.rows)
            if weight.offset:
                array = (np.asarray(array, np.float32) + np.float32(weight.offset)).astype(dtype)
            made[key] = array if array.dtype == np.dtype(dtype) else convert(array, dtype)
        flat[path] = made[key]
    return _stack_in_memory(nest(flat))


def _stack_in_memory(params: dict[str, Any]) -> dict[str, Any]:
    """Per-expert tensors held in memory (random, or offset at load) become one stacked array now, so
    that the export never holds them twice (a stack folded from them beside the originals). Memory
    maps and tensors still to convert (`qtrace.weights.is_deferred`) stay a list: the graph stacks
    them, exports by reference point at the file's own bytes, and conversions happen while saving."""
    for layer in params.get("layers", []):
        for key, value in layer.items():
            if isinstance(value, list) and not any(is_deferred(v) for v in value):
                layer[key] = np.stack(value)
    return params


def linear_keys(weights: WeightMap) -> frozenset[str]:
    """The layer-level keys that hold linear weights (transposed for the layers)."""
    return frozenset(path.split(".", 2)[2] for path, w in weights.items()
                     if path.startswith("layers.") and w.kind == LINEAR)
