"""ALiBi (attention with linear biases): no position embedding; each head h adds slope[h] x (key
position - query position) to its scores, so a head looks less far back the steeper its slope.

The bias is built once per step at model level from `position_ids` (cache slot c holds position c),
in the grouped layout of cached attention: [B, KV, G*S, C], row g*S + s of KV head k for query s of
head k*G + g. Measured from the query rather than from the first key (as transformers' MPT does), it
differs from transformers' by a constant per row, which softmax ignores, and it stays small near the
diagonal, where the keys that matter are, so float16 keeps it exact there. Padding (position -1)
counts as position 0, like the masks.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qtrace.primitives import maximum

from ..config import DecoderConfig


def alibi_slopes(heads: int, bias_max: float = 8.0) -> tuple[float, ...]:
    """MPT's slopes, in float32 as transformers computes them: 2^-(i * bias_max / P) for i = 1..P, P the
    power of two at or above `heads`; with fewer heads than P, the odd-numbered slopes then the even-numbered."""
    padded = 2 ** math.ceil(math.log2(heads))
    exponents = np.arange(1, padded + 1, dtype=np.float32) * np.float32(bias_max / padded)
    slopes = np.float32(1.0) / np.power(np.float32(2.0), exponents)
    if padded != heads:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:heads]
    return tuple(float(s) for s in slopes)


def alibi_bias(position_ids: Any, key_positions: Any, cfg: DecoderConfig, dtype: Any) -> Any:
    """[B, KV, G*S, C]: slope of the query's head x (key position - query position). key_positions:
    the slot numbers read [C] (slot c holds position c), or the positions a ring cache's slots hold
    [B,1,C]."""
    batch, seq = position_ids.shape
    kv_heads, groups = cfg.num_key_value_heads, cfg.query_groups
    keys = key_positions[None, None, :] if key_positions.ndim == 1 else key_positions
    distance = (keys - maximum(position_ids, 0)[:, :, None]).astype(dtype)  # [B,S,C]
    slopes = np.asarray(cfg.alibi_slopes, dtype).reshape(1, kv_heads, groups, 1, 1)
    return (distance[:, None, None] * slopes).reshape(batch, kv_heads, groups * seq, key_positions.shape[-1])
