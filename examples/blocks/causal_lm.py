"""The causal-LM driver and its QEfficient-compatible signature.

One step (prefill chunk or decode) of any zoo model:

    embed -> for each layer (under qtrace.scope("layers.i"), a @qtrace.function): the family's layer
    -> final norm -> the hidden state at argmax(position_ids) of each row -> head -> logits [B,1,V]

Everything a layer reads from the step (cache indices, masks, RoPE at the positions) is computed
here once per step and passed in; the layer itself sees only arrays of fixed meaning, so all layers of
one kind share one traced body. Inputs and outputs carry QEfficient's names and dims: `input_ids`,
`position_ids` [batch_size, seq_len], `past_key.{i}`/`past_value.{i}` [batch_size (or
full_batch_size), kv_heads, ctx_len, head_dim], optional `batch_index` [batch_size, 1]; outputs
`logits` and the updated caches, which lowering names `*_RetainedState`.

Serving modes (`StepOptions`, docs/architecture.md "Serving interfaces") add inputs after the caches, in
QEfficient's order: `comp_ctx_lengths` [comp_ctx_lengths] (compute-context length: its length K is
how many cache slots every layer reads), `batch_index`, `num_logits_to_keep` [num_logits_to_keep, 1]
(logits for the nlk positions ending at each row's last valid one), and the sampler's inputs (its
`next_tokens` replace `logits`). Every output dim is one of the inputs' symbols.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

import qtrace
from qtrace.primitives import arange, argmax, broadcast_to, gather, maximum, minimum, stack, take, tanh, transpose

from ..config import CHUNKED, SLIDING, ConfigError, DecoderConfig
from ..registry import Architecture
from ..weights import linear_keys
from .attention import AttentionInputs
from .layers import linear, norm
from .masks import (cache_indices, kv_block_slots, query_row_indices, ring_held_positions, ring_indices, ring_length,
                    ring_write_positions, score_bias)
from .rope import RopeTables, model_rope_tables, rope_at, rope_name
from .sampler import SamplerOptions, sample, sampler_input_specs


@dataclass(frozen=True)
class StepOptions:
    """What a serving mode adds to the step (all off: the plain QEfficient prefill/decode graph).

    comp_ctx_lengths: the shape-only CCL input; num_logits_to_keep: the shape-only speculative-target
    input; sampler: the on-device sampler's options (None: the step returns logits)."""

    comp_ctx_lengths: bool = False
    num_logits_to_keep: bool = False
    sampler: SamplerOptions | None = None

    @property
    def adds_inputs(self) -> bool:
        return self.comp_ctx_lengths or self.num_logits_to_keep or self.sampler is not None


SLIDING_CACHES = ("full", "ring")
RING_DIMS = {SLIDING: "sliding_ctx_len", CHUNKED: "chunked_ctx_len"}  # the symbolic length of each kind's ring


@dataclass
class Model:
    """An architecture, its config and its params (memory maps of a checkpoint, or random).
    `sliding_cache="ring"` gives sliding-window and chunked layers a ring cache of their own length
    (masks.py) instead of a full ctx_len cache."""

    arch: Architecture
    cfg: DecoderConfig
    params: dict[str, Any]
    sliding_cache: str = "full"

    @property
    def dtype(self) -> np.dtype:
        return np.asarray(self.params["embed_tokens"][:0]).dtype

    def ring_kind(self, layer: int) -> str | None:
        """The attention kind of a layer with a ring cache, or None (a full cache)."""
        kind = self.cfg.layer_type(layer)
        return kind if self.sliding_cache == "ring" and kind in RING_DIMS else None

    def cache_sizes(self, ctx_len: int, prefill_seq_len: int) -> dict[str, int]:
        """The lengths of the ring dims (none with full caches), by symbol."""
        kinds = {self.ring_kind(i) for i in range(self.cfg.num_hidden_layers)} - {None}
        return {RING_DIMS[k]: ring_length(k, self.cfg, ctx_len, prefill_seq_len) for k in sorted(kinds)}

    def cache_shape(self, layer: int, batch: Any, ctx_len: Any, prefill_seq_len: int | None = None) -> tuple[Any, ...]:
        """A layer's cache; a ring's length is its symbol when ctx_len is symbolic, else computed
        from ctx_len and prefill_seq_len."""
        length, kind = ctx_len, self.ring_kind(layer)
        if kind is not None:
            if not isinstance(ctx_len, int):
                length = RING_DIMS[kind]
            elif prefill_seq_len is None:
                raise ValueError(f"the ring cache of layer {layer} needs the prefill length to size it")
            else:
                length = ring_length(kind, self.cfg, ctx_len, prefill_seq_len)
        return (batch, self.cfg.num_key_value_heads, length, self.cfg.head_dim)

    def empty_cache(self, batch: int, ctx_len: int, dtype: Any = None,
                    prefill_seq_len: int | None = None) -> dict[str, np.ndarray]:
        dtype = dtype or self.dtype
        cache = {}
        for i in range(self.cfg.num_hidden_layers):
            shape = self.cache_shape(i, batch, ctx_len, prefill_seq_len)
            cache[f"past_key.{i}"] = np.zeros(shape, dtype)
            cache[f"past_value.{i}"] = np.zeros(shape, dtype)
        return cache

    def signature(self, *, ctx_len: int | str = "ctx_len", batch_size: int | str = "batch_size",
                  seq_len: int | str = "seq_len", full_batch_size: int | str | None = None,
                  layer_functions: bool = True, max_ctx_len: int = 0, kv_blocks: int = 0, head_block_size: int = 0,
                  q_blocks: int = 0, skip_kv: bool = False, options: StepOptions = StepOptions()) -> tuple[Any, tuple]:
        """The step function to lower (or run eagerly) and its example specs. RoPE tables cover the
        largest context the export will be specialized to (an int ctx_len, or max_ctx_len) and, failing
        that, max_position_embeddings. kv_blocks > 0: blocked attention over that many equal blocks of
        each cache, their boundaries computed from the cache's (symbolic) length; head_block_size and
        q_blocks cut it further into groups of KV heads and equal blocks of query rows; skip_kv marks
        each block with a predicate, true when it lies past every position, that leaves the running
        softmax as it is (the accelerator may then skip the block).

        Without serving options the function is `fn(input_ids, position_ids, caches[, batch_index])`;
        with them it is `fn(input_ids, position_ids, caches, None, inputs)` where `inputs` maps the
        extra input names (batch_index among them) to arrays, in the order the export lists them."""
        exported = max(ctx_len if isinstance(ctx_len, int) else 0, max_ctx_len)
        positions = exported or self.cfg.max_position_embeddings
        if kv_blocks and not 1 <= kv_blocks <= exported:
            raise ValueError(f"kv_blocks {kv_blocks} needs an exported context of at least that many slots "
                             f"(ctx_len {exported or 'not given'})")
        if head_block_size and not (kv_blocks and 1 <= head_block_size <= self.cfg.num_key_value_heads):
            raise ValueError(f"head_block_size {head_block_size} needs blocked attention (kv_blocks) and at most "
                             f"the model's {self.cfg.num_key_value_heads} KV heads")
        if q_blocks and not (kv_blocks and q_blocks >= 1):
            raise ValueError(f"q_blocks {q_blocks} needs blocked attention (kv_blocks; 1 reads the cache whole)")
        if skip_kv and not kv_blocks:
            raise ValueError("skip_kv needs blocked attention (kv_blocks)")
        if kv_blocks and options.comp_ctx_lengths:
            raise ValueError("blocked attention reads the whole cache in equal blocks: it does not "
                             "combine with compute-context lengths")
        tables = model_rope_tables(self.cfg, positions, self.dtype)
        cache_batch = batch_size if full_batch_size is None else full_batch_size
        prefill = seq_len if isinstance(seq_len, int) else None
        past = {}
        for i in range(self.cfg.num_hidden_layers):
            spec = qtrace.ShapeDtype(self.cache_shape(i, cache_batch, ctx_len, prefill), self.dtype)
            past[f"past_key.{i}"], past[f"past_value.{i}"] = spec, spec
        ids = qtrace.ShapeDtype((batch_size, seq_len), np.int64)
        args: tuple = (ids, ids, past)
        batch_index = None if full_batch_size is None else qtrace.ShapeDtype((batch_size, 1), np.int64)
        fn = functools.partial(causal_lm_step, self.arch, self.cfg, self.params, tables,
                               layer_functions=layer_functions, sliding_cache=self.sliding_cache,
                               sampler=options.sampler,
                               kv_blocks=kv_blocks,
                               head_block_size=head_block_size, q_blocks=q_blocks, skip_kv=skip_kv)
        if not options.adds_inputs:
            return fn, args + ((batch_index,) if batch_index is not None else ())
        inputs: dict[str, Any] = {}
        if options.comp_ctx_lengths:
            inputs["comp_ctx_lengths"] = qtrace.ShapeDtype(("comp_ctx_lengths",), np.int64)
        if batch_index is not None:
            inputs["batch_index"] = batch_index
        if options.num_logits_to_keep:
            inputs["num_logits_to_keep"] = qtrace.ShapeDtype(("num_logits_to_keep", 1), np.int64)
        if options.sampler is not None:
            inputs.update(sampler_input_specs(batch_size, seq_len, cache_batch, self.cfg.vocab_size, options.sampler))
        return fn, args + (None, inputs)


def with_sliding_cache(model: Model, mode: str) -> Model:
    """The model with full (default) or ring caches on its sliding-window and chunked layers; rings
    for a model without such layers are refused, since they would change nothing."""
    if mode not in SLIDING_CACHES:
        raise ConfigError(f"--sliding-cache must be one of {', '.join(SLIDING_CACHES)}, got {mode!r}")
    kinds = {model.cfg.layer_type(i) for i in range(model.cfg.num_hidden_layers)}
    if mode == "ring" and not kinds & set(RING_DIMS):
        raise ConfigError(f"--sliding-cache ring: {model.cfg.architecture} has no sliding-window or chunked layers")
    return dataclasses.replace(model, sliding_cache=mode)


# -- default hooks (a family's Architecture may replace each) -------------------------------------------


def token_embedding(params: dict[str, Any], input_ids: Any, position_ids: Any, cfg: DecoderConfig) -> Any:
    h = take(params["embed_tokens"], input_ids, axis=0)
    if cfg.embedding_multiplier != 1.0:
        # transformers multiplies in the embedding's dtype (Gemma's normalizer is a tensor of it)
        h = h * np.asarray(cfg.embedding_multiplier, dtype=h.dtype)
    return h


def final_rms_norm(h: Any, params: dict[str, Any], cfg: DecoderConfig) -> Any:
    return norm(h, params["norm"], cfg.norm_eps)


def lm_head(h: Any, params: dict[str, Any], cfg: DecoderConfig) -> Any:
    logits = linear(h, transpose(params["lm_head"]), params.get("lm_head_bias"))
    if cfg.logits_divisor != 1.0:
        logits = logits / cfg.logits_divisor
    if cfg.final_logit_softcap is not None:
        logits = tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
    return logits


# -- one step -------------------------------------------------------------------------------------------


class StepInputs:
    """The per-step arrays layers read, built lazily once per (attention kind, read length, RoPE).

    comp_ctx_len: with CCL, the number K of cache slots every layer reads (the first K: each cache
    here is full length, slot c holding position c, so they hold positions < K); None: all of them."""

    def __init__(self, cfg: DecoderConfig, tables: dict[str, RopeTables], position_ids: Any, batch_index: Any,
                 dtype: Any, kv_blocks: int = 0, sliding_cache: str = "full", comp_ctx_len: Any = None,
                 head_block_size: int = 0, q_blocks: int = 0, skip_kv: bool = False):
        self.cfg, self.tables, self.position_ids, self.batch_index, self.dtype = cfg, tables, position_ids, batch_index, dtype
        self.kv_blocks = kv_blocks  # blocked attention over this many equal blocks of each cache (0: none)
        self.head_block_size = head_block_size
        self.q_blocks = q_blocks
        self.skip_kv = skip_kv
        self.sliding_cache = sliding_cache
        self.comp_ctx_len = comp_ctx_len
        self._made: dict[Any, Any] = {}

    def read_length(self, layer: int, cache_len: Any) -> Any:
        """How many slots of layer's cache are read (a cache whose slot is not its position, such as a
        ring buffer, must be read whole)."""
        return cache_len if self.comp_ctx_len is None else self.comp_ctx_len

    def _once(self, key: Any, make: Any) -> Any:
        if key not in self._made:
            self._made[key] = make()
        return self._made[key]

    def _block_inputs(self, kind: str, cache_len: Any) -> tuple:
        """(indices [B,KV,L], bias [B,1,G*S,L]) of every KV block of a cache_len-slot cache, for layers of
        this kind."""
        blocks = self._once(("block slots", cache_len), lambda: kv_block_slots(cache_len, self.kv_blocks))
        shape = (self.position_ids.shape[0], self.cfg.num_key_value_heads, blocks[0].shape[0])
        last = self._once("last position", lambda: self.position_ids.max()) if self.skip_kv else None
        return tuple((broadcast_to(cache_indices(self.position_ids, slots), shape),
                      score_bias(self.position_ids, slots, kind, self.cfg, self.dtype),
                      None if last is None else last < slots[0]) for slots in blocks)

    def _query_rows(self) -> tuple:
        """The row numbers that cut a layer's G*S grouped query rows into q_blocks blocks and merge them."""
        rows = self.cfg.num_attention_heads // self.cfg.num_key_value_heads * self.position_ids.shape[1]
        return self._once(("query rows", rows), lambda: query_row_indices(rows, self.q_blocks))

    def for_layer(self, layer: int, cache_len: Any) -> AttentionInputs:
        """The inputs of layer `layer`, whose cache has cache_len slots (a ring's own length for a ring)."""
        kind = self.cfg.layer_type(layer)
        blocks = indices = bias = write = None
        if self.sliding_cache == "ring" and kind in RING_DIMS:  # a ring is short: read whole, never in blocks
            held = self._once(("held", cache_len), lambda: ring_held_positions(self.position_ids, cache_len))
            indices = self._once(("ring indices", cache_len), lambda: ring_indices(held, cache_len))
            write = self._once(("ring writes", cache_len), lambda: ring_write_positions(self.position_ids, cache_len))
            bias = self._once(("ring bias", kind, cache_len),
                              lambda: score_bias(self.position_ids, cache_len, kind, self.cfg, self.dtype, held))
        elif self.kv_blocks:
            blocks = self._once(("blocks", kind, cache_len), lambda: self._block_inputs(kind, cache_len))
        else:
            ctx_len = self.read_length(layer, cache_len)
            slots = self._once(("slots", ctx_len), lambda: arange(ctx_len))
            indices = self._once(("indices", ctx_len), lambda: cache_indices(self.position_ids, slots))
            bias = self._once(("bias", kind, ctx_len),
                              lambda: score_bias(self.position_ids, slots, kind, self.cfg, self.dtype))
        spec = self.cfg.rope_for_layer(layer)
        cos = sin = rotation = None
        if spec is not None:
            table = self.tables[rope_name(self.cfg, spec)]
            cos, sin = self._once(("rope", rope_name(self.cfg, spec)), lambda: rope_at(table, self.position_ids))
            rotation = table.rotation
        return AttentionInputs(self.position_ids, indices, bias, self.batch_index, cos, sin, rotation, blocks or (),
                               write, self.head_block_size if blocks else 0, self.q_blocks if blocks else 0,
                               self._query_rows() if blocks and self.q_blocks > 1 else ())


def causal_lm_step(arch: Architecture, cfg: DecoderConfig, params: dict[str, Any], tables: dict[str, RopeTables],
                   input_ids: Any, position_ids: Any, past_key_values: dict[str, Any], batch_index: Any = None,
                   inputs: dict[str, Any] | None = None, *, layer_functions: bool = True, kv_blocks: int = 0,
                   head_block_size: int = 0, q_blocks: int = 0, skip_kv: bool = False,
                   sliding_cache: str = "full", sampler: SamplerOptions | None = None) -> dict[str, Any]:
    """One prefill or decode step: logits [B,1,vocab] at argmax(position_ids) of each row (or
    [B,nlk,vocab] with num_logits_to_keep, or the sampler's outputs) and the updated caches under
    their input names. `inputs` holds the serving inputs by name (see StepOptions). With
    sliding_cache="ring" the caches of sliding and chunked layers are rings (Model.cache_shape)."""
    inputs = dict(inputs or {})
    if batch_index is None:
        batch_index = inputs.get("batch_index")
    ccl = inputs.get("comp_ctx_lengths")
    h = (arch.embed or token_embedding)(params, input_ids, position_ids, cfg)
    step = StepInputs(cfg, tables, position_ids, batch_index, h.dtype, kv_blocks, sliding_cache,
                      None if ccl is None else ccl.shape[0], head_block_size, q_blocks, skip_kv)
    with qtrace.scope("step"):
        layer_inputs = [step.for_layer(i, past_key_values[f"past_key.{i}"].shape[2]) for i in range(len(params["layers"]))]
    linear_names = _linear_names(arch, cfg)
    layer = arch.layer if layer_functions else getattr(arch.layer, "__wrapped__", arch.layer)
    outputs: dict[str, Any] = {}
    for i, p in enumerate(params["layers"]):
        past_key, past_value = past_key_values[f"past_key.{i}"], past_key_values[f"past_value.{i}"]
        kernels = {k: transpose(v) if k in linear_names else stack(v) if isinstance(v, list) else v
                   for k, v in p.items()}  # a list: one tensor per expert, stacked here (outside the layer)
        with qtrace.scope(f"layers.{i}"):
            layer_cfg = arch.layer_config(cfg, i) if arch.layer_config else cfg
            h, key_cache, value_cache = layer(h, kernels, layer_inputs[i], past_key, past_value, layer_cfg)
        outputs[f"past_key.{i}"], outputs[f"past_value.{i}"] = key_cache, value_cache
    h = (arch.final_norm or final_rms_norm)(h, params, cfg)
    logits = (arch.head or lm_head)(kept_positions(h, position_ids, inputs.get("num_logits_to_keep")), params, cfg)
    if sampler is None:
        return {"logits": logits, **outputs}
    sampled = sample(logits, input_ids, position_ids, batch_index, inputs, sampler)
    buffers = {k: sampled.pop(k) for k in list(sampled) if k.endswith("_RetainedState")}
    return {**sampled, **outputs, **buffers}


def kept_positions(h: Any, position_ids: Any, num_logits_to_keep: Any = None) -> Any:
    """The hidden states the head sees: [B,1,D] at each row's last valid position (argmax of
    position_ids, so right padding at -1 is skipped), or with num_logits_to_keep [nlk, 1] the nlk
    consecutive ones ending there, [B,nlk,D] (the start clamped at 0, as QEfficient's target model
    does; indices past the chunk are clamped to its last position)."""
    last = argmax(position_ids, axis=1, keepdims=True)                     # [B,1]
    rows = arange(h.shape[0])[:, None]
    if num_logits_to_keep is None:
        return gather(h, [rows, last], axis=0)                             # [B,1,D]
    keep, seq = num_logits_to_keep.shape[0], position_ids.shape[1]
    first = maximum(last - arange(keep - 1, keep), 0)                       # [B,1]
    kept = minimum(first + arange(keep)[None, :], arange(seq - 1, seq))    # [B,nlk]
    return gather(h, [rows, kept], axis=0)


@functools.lru_cache(maxsize=None)
def _linear_names(arch: Architecture, cfg: DecoderConfig) -> frozenset[str]:
    return linear_keys(arch.weights(cfg))
