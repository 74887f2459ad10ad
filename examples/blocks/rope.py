"""Rotary position embeddings: frequency tables for every RoPE kind transformers knows that the zoo
needs (default, linear, llama3, yarn, longrope), partial rotary, and both pairings of rotated dims.

The tables are numpy constants computed once at export, in float32 as transformers computes them,
and indexed by `position_ids` once per step (`rope_at`). Rotation is one formula for every layout:

    rope(x) = x * cos + (x @ rotation) * sin

`rotation` is a signed permutation matrix [head_dim, head_dim] that pairs each rotated dim with its
partner (the halves, `rotate_half`, or interleaved neighbours, `rotate_every_two`) and is zero on the
dims that do not rotate, where the tables hold cos = 1 and sin = 0. A product with ±1 and a sum with
zeros are exact, so this equals transformers' slice/negate/concatenate form bit for bit, in one
MatMul instead of four nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qtrace.primitives import maximum, take, where

from ..config import DecoderConfig, RopeSpec


def rotary_dim(spec: RopeSpec, head_dim: int) -> int:
    return int(head_dim * spec.partial_rotary_factor)


def _base_powers(spec: RopeSpec, dim: int) -> np.ndarray:
    """theta ** (2i / dim) for i < dim/2, in float32 (transformers' arithmetic)."""
    return np.float32(spec.theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))


def inverse_frequencies(spec: RopeSpec, head_dim: int, max_position_embeddings: int,
                        long: bool = False) -> tuple[np.ndarray, float]:
    """(inverse frequencies [rotary_dim/2] float32, attention factor) of a RoPE kind. `long` selects
    longrope's long factors (used once a sequence passes original_max_position_embeddings)."""
    dim = rotary_dim(spec, head_dim)
    powers = _base_powers(spec, dim)
    inv_freq = np.float32(1.0) / powers
    factor = spec.param("factor")
    if spec.kind == "default":
        return inv_freq, 1.0
    if spec.kind == "linear":
        return inv_freq / np.float32(factor), 1.0
    if spec.kind == "llama3":
        return _llama3(spec, inv_freq), 1.0
    original = spec.param("original_max_position_embeddings")
    if spec.kind == "yarn":
        return _yarn(spec, dim, powers, float(factor if factor is not None else max_position_embeddings / original))
    if spec.kind == "longrope":
        if factor is None:
            factor = max_position_embeddings / original
        attention_factor = spec.param("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        ext = np.asarray(spec.param("long_factor" if long else "short_factor"), np.float32)
        if ext.shape != (dim // 2,):
            raise ValueError(f"longrope {'long' if long else 'short'}_factor has {ext.size} entries, "
                             f"the rotary dim {dim} needs {dim // 2}")
        return np.float32(1.0) / (ext * powers), float(attention_factor)
    raise ValueError(f"RoPE kind {spec.kind!r} is not supported")


def _llama3(spec: RopeSpec, inv_freq: np.ndarray) -> np.ndarray:
    factor = float(spec.param("factor"))
    low, high = float(spec.param("low_freq_factor")), float(spec.param("high_freq_factor"))
    old_context = float(spec.param("original_max_position_embeddings"))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_context) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(spec: RopeSpec, dim: int, powers: np.ndarray, factor: float) -> tuple[np.ndarray, float]:
    original = float(spec.param("original_max_position_embeddings"))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = spec.param("attention_factor")
    if attention_factor is None:
        m, m_all = spec.param("mscale"), spec.param("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = spec.param("beta_fast") or 32, spec.param("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if spec.param("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation = np.float32(1) - ramp
    inv_freq = (np.float32(1) / (np.float32(factor) * powers)) * (1 - extrapolation) + \
        (np.float32(1) / powers) * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


@dataclass(frozen=True)
class RopeTables:
    """cos/sin [positions, head_dim] (longrope: also `long_cos`/`long_sin` and the switch point)
    and the rotation matrix, all numpy constants."""

    cos: np.ndarray
    sin: np.ndarray
    rotation: np.ndarray
    long_cos: np.ndarray | None = None
    long_sin: np.ndarray | None = None
    switch_after: int | None = None  # longrope: long tables once max(position) + 1 exceeds this


def _table(spec: RopeSpec, head_dim: int, positions: int, inv_freq: np.ndarray,
           attention_factor: float, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    freqs = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None, :]     # [P, rot/2]
    angles = np.repeat(freqs, 2, axis=1) if spec.interleaved else np.concatenate([freqs, freqs], axis=1)
    rot = angles.shape[1]
    cos = np.ones((positions, head_dim), np.float32)
    sin = np.zeros((positions, head_dim), np.float32)
    cos[:, :rot] = np.cos(angles) * np.float32(attention_factor)
    sin[:, :rot] = np.sin(angles) * np.float32(attention_factor)
    return cos.astype(dtype), sin.astype(dtype)


def rotation_matrix(spec: RopeSpec, head_dim: int, dtype: Any = np.float32) -> np.ndarray:
    """R with (x @ R) = rotate_half(x) (or rotate_every_two) on the rotary dims, 0 elsewhere."""
    rot = rotary_dim(spec, head_dim)
    matrix = np.zeros((head_dim, head_dim), dtype)
    for i in range(rot // 2):
        # pairs (a, b): out[a] = -x[b], out[b] = x[a]
        a, b = (2 * i, 2 * i + 1) if spec.interleaved else (i, i + rot // 2)
        matrix[b, a] = -1
        matrix[a, b] = 1
    return matrix


def rope_tables(spec: RopeSpec, head_dim: int, positions: int, max_position_embeddings: int,
                dtype: Any = np.float32) -> RopeTables:
    inv_freq, factor = inverse_frequencies(spec, head_dim, max_position_embeddings)
    cos, sin = _table(spec, head_dim, positions, inv_freq, factor, dtype)
    rotation = rotation_matrix(spec, head_dim, dtype)
    if spec.kind != "longrope":
        return RopeTables(cos, sin, rotation)
    long_freq, factor = inverse_frequencies(spec, head_dim, max_position_embeddings, long=True)
    long_cos, long_sin = _table(spec, head_dim, positions, long_freq, factor, dtype)
    return RopeTables(cos, sin, rotation, long_cos, long_sin, int(spec.param("original_max_position_embeddings")))


def rope_at(tables: RopeTables, position_ids: Any) -> tuple[Any, Any]:
    """cos, sin [B,S,1,head_dim] at the step's positions (padding, -1, reads position 0)."""
    positions = maximum(position_ids, 0)
    cos, sin = take(tables.cos, positions, axis=0), take(tables.sin, positions, axis=0)
    if tables.long_cos is not None:
        # longrope decides per sequence, as transformers does per forward: long factors once the
        # sequence's largest position passes the original context.
        use_long = (position_ids.max(axis=1, keepdims=True) + 1 > tables.switch_after)[:, :, None]
        cos = where(use_long, take(tables.long_cos, positions, axis=0), cos)
        sin = where(use_long, take(tables.long_sin, positions, axis=0), sin)
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: Any, cos: Any, sin: Any, rotation: Any) -> Any:
    """x [B,S,heads,head_dim] rotated by the tables at its positions (see the module docstring)."""
    return x * cos + (x @ rotation) * sin


def rope_name(cfg: DecoderConfig, spec: RopeSpec) -> str:
    """The constants' name of a model's RoPE: `rope`, or `rope_local` for the sliding layers' own RoPE."""
    return "rope_local" if spec == cfg.local_rope and spec != cfg.rope else "rope"


def model_rope_tables(cfg: DecoderConfig, positions: int, dtype: Any) -> dict[str, RopeTables]:
    """The tables of every RoPE the model's layers use, by `rope_name`."""
    tables: dict[str, RopeTables] = {}
    for layer in range(cfg.num_hidden_layers):
        spec = cfg.rope_for_layer(layer)
        if spec is not None and rope_name(cfg, spec) not in tables:
            tables[rope_name(cfg, spec)] = rope_tables(spec, cfg.head_dim, positions, cfg.max_position_embeddings,
                                                       dtype)
    return tables
