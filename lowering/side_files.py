"""The compiler's side files for a causal LM (the Cloud AI 100 protocol, not a model):
`specializations.json` (one entry per compiled shape), `custom_io.yaml` (the precision of the
retained-state buffers) and the `qaic-compile` command.

Facts from QEfficient's exports that the compiler and serving code expect: specialization symbols
are the ONNX dim names with string values; continuous batching adds `full_batch_size` to both entries
and `full_batch_exec_size` = 1 to prefill, and decode runs all `full_batch_size` lanes; the compile
command carries `-sub-functions` whenever the model holds layer functions (ONNX local functions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


def specializations(ctx_len: int, prefill_seq_len: int, batch_size: int, full_batch_size: int | None,
                    cache_sizes: dict[str, int] | None = None) -> dict:
    """`cache_sizes`: other symbolic cache dims (a ring cache's length), the same in every entry,
    since prefill and decode share the retained buffers."""
    prefill = {"batch_size": str(batch_size), "ctx_len": str(ctx_len), "seq_len": str(prefill_seq_len)}
    decode = {"batch_size": str(batch_size if full_batch_size is None else full_batch_size),
              "ctx_len": str(ctx_len), "seq_len": "1"}
    for symbol, size in (cache_sizes or {}).items():
        prefill[symbol] = decode[symbol] = str(size)
    if full_batch_size is not None:
        prefill.update(full_batch_size=str(full_batch_size), full_batch_exec_size="1")
        decode["full_batch_size"] = str(full_batch_size)
    return {"specializations": [{"name": "Prefill", "symbols": prefill}, {"name": "Decode", "symbols": decode}]}


def custom_io_yaml(state_names: Sequence[str], precision: str) -> str:
    """One entry per retained-state input and its `_RetainedState` output, inputs first."""
    lines = []
    for suffix in ("", "_RetainedState"):
        for name in state_names:
            lines += [f" - IOName: {name}{suffix}", f"   Precision: {precision}", ""]
    return "\n".join(lines)


def kv_state_names(num_layers: int) -> list[str]:
    return [f"{kind}.{i}" for i in range(num_layers) for kind in ("past_key", "past_value")]


@dataclass(frozen=True)
class CompileOptions:
    """What compile.sh asks qaic-compile for."""

    num_cores: int = 16
    mxfp6_matmul: bool = False
    mos: int | None = None
    depth_first: bool = False
    kv_cache_precision: str = "float16"  # or "mxint8"


def compile_command(model: str, specs: str, custom_io: str, out: str, options: CompileOptions = CompileOptions(),
                    sub_functions: bool = False) -> str:
    parts = ["qaic-compile", "-aic-hw", "-aic-hw-version=ai100", f"-m={model}", "-retained-state",
             "-convert-to-fp16", f"-aic-num-cores={options.num_cores}", f"-network-specialization-config={specs}",
             f"-custom-IO-list-file={custom_io}", f"-aic-binary-dir={out}"]
    if sub_functions:
        parts.append("-sub-functions")
    if options.mxfp6_matmul:
        parts.append("-mxfp6-matmul")
    if options.mos is not None:
        parts.append(f"-mos={options.mos}")
    if options.depth_first:
        parts.append("-aic-enable-depth-first")
    return " ".join(parts)


def compile_script(options: CompileOptions, sub_functions: bool) -> str:
    return ("#!/usr/bin/env bash\n# Compile for Cloud AI 100 (qaic-compile from the Qualcomm Apps SDK).\n"
            "cd \"$(dirname \"$0\")\"\n" + compile_command("model.onnx", "specializations.json", "custom_io.yaml",
                                                         "qpc", options, sub_functions) + "\n")


def check_export_options(ctx_len: object, prefill_seq_len: object, batch_size: object, full_batch_size: object,
                         options: CompileOptions = CompileOptions()) -> None:
    """Refuse sizes and compile options no compiled model can have, naming the `qtrace export` flag
    (before any work: nothing is loaded or written)."""
    from qtrace.errors import UsageError

    def whole(value: object, flag: str, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UsageError(f"{flag} must be an integer of at least {minimum}, got {value!r}")

    whole(ctx_len, "--ctx-len")
    whole(prefill_seq_len, "--prefill-seq-len")
    whole(batch_size, "--batch-size")
    if prefill_seq_len > ctx_len:  # type: ignore[operator]
        raise UsageError(f"--prefill-seq-len {prefill_seq_len} is longer than --ctx-len {ctx_len}: a prefill chunk "
                         "must fit the context")
    if full_batch_size is not None:
        whole(full_batch_size, "--full-batch-size")
        if batch_size > full_batch_size:  # type: ignore[operator]
            raise UsageError(f"--batch-size {batch_size} exceeds --full-batch-size {full_batch_size}: continuous "
                             "batching has full_batch_size cache slots")
    whole(options.num_cores, "--num-cores")
    if options.mos is not None:
        whole(options.mos, "--mos")
    if options.kv_cache_precision not in ("float16", "mxint8"):
        raise UsageError(f"--kv-cache-precision must be float16 or mxint8, got {options.kv_cache_precision!r}")


__all__ = ["CompileOptions", "check_export_options", "compile_command", "compile_script", "custom_io_yaml",
           "kv_state_names", "specializations"]
