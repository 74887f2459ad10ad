"""Weights that are converted while they are written, never before.

Checkpoints ship in bfloat16; a Cloud AI 100 export wants float32 or float16. Converting the model in
memory first would hold a second, larger copy of it (a 1B model: 10 GiB of anonymous memory; an 8B
model does not fit a 24 GiB machine). `lazy_cast(array, dtype)` returns a `ConvertedWeight` instead:
an array-like with the target dtype and the source's shape that holds the source (typically a memory
map of the checkpoint) and reads nothing. Tracing makes it a constant of the target dtype, passes
leave it untouched (`is_deferred`), and saving writes it converted piece by piece (`c_order_pieces`),
so at most one piece of the converted model exists at a time. `np.asarray(weight)` converts it whole:
that is what the eager numpy reference does on small models.

Conversions (`convert`) equal numpy's, bit for bit:
- to float16 (from float32, bfloat16, float64): finite values are first clipped into float16's range
  (±65504, so a large weight saturates rather than becoming inf), then numpy casts; infinities and
  NaNs stay. bfloat16 goes through float32 (exact), as `np.asarray(x, np.float32)` then the float16
  lowering of constants would do; since bfloat16 has only 65536 values, that conversion is made once
  into a table and looked up (3x faster than clipping and casting every element).
- anything else (bfloat16 -> float32 is exact) is numpy's `astype`.
"""

from __future__ import annotations

import functools
import mmap
from typing import Any, Iterator

import numpy as np

from .dtypes import bfloat16
from .ir import ShapeDtype

FLOAT16_MAX = float(np.finfo(np.float16).max)
_F16, _F32 = np.dtype(np.float16), np.dtype(np.float32)
_LOOKUP_BLOCK = 1 << 18  # elements per table lookup


def convert(array: np.ndarray, dtype: Any) -> np.ndarray:
    """`array` as `dtype`, converted the way exports convert weights (see the module docstring)."""
    dtype = np.dtype(dtype)
    if array.dtype == dtype:
        return array
    if dtype == _F16 and bfloat16 is not None and array.dtype == bfloat16:
        return np.asarray(_bfloat16_to_float16()[array.view(np.uint16)])  # a 0-d index gives a scalar
    if dtype == _F16 and array.dtype.kind == "f":
        return _clip_to_float16(array)
    return array.astype(dtype)


def _clip_to_float16(array: np.ndarray) -> np.ndarray:
    """Finite values clipped to ±FLOAT16_MAX, then cast."""
    flat = array.reshape(-1)  # 1-D, so that a 0-d array clips into an array too
    infinite = np.isinf(flat)
    clipped = np.clip(flat, -FLOAT16_MAX, FLOAT16_MAX)  # NaN stays NaN
    if infinite.any():
        clipped[infinite] = flat[infinite]
    return clipped.astype(np.float16).reshape(array.shape)


def _convert_into(piece: np.ndarray, dtype: np.dtype, buffer: np.ndarray) -> np.ndarray:
    """convert(piece, dtype) for a 1-D piece, written into the start of `buffer` (no new memory: in
    a virtual machine, fresh pages for every piece cost as much as the conversion)."""
    out = buffer[:piece.size]
    if bfloat16 is not None and piece.dtype == bfloat16 and dtype == _F16:
        table, patterns = _bfloat16_to_float16(), piece.view(np.uint16)
        # np.take makes its indices intp first: a few at a time, that copy stays in cache
        for start in range(0, piece.size, _LOOKUP_BLOCK):
            np.take(table, patterns[start:start + _LOOKUP_BLOCK], out=out[start:start + _LOOKUP_BLOCK])
    elif bfloat16 is not None and piece.dtype == bfloat16 and dtype == _F32:
        # bfloat16 is the top half of a float32: the same bits as numpy's (exact) conversion
        np.left_shift(piece.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    elif dtype == _F16 and piece.dtype.kind == "f":
        out[...] = _clip_to_float16(piece)
    else:
        np.copyto(out, piece, casting="unsafe")
    return out


@functools.cache
def _bfloat16_to_float16() -> np.ndarray:
    """float16 of every bfloat16 bit pattern (via float32, clipped), indexed by the pattern."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(bfloat16)
    return _clip_to_float16(every.astype(np.float32))


class ConvertedWeight:
    """`source` as `dtype`, converted only when read: by `c_order_pieces` one piece at a time, or
    whole by `np.asarray`. Indexing returns a converted view of the indexed source (no data read)."""

    __slots__ = ("source", "dtype")

    def __init__(self, source: Any, dtype: Any):
        self.source = source
        self.dtype = np.dtype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def aval(self) -> ShapeDtype:
        return ShapeDtype(self.shape, self.dtype)

    @property
    def source_dtype(self) -> np.dtype:
        """The dtype stored in the source file (through nested conversions)."""
        source = self.source
        while isinstance(source, ConvertedWeight):
            source = source.source
        return np.dtype(source.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = convert(np.asarray(self.source), self.dtype)
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, key: Any) -> "ConvertedWeight":
        return ConvertedWeight(self.source[key], self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ConvertedWeight({self.aval} from {np.dtype(self.source.dtype)})"


def lazy_cast(array: Any, dtype: Any) -> Any:
    """`array` as `dtype` without reading it: the array itself when it already has that dtype, else a
    `ConvertedWeight`. A checkpoint loader calls this on each memory-mapped tensor (slice a fused
    tensor first or after: indexing a ConvertedWeight stays lazy)."""
    dtype = np.dtype(dtype)
    if np.dtype(array.dtype) == dtype:
        return array
    if isinstance(array, ConvertedWeight) and _exact_widening(array.source.dtype, array.dtype):
        array = array.source  # bfloat16 -> float32 -> float16 is bfloat16 -> float16
    return ConvertedWeight(array, dtype)


def _exact_widening(source: Any, target: np.dtype) -> bool:
    source = np.dtype(source)
    return target == _F32 and (source == _F16 or (bfloat16 is not None and source == bfloat16))


def is_deferred(array: Any) -> bool:
    """Is this constant's data outside memory (a memory map of a file) or not computed yet (a
    ConvertedWeight)? Passes never read such data: reading would load or convert a whole weight."""
    return isinstance(array, (ConvertedWeight, np.memmap))


def _read_ahead(array: Any) -> None:
    """Tell the kernel a memory-mapped source will be read once, front to back (it reads ahead)."""
    while isinstance(array, np.memmap) and isinstance(array.base, np.memmap):
        array = array.base
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and hasattr(mmap, "MADV_SEQUENTIAL"):
        try:
            array.base.madvise(mmap.MADV_SEQUENTIAL)
        except (OSError, ValueError):  # advice only
            pass


def c_order_pieces(array: Any, max_bytes: int, reuse: bool = False) -> Iterator[np.ndarray]:
    """The elements of `array` in C order as contiguous 1-D arrays of about `max_bytes` each. Neither
    the array nor its conversion is ever held whole: a memory map is read, a strided view made
    contiguous and a ConvertedWeight converted, one piece at a time. `reuse`: conversions go into one
    buffer, so each piece is valid only until the next one is asked for (for a caller that writes
    each piece out at once)."""
    if isinstance(array, ConvertedWeight):
        source_bytes = max(1, max_bytes * np.dtype(array.source.dtype).itemsize // array.dtype.itemsize)
        buffer = None
        for piece in c_order_pieces(array.source, source_bytes, reuse):
            if not reuse:
                yield convert(piece, array.dtype)
                continue
            if buffer is None or buffer.size < piece.size:
                buffer = np.empty(piece.size, array.dtype)
            yield _convert_into(piece, array.dtype, buffer)
    elif array.nbytes <= max_bytes or array.ndim == 0:
        yield np.ascontiguousarray(array).reshape(-1)
    elif array.flags.c_contiguous:
        _read_ahead(array)
        flat = array.reshape(-1)
        step = max(1, max_bytes // flat.itemsize)
        for start in range(0, flat.size, step):
            yield flat[start:start + step]
    else:
        rows = max(1, max_bytes // (array.nbytes // array.shape[0]))
        for start in range(0, array.shape[0], rows):
            if rows == 1:  # a single row is past the piece size: split it in turn
                yield from c_order_pieces(array[start], max_bytes)
            else:
                yield np.ascontiguousarray(array[start:start + rows]).reshape(-1)


__all__ = ["ConvertedWeight", "lazy_cast", "convert", "is_deferred", "c_order_pieces", "FLOAT16_MAX"]
