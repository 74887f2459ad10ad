"""Writing a model to disk: atomically, with weights embedded or in an external data file.

External data is streamed piece by piece straight from the weights (which may be memory maps of a
checkpoint, or `ConvertedWeight`s converted as they are written), so saving never holds a second
copy of the weights; onnx's own `save_model(..., save_as_external_data=True)` would need them all
inside the protobuf first. Each weight is reported as it is stored (`StoredWeight`): embedded,
referenced in the checkpoint, copied, or converted.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import onnx

from qtrace.weights import ConvertedWeight, c_order_pieces

from .context import onnx_dtype
from .model import ModelParts, attach_weights

PROTOBUF_LIMIT = 2**31 - 1
_ALIGNMENT = 64  # bytes: lets runtimes map tensors straight from the file
_CHUNK = 16 << 20  # bytes per piece written (a converted piece goes into one reused buffer)


@dataclass(frozen=True)
class StoredWeight:
    """How save_model stored one weight. `how`: "embedded" (in the .onnx file), "referenced" (the
    external data points into the checkpoint file: zero-copy), "copied" (written to the data file as
    it is) or "converted" (written converted from `source_dtype`). `nbytes`: its size in the model."""

    name: str
    how: str
    nbytes: int
    dtype: np.dtype
    source_dtype: np.dtype


def _byte_pieces(array: Any) -> Iterator[memoryview]:
    """The weight's bytes in C order, about _CHUNK at a time (viewed as bytes: a bfloat16 array has
    no buffer format of its own)."""
    for piece in c_order_pieces(array, _CHUNK, reuse=True):  # each piece is written before the next
        yield memoryview(piece.view(np.uint8))


def _atomic_path(path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_stale_temporaries(directory, os.path.basename(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp", dir=directory)
    os.close(fd)
    os.chmod(tmp, _file_mode())  # mkstemp makes the file private (0600); a saved model is an ordinary file
    return tmp


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Delete `.<name>.<pid>.*.tmp` files (and scratch directories) left by a save or an export that was
    killed (the process `pid` is gone); one still running in another process keeps its own."""
    prefix = f".{name}."
    for entry in os.listdir(directory):
        if not (entry.startswith(prefix) and entry.endswith(".tmp")):
            continue
        pid = entry[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            stale = os.path.join(directory, entry)
            try:
                if os.path.isdir(stale) and not os.path.islink(stale):
                    shutil.rmtree(stale)
                else:
                    os.unlink(stale)
            except OSError:  # removed meanwhile, or not ours to remove
                pass


def scratch_directory(path: str) -> str:
    """A new hidden directory next to `path` to build it in (`.<name>.<pid>.*.tmp`), after removing the
    ones killed exports into the same place left behind."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(os.path.abspath(path))
    _remove_stale_temporaries(parent, name)
    return tempfile.mkdtemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=parent)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _file_mode() -> int:
    """The permissions `open(path, "w")` would give a new file under the current umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _mapped_source(array: Any) -> tuple[str, int] | None:
    """(file, byte offset) when the array is a contiguous read-only region of a memory-mapped file:
    a whole memory map, or a block of rows sliced from one (a fused checkpoint tensor split up)."""
    if not isinstance(array, np.memmap) or not array.filename or not array.flags.c_contiguous \
            or array.flags.writeable:
        return None
    root = array
    while isinstance(root.base, np.memmap):
        root = root.base
    if not isinstance(root.base, mmap.mmap):
        return None
    # numpy keeps the file offset of the root map; a slice starts that many bytes further in.
    start = array.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    return array.filename, int(root.offset) + start


def _link_next_to(model_dir: str, source: str, links: dict[str, str]) -> str | None:
    """A hard link next to the model to `source` (onnxruntime refuses external data outside the
    model's directory, symlinks included); None when the file system cannot link it."""
    if source in links:
        return links[source]
    name = os.path.basename(source)
    while os.path.lexists(os.path.join(model_dir, name)):
        if os.path.samefile(os.path.join(model_dir, name), source):
            links[source] = name
            return name
        name = "_" + name
    try:
        os.link(source, os.path.join(model_dir, name))
    except OSError:  # another file system, or links not allowed: the caller copies the data
        return None
    links[source] = name
    return name


def save_model(parts: ModelParts, path: str, *, external_data: bool | None = None,
               size_threshold: int = 1024, location: str | None = None,
               reference_weights: bool = False,
               progress: Callable[[int, int], None] | None = None,
               on_weight: Callable[[StoredWeight], None] | None = None) -> list[str]:
    """Write the model to `path`; returns the files written.

    external_data: True puts weights of at least `size_threshold` bytes into `location` (default
    `<model file name>.data`) next to the model; None does so only when the model would pass
    protobuf's 2 GiB limit. Files appear under their final names only when complete.
    progress(bytes_written, total_bytes) is called as external data is written; on_weight(StoredWeight)
    as each weight is stored.
    """
    report = on_weight or (lambda _: None)
    total = sum(a.nbytes for a in parts.weights.values())
    if external_data is None:
        external_data = total + parts.model.ByteSize() >= PROTOBUF_LIMIT
    if not external_data:
        model = attach_weights(parts)
        for name, array in parts.weights.items():
            report(_stored(name, "embedded", array))
        tmp = _atomic_path(path)
        try:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return [path]

    location = location or os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), location)
    model = onnx.ModelProto()
    model.CopyFrom(parts.model)
    data_tmp, model_tmp = _atomic_path(data_path), _atomic_path(path)
    try:
        offset = written = 0
        links: dict[str, str] = {}
        with open(data_tmp, "wb") as data_file:
            for name, array in parts.weights.items():
                tensor = model.graph.initializer.add()
                tensor.name = name
                tensor.data_type = onnx_dtype(array.dtype)
                tensor.dims.extend(array.shape)
                if array.nbytes < size_threshold or _may_be_shape_operand(array):
                    tensor.raw_data = np.asarray(array).tobytes()
                    report(_stored(name, "embedded", array))
                    continue
                source = _mapped_source(array) if reference_weights else None
                link = _link_next_to(os.path.dirname(os.path.abspath(path)), source[0], links) if source else None
                if link is not None:  # zero-copy: point into the checkpoint file itself
                    _set_external(tensor, link, source[1], array.nbytes)
                    report(_stored(name, "referenced", array))
                    continue
                padding = (-offset) % _ALIGNMENT
                data_file.write(b"\0" * padding)
                offset += padding
                for chunk in _byte_pieces(array):
                    data_file.write(chunk)
                    written += chunk.nbytes
                    if progress is not None:
                        progress(written, total)
                _set_external(tensor, location, offset, array.nbytes)
                offset += array.nbytes
                report(_stored(name, "converted" if isinstance(array, ConvertedWeight) else "copied", array))
        if progress is not None:
            progress(total, total)  # small and referenced weights count as done too
        with open(model_tmp, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(data_tmp, data_path)
        os.replace(model_tmp, path)
    finally:
        for tmp in (data_tmp, model_tmp):
            if os.path.exists(tmp):
                os.unlink(tmp)
    return [path, data_path] + [os.path.join(os.path.dirname(os.path.abspath(path)), n) for n in links.values()]


def _may_be_shape_operand(array: np.ndarray) -> bool:
    """Small int64 tensors stay inside the model whatever the threshold: they may be the shape, axes or
    bounds operands of Reshape, Unsqueeze, Slice, ..., which onnxruntime's shape inference reads from
    the model itself (it refuses to load a model whose shape operands are external)."""
    return array.dtype == np.int64 and array.nbytes <= _SHAPE_OPERAND_BYTES


_SHAPE_OPERAND_BYTES = 1024


def _stored(name: str, how: str, array: Any) -> StoredWeight:
    source = array.source_dtype if isinstance(array, ConvertedWeight) else array.dtype
    return StoredWeight(name, how, int(array.nbytes), np.dtype(array.dtype), np.dtype(source))


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
