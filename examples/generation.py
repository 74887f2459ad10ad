"""Greedy decoding the way QEfficient's runtime drives an exported model: prefill in chunks of the
prefill length (padding positions = -1), then one token per decode step, the retained state fed back.

A `Step` runs the model once: `step(input_ids, position_ids, cache, batch_index) -> (logits, cache)`.
`onnx_step` wraps an onnxruntime session of an export; `eager_step` runs the numpy reference.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

from qtrace.errors import FileError, NumericsError, UsageError

RETAINED = "_RetainedState"
Step = Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray], Any], tuple[np.ndarray, dict[str, np.ndarray]]]


def onnx_session(model_dir: str) -> Any:
    """A session with qtrace's onnxruntime settings (qtrace.lowering.session: no faulty optimizers)."""
    from qtrace.lowering.session import inference_session

    path = os.path.join(model_dir, "model.onnx")
    if not os.path.isfile(path):
        raise FileError(f"{model_dir}: no model.onnx (is it the output directory of `qtrace export`?)")
    return inference_session(path)


def onnx_step(session: Any) -> Step:
    output_names = [o.name for o in session.get_outputs()]

    def step(input_ids, position_ids, cache, batch_index=None):
        feeds = {"input_ids": input_ids, "position_ids": position_ids, **cache}
        if batch_index is not None:
            feeds["batch_index"] = batch_index
        outputs = dict(zip(output_names, session.run(None, feeds)))
        new_cache = {name[:-len(RETAINED)]: value for name, value in outputs.items() if name.endswith(RETAINED)}
        return outputs["logits"], new_cache

    return step


def eager_step(fn: Callable[..., dict[str, Any]]) -> Step:
    """`fn(input_ids, position_ids, cache[, batch_index])` is the model function run on numpy."""

    def step(input_ids, position_ids, cache, batch_index=None):
        args = (input_ids, position_ids, cache) + ((batch_index,) if batch_index is not None else ())
        outputs = fn(*args)
        return outputs["logits"], {k: v for k, v in outputs.items() if k != "logits"}

    return step


CacheLayout = dict[str, tuple[tuple[Any, ...], np.dtype]]
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def cache_layout(session: Any) -> CacheLayout:
    """The cache inputs of an exported model: name -> (dims, symbolic ones by name; dtype)."""
    return {i.name: (tuple(i.shape), np.dtype(_ORT_DTYPES[i.type]))
            for i in session.get_inputs() if i.name.startswith("past_")}


def model_cache_layout(model: Any, full_batch_size: bool = False) -> CacheLayout:
    """The same for a zoo model run eagerly (dims named as the export names them)."""
    batch = "full_batch_size" if full_batch_size else "batch_size"
    return {f"past_{kind}.{i}": (model.cache_shape(i, batch, "ctx_len"), model.dtype)
            for i in range(model.cfg.num_hidden_layers) for kind in ("key", "value")}


def new_cache(layout: CacheLayout, batch: int, ctx_len: int, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Zero caches for `batch` rows (or slots) and `ctx_len` positions; other symbolic dims from `sizes`."""
    known = {"batch_size": batch, "full_batch_size": batch, "ctx_len": ctx_len, **(sizes or {})}
    return {name: np.zeros(tuple(d if isinstance(d, int) else known[d] for d in dims), dtype)
            for name, (dims, dtype) in layout.items()}


def prefill(step: Step, prompt: list[int], cache: dict[str, np.ndarray], prefill_len: int,
            slot: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """Feed the prompt in chunks; returns the first generated token and the cache."""
    if not prompt:
        raise UsageError("--prompt-ids: the prompt is empty")
    chunks = (len(prompt) + prefill_len - 1) // prefill_len
    batch_index = None if slot is None else np.array([[slot]], np.int64)
    logits = None
    for c in range(chunks):
        tokens = prompt[c * prefill_len:(c + 1) * prefill_len]
        ids = np.zeros((1, prefill_len), np.int64)
        positions = np.full((1, prefill_len), -1, np.int64)
        ids[0, :len(tokens)] = tokens
        positions[0, :len(tokens)] = np.arange(c * prefill_len, c * prefill_len + len(tokens))
        logits, cache = step(ids, positions, cache, batch_index)
    return int(np.argmax(logits[0, -1])), cache


def finite_logits(step: Step) -> Step:
    """A step that stops with a NumericsError when the model returns NaN or inf logits (greedy decoding
    would pick token 0 from them forever); `qtrace generate` runs its model this way."""

    def checked(input_ids, position_ids, cache, batch_index=None):
        logits, cache = step(input_ids, position_ids, cache, batch_index)
        last = logits[:, -1]
        if not np.isfinite(last).all():
            bad = int((~np.isfinite(last)).sum())
            where = f"positions {position_ids[0].min()}..{position_ids[0].max()}" if position_ids.size else "a step"
            raise NumericsError(f"the logits at {where} hold NaN or inf ({bad} of {last.size}); check the "
                                "weights for NaN or inf (qtrace.lowering.nonfinite_weights names them)")
        return logits, cache

    return checked


def generate(step: Step, prompts: list[list[int]], max_new_tokens: int, *, prefill_len: int, ctx_len: int,
             layout: CacheLayout, full_batch_size: int | None = None,
             sizes: dict[str, int] | None = None) -> list[list[int]]:
    """Greedy tokens for each prompt. Without continuous batching each prompt runs alone (batch 1);
    with it, every prompt is prefilled into its own cache slot and all decode together. `sizes`: the
    caches' other symbolic dims (ring caches' lengths, as specializations.json gives them)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be an integer of at least 1, got {max_new_tokens!r}")
    if prefill_len < 1 or ctx_len < prefill_len:
        raise UsageError(f"the export's prefill length {prefill_len} and context length {ctx_len} cannot run "
                         "(specializations.json): prefill needs 1 <= seq_len <= ctx_len")
    for prompt in prompts:
        if not prompt:
            raise UsageError("--prompt-ids: a prompt is empty")
        if len(prompt) + max_new_tokens > ctx_len:
            raise UsageError(f"--prompt-ids: a prompt of {len(prompt)} tokens plus --max-new-tokens {max_new_tokens} "
                             f"exceeds the context length (ctx_len) {ctx_len} of the export")
    if full_batch_size is None:
        results = []
        for prompt in prompts:
            token, cache = prefill(step, prompt, new_cache(layout, 1, ctx_len, sizes), prefill_len)
            tokens = [token]
            for position in range(len(prompt), len(prompt) + max_new_tokens - 1):
                logits, cache = step(np.array([[tokens[-1]]]), np.array([[position]]), cache, None)
                tokens.append(int(np.argmax(logits[0, -1])))
            results.append(tokens)
        return results
    if len(prompts) > full_batch_size:
        raise UsageError(f"--prompt-ids: {len(prompts)} prompts do not fit the {full_batch_size} cache slots of the "
                         "export (--full-batch-size)")
    slots = list(range(len(prompts)))[::-1]  # fill slots in reverse order: batch_index is not the row order
    cache = new_cache(layout, full_batch_size, ctx_len, sizes)
    results = [[] for _ in prompts]
    positions = [0] * full_batch_size
    last = [0] * full_batch_size
    for prompt, slot, out in zip(prompts, slots, results):
        token, cache = prefill(step, prompt, cache, prefill_len, slot=slot)
        out.append(token)
        positions[slot], last[slot] = len(prompt), token
    for _ in range(max_new_tokens - 1):
        ids = np.array([[t] for t in last], np.int64)
        pos = np.array([[p] for p in positions], np.int64)
        logits, cache = step(ids, pos, cache, np.arange(full_batch_size, dtype=np.int64)[:, None])
        for prompt_index, slot in enumerate(slots):
            token = int(np.argmax(logits[slot, -1]))
            results[prompt_index].append(token)
            last[slot] = token
            positions[slot] += 1
    return results
