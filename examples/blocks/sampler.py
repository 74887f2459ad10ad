"""The on-device sampler: QEfficient's sampling semantics computed in the graph (qeff-interface.md §4).

Inputs (after the KV inputs and batch_index, in this order): `last_accepted_output_tokens` [B,S];
the retained bool masks `past_repetition_penalty_buffer` (tokens of the prompt and the output) and
`past_presence_penalty_buffer` (tokens of the output), one row per cache slot; per-row
`repetition_penalties`, `presence_penalties`, `temperatures`, `top_ks` (int32), `top_ps`, `min_ps`
[B,1]; `random_numbers` [B, max_top_k_ids], uniform in (0, 1): the only randomness, so a run is
reproducible from its inputs. Outputs: `probs` [B,N,V] (with return_pdfs), `next_tokens` int64
[B,N,1], and the two buffers' `_RetainedState`.

One step:
1. A prompt chunk (more than one input token) clears the row's repetition mask on its first chunk
   (position 0) and its presence mask, then marks its tokens in the repetition mask; a decode step
   marks the last accepted token in both. Tokens at padding positions (-1) mark nothing. Rows are
   cleared only for the slots of this step (QEfficient clears the presence mask of every slot on any
   prefill, which loses the history of the other lanes under continuous batching).
2. Repetition penalty r on marked tokens: a logit l becomes l / r if l > 0, else l * r.
   Presence penalty p on marked tokens: l - p.
3. temperature 0: greedy argmax of the penalized logits. Otherwise the logits are divided by the
   temperature and the `max_top_k_ids` largest kept in ascending order; entries are filtered (set
   to float16's lowest value, as QEfficient does) by top-k (top_k <= 0 or > max_top_k_ids means
   max_top_k_ids), top-p (an entry is dropped when the cumulative probability up to and including
   it, ascending, is <= 1 - top_p; the largest always stays) and min-p (probability below min_p
   times the largest probability, both before top-p).
4. Gumbel-max: the token whose filtered value plus -log(-log(u)) is largest, u from random_numbers
   (column j belongs to the j-th entry in ascending order).
Every branch is computed and selected with `where`, so one graph serves every parameter value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import qtrace
from qtrace.primitives import (INT32_MAX, arange, argmax, broadcast_to, cumsum, ctx_scatter_cb, full, full_like, gather,
                               index_put, log, softmax, take, top_k, where)

FILTERED = np.float32(np.finfo(np.float16).min)  # QEfficient's "filtered out" value
PENALTY_BUFFERS = ("past_repetition_penalty_buffer", "past_presence_penalty_buffer")
SAMPLER_INPUTS = ("last_accepted_output_tokens", "past_repetition_penalty_buffer", "repetition_penalties",
                  "past_presence_penalty_buffer", "presence_penalties", "temperatures", "top_ks", "top_ps", "min_ps",
                  "random_numbers")


@dataclass(frozen=True)
class SamplerOptions:
    """max_top_k_ids: how many candidates the sampler ranks (the width of `random_numbers`, at most the
    vocabulary); return_pdfs: also output `probs`, the filtered distribution over the vocabulary."""

    max_top_k_ids: int = 512
    return_pdfs: bool = False


def sampler_input_specs(batch: Any, seq_len: Any, cache_batch: Any, vocab: int,
                        options: SamplerOptions) -> dict[str, qtrace.ShapeDtype]:
    """The sampler's inputs, in QEfficient's order and dims."""
    per_row = qtrace.ShapeDtype((batch, 1), np.float32)
    buffer = qtrace.ShapeDtype((cache_batch, vocab), np.bool_)
    return {"last_accepted_output_tokens": qtrace.ShapeDtype((batch, seq_len), np.int64),
            "past_repetition_penalty_buffer": buffer, "repetition_penalties": per_row,
            "past_presence_penalty_buffer": buffer, "presence_penalties": per_row, "temperatures": per_row,
            "top_ks": qtrace.ShapeDtype((batch, 1), np.int32), "top_ps": per_row, "min_ps": per_row,
            "random_numbers": qtrace.ShapeDtype((batch, options.max_top_k_ids), np.float32)}


def _row_mask(buffer: Any, slots: Any, keep: Any) -> Any:
    """[slots, 1] bool: keep[b] at slot slots[b], True elsewhere (a CtxScatterCB3D of one column)."""
    ones = full((buffer.shape[0], 1, 1), True, np.bool_)
    first = full((slots.shape[0], 1), 0, np.int64)
    return ctx_scatter_cb(ones, slots, first, keep[:, :, None])[:, :, 0]


def _mark(buffer: Any, slots: Any, tokens: Any) -> Any:
    """buffer[slots[b], tokens[b, s]] = True for every valid token (INT32_MAX marks nothing)."""
    marks = full(tokens.shape + (1,), True, np.bool_)
    return ctx_scatter_cb(buffer[:, :, None], slots, tokens, marks)[:, :, 0]


def update_penalty_buffers(inputs: dict[str, Any], input_ids: Any, position_ids: Any, slots: Any) -> tuple[Any, Any]:
    seq = input_ids.shape[1]
    prompt_chunk = arange(seq - 1, seq) > 0                                # [1]: more than one input token
    tokens = where(prompt_chunk, input_ids, inputs["last_accepted_output_tokens"])
    tokens = where(position_ids < 0, INT32_MAX, tokens)
    first_chunk = position_ids[:, :1] == 0                                 # [B,1]
    repetition = inputs["past_repetition_penalty_buffer"]
    presence = inputs["past_presence_penalty_buffer"]
    repetition = repetition & _row_mask(repetition, slots, ~(prompt_chunk & first_chunk))
    presence = presence & _row_mask(presence, slots, broadcast_to(~prompt_chunk, first_chunk.shape))
    repetition = _mark(repetition, slots, tokens)
    presence = _mark(presence, slots, where(prompt_chunk, INT32_MAX, tokens))
    return repetition, presence


def sample(logits: Any, input_ids: Any, position_ids: Any, batch_index: Any, inputs: dict[str, Any],
           options: SamplerOptions) -> dict[str, Any]:
    """logits [B,N,V] -> {probs?, next_tokens [B,N,1], the two buffers' retained states}."""
    logits = logits.astype(np.float32)
    batch, kept = logits.shape[0], options.max_top_k_ids
    rows = arange(batch)[:, None]
    slots = rows if batch_index is None else batch_index
    repetition, presence = update_penalty_buffers(inputs, input_ids, position_ids, slots)

    seen = take(repetition, slots[:, 0], axis=0)[:, None, :]               # [B,1,V]
    generated = take(presence, slots[:, 0], axis=0)[:, None, :]
    r = inputs["repetition_penalties"][:, :, None]
    logits = where(seen, where(logits > 0, logits / r, logits * r), logits)
    logits = logits - inputs["presence_penalties"][:, :, None] * generated.astype(np.float32)
    greedy = argmax(logits, axis=-1, keepdims=True)                        # [B,N,1]

    temperature = inputs["temperatures"][:, :, None]
    scaled = logits / where(temperature == 0, np.float32(1), temperature)
    values, indices = top_k(scaled, kept, axis=-1)
    values, indices = values[..., ::-1], indices[..., ::-1]               # ascending, as QEfficient ranks them
    position = arange(kept)
    k = inputs["top_ks"][:, :, None].astype(np.int64)
    k = where((k <= 0) | (k > kept), kept, k)
    values = where(position < kept - k, FILTERED, values)                  # top-k
    probs = softmax(values, axis=-1)
    dropped = (cumsum(probs, axis=-1) <= 1 - inputs["top_ps"][:, :, None]) & (position < kept - 1)
    values = where(dropped, FILTERED, values)                              # top-p
    values = where(probs < inputs["min_ps"][:, :, None] * probs[..., kept - 1:], FILTERED, values)  # min-p

    outputs: dict[str, Any] = {}
    if options.return_pdfs:
        steps = arange(logits.shape[1])[None, :, None]
        filtered = index_put(full_like(logits, FILTERED), (rows[:, :, None], steps, indices), values)
        outputs["probs"] = softmax(filtered, axis=-1)
    gumbel = -log(-log(inputs["random_numbers"]))[:, None, :]
    choice = argmax(values + gumbel, axis=-1, keepdims=True)              # [B,N,1]
    steps = arange(logits.shape[1])[None, :, None]
    drawn = gather(indices, [rows[:, :, None], steps, choice], axis=0)
    outputs["next_tokens"] = where(temperature == 0, greedy, drawn)
    outputs["past_repetition_penalty_buffer_RetainedState"] = repetition
    outputs["past_presence_penalty_buffer_RetainedState"] = presence
    return outputs
