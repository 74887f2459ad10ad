"""User-facing errors and the source locations they point at.

Every error a user can cause derives from `QtraceError` and reads

    qtrace.ShapeError: matmul: contracting dims differ: f32[b,s,256] @ f32[512,256]
      at examples/llama.py:63 in attention

The location is the first stack frame outside the library, found once per recorded operation.
Library frames are told apart by the module that runs them, not by their directory
(docs/architecture.md, "Source locations"): the core's own modules (`qtrace`, `qtrace.core`,
`qtrace.tracing`, ...; not its subpackages), the packages that register themselves
(`qtrace.primitives`, `qtrace.passes`, `qtrace.lowering`), numpy (whose dispatch frames sit between a
user's `np.exp(x)` and qtrace) and functools / contextlib. Everything else is the user's code,
including the model zoo `qtrace.examples`, which a normal install puts inside the qtrace directory.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, TypeVar

T = TypeVar("T")

CORE_PACKAGE = "qtrace"  # its own modules are library code; its subpackages only when registered
_LIBRARY_PACKAGES: set[str] = {"numpy"}  # with their subpackages
_LIBRARY_MODULES = frozenset({"functools", "contextlib"})
_SKIPPED_FILES = ("<__array_function__ internals>",)


def register_library_package(name: str) -> None:
    """Mark a package and its subpackages as library code: their frames are skipped when locating
    the user's line (each library package calls this with its `__name__` when imported)."""
    _LIBRARY_PACKAGES.add(name)


def is_library_frame(frame: FrameType) -> bool:
    """Does this frame run qtrace's (or numpy's) own code rather than the user's?"""
    module_globals = frame.f_globals
    package = module_globals.get("__package__") or ""
    if package == CORE_PACKAGE or module_globals.get("__name__") in _LIBRARY_MODULES:
        return True
    if any(package == p or package.startswith(p + ".") for p in _LIBRARY_PACKAGES):
        return True
    return frame.f_code.co_filename.endswith(_SKIPPED_FILES)


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


def user_location() -> SourceLocation | None:
    """The innermost stack frame that belongs to the user's code."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if not is_library_frame(frame):
            return SourceLocation(frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name)
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
