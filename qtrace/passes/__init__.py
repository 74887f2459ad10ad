"""The pass manager and the passes: shape_check, fuse, simplify (canonicalize, fold, cse, dce) and
function hygiene. `run_pipeline` runs them by name and can dump the IR after each."""

from __future__ import annotations

from ..errors import register_library_package

register_library_package(__name__)

from . import fuse as _fuse, functions as _functions, shape_check as _shape_check, simplify as _simplify  # noqa: E402,F401
from .manager import PASSES, PassReport, register_pass, run_pipeline  # noqa: E402

DEFAULT_PIPELINE = ["shape_check", "canonicalize", "fuse", "simplify", "functions", "simplify", "shape_check"]

__all__ = ["PASSES", "DEFAULT_PIPELINE", "PassReport", "register_pass", "run_pipeline"]
