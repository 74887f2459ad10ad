"""The pass manager: passes registered by name, run in a pipeline that can dump the IR after each."""

from __future__ import annotations

from .manager import PASSES, DEFAULT_PIPELINE, PassReport, register_pass, run_pipeline

__all__ = ["PASSES", "DEFAULT_PIPELINE", "PassReport", "register_pass", "run_pipeline"]
