"""Writing a model to disk: atomically, with weights embedded or in an external data file.

External data is streamed array by array straight from the numpy arrays (which may be memory
maps of a checkpoint), so saving never holds a second copy of the weights; onnx's own
`save_model(..., save_as_external_data=True)` would need them all inside the protobuf first.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
from typing import Callable, Iterator

import numpy as np
import onnx

from .context import onnx_dtype
from .model import ModelParts, attach_weights

PROTOBUF_LIMIT = 2**31 - 1
_ALIGNMENT = 64  # bytes: lets runtimes map tensors straight from the file
_CHUNK = 64 << 20


def _chunks(array: np.ndarray) -> Iterator[memoryview]:
    """The array's bytes in C order, in pieces of about _CHUNK bytes. The whole array is never copied:
    a memmap is read, and a strided or broadcast view made contiguous, one piece at a time."""
    if array.nbytes <= _CHUNK:
        yield memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")
    elif array.flags.c_contiguous:
        flat = array.reshape(-1)
        step = max(1, _CHUNK // flat.itemsize)
        for start in range(0, flat.size, step):
            yield memoryview(flat[start:start + step]).cast("B")
    else:
        rows = max(1, _CHUNK // (array.nbytes // array.shape[0]))
        for start in range(0, array.shape[0], rows):
            if rows == 1:  # a single row is past the chunk size: split it in turn
                yield from _chunks(array[start])
            else:
                yield memoryview(np.ascontiguousarray(array[start:start + rows]).reshape(-1)).cast("B")


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


def _mapped_source(array: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset) when the array is a whole read-only memory map of a file region."""
    if isinstance(array, np.memmap) and array.filename and array.flags.c_contiguous \
            and not array.flags.writeable and isinstance(array.base, mmap.mmap):
        return array.filename, int(array.offset)
    return None


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
               progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Write the model to `path`; returns the files written.

    external_data: True puts weights of at least `size_threshold` bytes into `location` (default
    `<model file name>.data`) next to the model; None does so only when the model would pass
    protobuf's 2 GiB limit. Files appear under their final names only when complete.
    progress(bytes_written, total_bytes) is called as external data is written.
    """
    total = sum(a.nbytes for a in parts.weights.values())
    if external_data is None:
        external_data = total + parts.model.ByteSize() >= PROTOBUF_LIMIT
    if not external_data:
        model = attach_weights(parts)
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
                    tensor.raw_data = array.tobytes()
                    continue
                source = _mapped_source(array) if reference_weights else None
                link = _link_next_to(os.path.dirname(os.path.abspath(path)), source[0], links) if source else None
                if link is not None:  # zero-copy: point into the checkpoint file itself
                    _set_external(tensor, link, source[1], array.nbytes)
                    continue
                padding = (-offset) % _ALIGNMENT
                data_file.write(b"\0" * padding)
                offset += padding
                for chunk in _chunks(array):
                    data_file.write(chunk)
                    written += chunk.nbytes
                    if progress is not None:
                        progress(written, total)
                _set_external(tensor, location, offset, array.nbytes)
                offset += array.nbytes
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


def _set_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
