"""User-facing errors and the source locations they point at.

Every error a user can cause derives from `QtraceError` and reads

    qtrace.ShapeError: matmul: contracting dims differ: f32[b,s,256] @ f32[512,256]
      at examples/llama.py:63 in attention

The location is the first stack frame outside qtrace (and outside numpy, whose dispatch frames sit
between a user's `np.exp(x)` and qtrace), found once per recorded operation.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# Frames from these directories are library frames; the user's frame is the first one outside them.
_QTRACE_ROOTS: list[str] = []


def register_library_dir(path: str) -> None:
    """Mark a directory as qtrace's own, so frames inside it are skipped when locating user code."""
    root = os.path.dirname(os.path.abspath(path)) + os.sep
    if root not in _QTRACE_ROOTS:
        _QTRACE_ROOTS.append(root)


register_library_dir(__file__)
_SKIPPED_FILES = ("functools.py", "contextlib.py", "<__array_function__ internals>")


def _numpy_root() -> str:
    import numpy

    return os.path.dirname(os.path.abspath(numpy.__file__)) + os.sep


_NUMPY_ROOT = _numpy_root()


@dataclass(frozen=True)
class SourceLocation:
    """Where in the user's code an operation was recorded."""

    file: str
    line: int
    function: str

    @property
    def short_file(self) -> str:
        """The file relative to the working directory when it lies below it, else its base name."""
        try:
            rel = os.path.relpath(self.file)
        except ValueError:  # another drive on Windows
            return os.path.basename(self.file)
        return rel if not rel.startswith("..") else os.path.basename(self.file)

    def __str__(self) -> str:
        return f"{self.short_file}:{self.line} in {self.function}"

    def brief(self) -> str:
        """`file.py:12 (fn)`: machine-independent, for IR dumps."""
        return f"{os.path.basename(self.file)}:{self.line} ({self.function})"


def _is_library_file(filename: str) -> bool:
    if filename.startswith(_NUMPY_ROOT) or filename.endswith(_SKIPPED_FILES):
        return True
    return any(filename.startswith(root) for root in _QTRACE_ROOTS)


def user_location() -> SourceLocation | None:
    """The innermost stack frame that belongs to the user's code."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not _is_library_file(os.path.abspath(filename) if not filename.startswith("<") else filename):
            return SourceLocation(filename, frame.f_lineno, frame.f_code.co_name)
        frame = frame.f_back
    return None


class QtraceError(Exception):
    """Base of every error qtrace raises for a user's mistake.

    `op` names the operation, `location` the user's line; both are added to the message.
    """

    def __init__(self, message: str, *, op: str | None = None, location: SourceLocation | None = None):
        super().__init__(message)
        self.message = message
        self.op = op
        self.location = location

    def with_context(self, op: str | None, location: SourceLocation | None) -> "QtraceError":
        """Fill in the operation and location if a deeper layer did not know them."""
        if self.op is None:
            self.op = op
        if self.location is None:
            self.location = location
        return self

    def __str__(self) -> str:
        text = f"{self.op}: {self.message}" if self.op else self.message
        if self.location is not None:
            text += f"\n  at {self.location}"
        return text


class ShapeError(QtraceError, ValueError):
    """Operand shapes do not fit the operation."""


class DTypeError(QtraceError, TypeError):
    """Operand dtypes do not fit the operation."""


class ConcretizationError(QtraceError, TypeError):
    """Python needed a concrete value (for `if`, `int()`, a loop bound) but got a traced one."""


class UnsupportedError(QtraceError, NotImplementedError):
    """The operation (often a numpy function) has no qtrace equivalent."""


class TraceError(QtraceError):
    """The traced function or its arguments are malformed (outputs, pytrees, names)."""


class LoweringError(QtraceError):
    """The IR cannot be expressed as the requested ONNX model."""


class FileError(QtraceError, OSError):
    """A file could not be written or read (a full disk, a missing directory, a malformed file)."""


class UsageError(QtraceError, ValueError):
    """An argument or command-line flag has a value qtrace cannot use (the message names the flag)."""


class RunError(QtraceError, RuntimeError):
    """onnxruntime could not run a lowered model on these inputs (a data-dependent failure such as an
    index out of range: the feeds' types and shapes were checked before)."""


class NumericsError(QtraceError, ArithmeticError):
    """A model computed NaN or inf where a finite value is needed (logits to pick a token from)."""


class NonFiniteWeightsWarning(UserWarning):
    """Weights hold NaN or inf: the export still works, but the model cannot compute finite values."""


class CheckError(QtraceError):
    """A graph failed a consistency check (shape_check, invariants, a pass broke numerics)."""


def located(fn: Callable[..., T]) -> Callable[..., T]:
    """For public entry points (`trace`, `lower`, `Lowered.run`, ...): an error raised inside without a
    user line (a bad argument of the call itself) gets the line that made the call."""

    @functools.wraps(fn)
    def entry_point(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except QtraceError as exc:
            if exc.location is None:
                exc.location = user_location()
            raise

    return entry_point
