"""Cloud AI 100 custom ops as ONNX functions (design.md section 5): the node contract and the
function library.

The Qualcomm compiler recognises these nodes by op_type, domain and input order and replaces them
with its own kernels. Their ONNX function bodies (custom_op_bodies.py, written with onnxscript) are
the portable reference: attached to a model as ``model.functions``, they let plain onnxruntime run it.

Importing onnxscript and compiling the bodies takes longer than exporting a small model, so the
compiled FunctionProtos are kept on disk, one file per opset, under a key made of the opset, the onnx
and onnxscript versions and a hash of custom_op_bodies.py. An export with a valid cache file never
imports onnxscript. A missing, stale or damaged file is rebuilt and replaced atomically; a cache
directory that cannot be written only costs the rebuild. The directory is $QTRACE_CACHE_DIR, else
$XDG_CACHE_HOME/qtrace, else ~/.cache/qtrace.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile

import onnx
from onnx import helper

__all__ = ["CUSTOM_OP_DOMAINS", "INT32_MAX", "SUPPORTED_OPSETS", "custom_op_function"]

QUALCOMM_DOMAIN = "com.qualcomm.cloud"
QTI_AISW_DOMAIN = "com.qti.aisw.onnx"

# op_type -> domain, for every op the compiler knows (input orders: design.md section 5)
CUSTOM_OP_DOMAINS: dict[str, str] = {
    "CtxScatter": QUALCOMM_DOMAIN,
    "CtxScatter3D": QUALCOMM_DOMAIN,
    "CtxScatter3DInt": QUALCOMM_DOMAIN,
    "CtxScatterCB": QUALCOMM_DOMAIN,
    "CtxScatterCB3D": QUALCOMM_DOMAIN,
    "CtxGather": QUALCOMM_DOMAIN,
    "CtxGather3D": QUALCOMM_DOMAIN,
    "CtxGatherBlockedKV": QUALCOMM_DOMAIN,
    "CtxGatherCB": QUALCOMM_DOMAIN,
    "CtxGatherCB3D": QUALCOMM_DOMAIN,
    "CtxGatherBlockedKVCB": QUALCOMM_DOMAIN,
    "CustomRMSNorm": QTI_AISW_DOMAIN,
}

INT32_MAX = 2**31 - 1
SUPPORTED_OPSETS = range(17, 22)

BODIES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "custom_op_bodies.py")
_KEY_PROPERTY = "qtrace.custom_ops.key"
_DIGEST_PROPERTY = "qtrace.custom_ops.sha256"


def custom_op_function(op_type: str, opset: int = 17) -> onnx.FunctionProto:
    """The FunctionProto for op_type, its body using ONNX default-domain ops valid at `opset` (17..21),
    with function.opset_import listing the default domain at `opset` (and nothing unneeded).

    Each call returns a fresh copy, so the caller may edit it (e.g. rename) without touching the cache.
    """
    if op_type not in CUSTOM_OP_DOMAINS:
        raise ValueError(
            f"unknown Cloud AI 100 custom op {op_type!r}; known ops: {', '.join(CUSTOM_OP_DOMAINS)}"
        )
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"custom op {op_type}: ONNX opset {opset} is not supported; "
            f"use one of {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}"
        )
    function = onnx.FunctionProto()
    function.CopyFrom(_functions(opset)[op_type])
    return function


@functools.lru_cache(maxsize=None)
def _functions(opset: int) -> dict[str, onnx.FunctionProto]:
    return load_functions(opset, cache_dir())


# -- the on-disk cache ----------------------------------------------------------------------------------


def cache_dir() -> str:
    """Where compiled custom-op functions are kept (see the module docstring)."""
    if os.environ.get("QTRACE_CACHE_DIR"):
        return os.environ["QTRACE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qtrace")


def load_functions(opset: int, directory: str) -> dict[str, onnx.FunctionProto]:
    """Every custom op's FunctionProto at `opset`: from `directory` when it holds this exact build,
    else compiled with onnxscript and stored there."""
    try:
        key = cache_key(opset)
    except OSError:  # no bodies source to key the cache on (a bytecode-only install): no cache
        return _build_functions(opset)
    path = os.path.join(directory, "custom_ops", f"opset{opset}-{key[:16]}.onnx")
    functions = _read_library(path, key)
    if functions is None:
        functions = _build_functions(opset)
        _write_library(path, key, functions)
    return functions


def _build_functions(opset: int) -> dict[str, onnx.FunctionProto]:
    from .custom_op_bodies import build_functions

    functions = build_functions(opset)
    assert functions.keys() == CUSTOM_OP_DOMAINS.keys()
    return functions


def cache_key(opset: int) -> str:
    """What the compiled functions depend on: the opset, onnx, onnxscript and the bodies' source."""
    digest = hashlib.sha256()
    for part in (f"opset {opset}", f"onnx {onnx.__version__}", f"onnxscript {_onnxscript_version()}"):
        digest.update(part.encode() + b"\0")
    with open(BODIES_FILE, "rb") as source:
        digest.update(source.read())
    return digest.hexdigest()


def _onnxscript_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("onnxscript")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _payload_digest(functions: dict[str, onnx.FunctionProto]) -> str:
    digest = hashlib.sha256()
    for name in sorted(functions):
        digest.update(functions[name].SerializeToString())
    return digest.hexdigest()


def _read_library(path: str, key: str) -> dict[str, onnx.FunctionProto] | None:
    """The functions stored at `path`, or None unless the file is complete and was built for `key`."""
    try:
        with open(path, "rb") as file:
            blob = file.read()
    except OSError:
        return None
    try:
        library = onnx.ModelProto.FromString(blob)
    except Exception:  # noqa: BLE001 - any parse failure means a damaged file: rebuild it
        return None
    properties = {p.key: p.value for p in library.metadata_props}
    functions = {function.name: function for function in library.functions}
    if properties.get(_KEY_PROPERTY) != key or functions.keys() != CUSTOM_OP_DOMAINS.keys():
        return None
    if properties.get(_DIGEST_PROPERTY) != _payload_digest(functions):
        return None
    return functions


def _write_library(path: str, key: str, functions: dict[str, onnx.FunctionProto]) -> None:
    """Store `functions` at `path` atomically (a temporary file renamed over it); errors are ignored,
    since the cache only saves time."""
    library = onnx.ModelProto()
    library.functions.extend(functions[name] for name in sorted(functions))
    helper.set_model_props(library, {_KEY_PROPERTY: key, _DIGEST_PROPERTY: _payload_digest(functions)})
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
        with os.fdopen(fd, "wb") as file:
            file.write(library.SerializeToString())
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.remove(tmp)
