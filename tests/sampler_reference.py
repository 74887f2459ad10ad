"""A plain-numpy reference of QEfficient's on-device sampler (qeff-interface.md §4), row by row,
written from the algorithm's description and independent of qtrace: the tests compare the exported
sampler's token ids with it exactly.

Floating-point decisions (top-p and min-p thresholds, the Gumbel argmax, the greedy argmax) are
reported with their margin: a decision closer than MARGIN to its threshold could go either way
between two correct float implementations (numpy's softmax and onnxruntime's differ in the last
bits), and the tests require their inputs to stay clear of that.
"""

from __future__ import annotations

import numpy as np

FILTERED = np.float32(np.finfo(np.float16).min)
MARGIN = 1e-4


def penalized(logits: np.ndarray, seen: np.ndarray, generated: np.ndarray, repetition: float,
              presence: float) -> np.ndarray:
    """Repetition penalty r on seen tokens (l / r when l > 0, else l * r), then presence penalty p on
    generated ones (l - p), in float32 as the graph computes them."""
    logits = logits.astype(np.float32).copy()
    r = np.float32(repetition)
    for v in np.nonzero(seen)[0]:
        logits[v] = logits[v] / r if logits[v] > 0 else logits[v] * r
    for v in np.nonzero(generated)[0]:
        logits[v] = logits[v] - np.float32(presence) * np.float32(1)
    return logits


def reference_sample(logits: np.ndarray, seen: np.ndarray, generated: np.ndarray, *, temperature: float, top_k: int,
                     top_p: float, min_p: float, repetition: float, presence: float, random_numbers: np.ndarray
                     ) -> tuple[int, float, np.ndarray]:
    """(token, smallest decision margin, the probabilities the token is drawn from over the vocab)
    for one row: logits [V], seen/generated bool [V], random_numbers [K]."""
    vocab, width = logits.shape[0], random_numbers.shape[0]
    logits = penalized(logits, seen, generated, repetition, presence)
    ordered = sorted(range(vocab), key=lambda v: (-logits[v], v))
    if temperature == 0:
        gap = float(logits[ordered[0]] - logits[ordered[1]])
        probs = np.zeros(vocab)
        probs[ordered[0]] = 1
        return ordered[0], gap if gap > 0 else 0.0, probs
    scaled = logits / np.float32(temperature)
    ranked = sorted(range(vocab), key=lambda v: (-scaled[v], v))[:width][::-1]  # ascending, ties by index
    values = np.array([scaled[v] for v in ranked], np.float32)
    k = width if top_k <= 0 or top_k > width else top_k
    values[:width - k] = FILTERED
    shifted = np.exp((values - values.max()).astype(np.float64))
    probs = (shifted / shifted.sum()).astype(np.float32)
    running = np.cumsum(probs.astype(np.float64))
    # top_p 1 keeps everything exactly (a sum of positive probabilities is never <= 0): no margin
    margins = [abs(running[j] - (1 - top_p)) for j in range(width - 1) if values[j] != FILTERED and top_p < 1]
    for j in range(width - 1):
        if running[j] <= 1 - top_p:
            values[j] = FILTERED
    threshold = np.float64(min_p) * probs[-1]
    margins += [abs(float(probs[j]) - threshold) for j in range(width) if min_p > 0]
    for j in range(width):
        if probs[j] < threshold:
            values[j] = FILTERED
    with np.errstate(divide="ignore"):
        gumbel = -np.log(-np.log(random_numbers.astype(np.float64)))
    scores = values.astype(np.float64) + gumbel
    best = int(np.argmax(scores))
    runner_up = np.max(np.delete(scores, best)) if width > 1 else -np.inf
    margins.append(float(scores[best] - runner_up))
    kept = values != FILTERED
    weights = np.where(kept, np.exp(values.astype(np.float64) - values[kept].max()), 0.0)
    drawn = np.zeros(vocab)
    drawn[np.array(ranked)] = weights / weights.sum()
    return ranked[best], float(min(margins)), drawn
