"""The compiler's side files for a causal LM (the Cloud AI 100 protocol, not a model):
`specializations.json` (one entry per compiled shape), `custom_io.yaml` (the precision of the
retained-state buffers) and the `qaic-compile` command.

Facts from QEfficient's exports that the compiler and serving code expect: specialization symbols
are the ONNX dim names with string values; continuous batching adds `full_batch_size` to both entries
and `full_batch_exec_size` = 1 to prefill, and decode runs all `full_batch_size` lanes; the compile
command carries `-sub-functions` whenever the model holds layer functions (ONNX local functions).

Target hardware (`-aic-hw-version`): ai100 has no bfloat16, so a model is exported in float32 (or
float16) and compiled with `-convert-to-fp16`, its KV cache float16 in custom_io.yaml. An ai200
keeps a bfloat16 model as it is: no `-convert-to-fp16`, the KV cache `bfloat16`, and, as QEfficient
does when the model and its cache are both bfloat16, custom_io.yaml is written but not passed to the
compiler (QEfficient: "Custom IO list file will be ignored during compile"; an mxint8 cache is passed).
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


HW_VERSIONS = ("ai100", "ai200")


@dataclass(frozen=True)
class CompileOptions:
    """What compile.sh asks qaic-compile for."""

    num_cores: int = 16
    mxfp6_matmul: bool = False
    mos: int | None = None
    depth_first: bool = False
    kv_cache_precision: str | None = None  # "float16", "bfloat16", "mxint8"; None: the model's (see kv_precision)
    hw_version: str = "ai100"              # or "ai200"


def kv_precision(options: CompileOptions, model_dtype: str = "float32") -> str:
    """The KV cache's precision on the device: as asked, else bfloat16 for a bfloat16 model and float16
    for any other (the compiler converts float32 to float16)."""
    return options.kv_cache_precision or ("bfloat16" if model_dtype == "bfloat16" else "float16")


def compile_command(model: str, specs: str, custom_io: str, out: str, options: CompileOptions = CompileOptions(),
                    sub_functions: bool = False, model_dtype: str = "float32") -> str:
    """The qaic-compile command line; `model_dtype` is the exported model's float dtype."""
    bfloat16 = model_dtype == "bfloat16"
    parts = ["qaic-compile", "-aic-hw", f"-aic-hw-version={options.hw_version}", f"-m={model}", "-retained-state"]
    if not bfloat16:
        parts.append("-convert-to-fp16")
    parts += [f"-aic-num-cores={options.num_cores}", f"-network-specialization-config={specs}"]
    if not (bfloat16 and kv_precision(options, model_dtype) == "bfloat16"):
        parts.append(f"-custom-IO-list-file={custom_io}")
    parts.append(f"-aic-binary-dir={out}")
    if sub_functions:
        parts.append("-sub-functions")
    if options.mxfp6_matmul:
        parts.append("-mxfp6-matmul")
    if options.mos is not None:
        parts.append(f"-mos={options.mos}")
    if options.depth_first:
        parts.append("-aic-enable-depth-first")
    return " ".join(parts)


def compile_script(options: CompileOptions, sub_functions: bool, model_dtype: str = "float32") -> str:
    return ("#!/usr/bin/env bash\n# Compile for Cloud AI 100 (qaic-compile from the Qualcomm Apps SDK).\n"
            "cd \"$(dirname \"$0\")\"\n" + compile_command("model.onnx", "specializations.json", "custom_io.yaml",
                                                         "qpc", options, sub_functions, model_dtype) + "\n")


__all__ = ["CompileOptions", "HW_VERSIONS", "compile_command", "compile_script", "custom_io_yaml", "kv_precision",
           "kv_state_names", "specializations"]
