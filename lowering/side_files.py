"""The compiler's side files for a causal LM (the Cloud AI 100 protocol, not a model):
`specializations.json` (one entry per compiled shape), `custom_io.yaml` (the precision of the
retained-state buffers), the multi-device partition config and the `qaic-compile` command.

Facts from QEfficient's exports that the compiler and serving code expect (docs/architecture.md,
"Cloud AI 100 conventions" and "Serving interfaces"):
specialization symbols are the ONNX dim names with string values; continuous batching adds
`full_batch_size` to every entry and `full_batch_exec_size` to prefill entries, and decode runs all
`full_batch_size` lanes; entry names are "Prefill"/"Decode", with `_0`, `_1`, ... when a name
repeats; the compile command carries `-sub-functions` whenever the model holds layer functions (ONNX
local functions) and `-mdp-load-partition-config=<json>` for more than one device.

Serving modes add symbols: compute-context length (CCL) gives one entry per `comp_ctx_lengths`
bucket, prefill buckets first; a speculative-decoding target gives `num_logits_to_keep` (1 in
prefill, K+1 in the decode entry of each K, whose `seq_len` is K+1). Every entry is distinguished by
its input shapes.

The CCL "ctx_len - 32 hole": QEfficient makes every prefill bucket differ from every decode bucket
(its comment says the compiler needs the two lists disjoint), lowering a colliding prefill value to
the next smaller multiple of 32. As the decode list must end at ctx_len, the largest prefill bucket
becomes ctx_len - 32, and a prompt reaching past it cannot be prefilled correctly. qtrace applies the
rule only when the export holds both lists (a prefill-only export keeps ctx_len), and its runtime
feeds a prompt chunk that no prefill bucket covers through the decode entries instead
(examples/generation.py); prefill and decode entries already differ in `seq_len`, so whether the rule
is needed at all is for a device to tell.

Target hardware (`-aic-hw-version`): ai100 has no bfloat16, so a model is exported in float32 (or
float16) and compiled with `-convert-to-fp16`, its KV cache float16 in custom_io.yaml. An ai200
keeps a bfloat16 model as it is: no `-convert-to-fp16`, the KV cache `bfloat16`, and, as QEfficient
does when the model and its cache are both bfloat16, custom_io.yaml is written but not passed to the
compiler (QEfficient: "Custom IO list file will be ignored during compile"; an mxint8 cache is passed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from qtrace.errors import QtraceError


class SpecializationError(QtraceError, ValueError):
    """Serving options that make no valid set of specializations (names the option and values)."""


# QEfficient's constants for CCL lists (QEfficient/utils/constants.py)
CCL_UNIQUE_STEP = 32
CCL_START_CTX_LEN = 4096
CCL_MAX_ELEMENTS = 5
CCL_START_MAP = ((32768, 4096, 4000), (65536, 8192, 8000), (math.inf, 16384, 16000))  # ctx up to, decode, prefill


def _doubling(start: int, limit: int, last: int | None = None, most: int = CCL_MAX_ELEMENTS) -> list[int]:
    """start, 2*start, ... up to limit, at most `most` values, the last one forced to `last`."""
    values = []
    while start <= limit and len(values) < most:
        values.append(start)
        start *= 2
    if last is not None and (not values or values[-1] != last):
        if len(values) < most:
            values.append(last)
        else:
            values[-1] = last
    return values


def automatic_ccl_lists(ctx_len: int, prefill_seq_len: int) -> tuple[list[int], list[int]]:
    """QEfficient's automatic lists (`automatic_ccl_generation`): for the context rounded up to a
    multiple of 1024, up to 4096 one bucket; beyond, doubling lists from 4096/8192/16384 (decode) and
    4000/8000/16000 (prefill), at most 5 values (10 shared ones with prefill_seq_len 1), both ending at
    the context. QEfficient then raises
    ctx_len itself to that multiple of 1024; qtrace keeps the ctx_len asked for and clips to it."""
    mapped = -(-max(ctx_len, 1) // 1024) * 1024
    if mapped <= CCL_START_CTX_LEN:
        return [ctx_len], [ctx_len]
    decode_start, prefill_start = next((d, p) for bound, d, p in CCL_START_MAP if mapped <= bound)
    if prefill_seq_len == 1:  # prefill and decode share the entries: twice as many values
        most = 2 * CCL_MAX_ELEMENTS
        both = _doubling(CCL_START_CTX_LEN, min(mapped, CCL_START_CTX_LEN * 2 ** (most - 1)), mapped, most)
        return _clip(both, ctx_len), _clip(both, ctx_len)
    decode = _doubling(decode_start, mapped, mapped)
    if mapped & (mapped - 1) == 0:
        prefill = _doubling(prefill_start, mapped)
    else:
        prefill = _doubling(prefill_start, mapped, mapped // 1000 * 1000)
    prefill[-1] = mapped
    return _clip(prefill, ctx_len), _clip(decode, ctx_len)


def _clip(values: Sequence[int], ctx_len: int) -> list[int]:
    return sorted({min(v, ctx_len) for v in values})


def ccl_lists(prefill: Sequence[int] | None, decode: Sequence[int] | None, ctx_len: int, prefill_seq_len: int, *,
              phases: str = "both") -> tuple[list[int], list[int]]:
    """The CCL buckets an export compiles, by QEfficient's rules (`validate_ccl_lists`): sorted,
    de-duplicated, ending at ctx_len (appended when the last is smaller); a missing list is [ctx_len];
    with prefill_seq_len 1 both lists are their union; when both phases are compiled, a prefill value
    equal to a decode value (or an earlier prefill value) is lowered to the next smaller multiple of 32
    (a value that would reach 0 is dropped). QEfficient also raises values below 1024 to 1024; qtrace
    compiles the buckets asked for. Values must be 1..ctx_len."""
    for flag, values in (("--comp-ctx-lengths-prefill", prefill), ("--comp-ctx-lengths-decode", decode)):
        bad = [v for v in values or () if not 1 <= v <= ctx_len]
        if bad:
            raise SpecializationError(f"{flag} {','.join(map(str, values))}: {bad[0]} is not a context length "
                                      f"between 1 and ctx_len {ctx_len}")
    if not prefill and not decode:
        prefill, decode = automatic_ccl_lists(ctx_len, prefill_seq_len)
    prefill_list, decode_list = _clip(list(prefill or [ctx_len]), ctx_len), _clip(list(decode or [ctx_len]), ctx_len)
    for values in (prefill_list, decode_list):
        if values[-1] < ctx_len:
            values.append(ctx_len)
    if prefill_seq_len == 1:
        union = sorted(set(prefill_list) | set(decode_list))
        return union, list(union)
    if phases != "both":
        return prefill_list, decode_list
    distinct: list[int] = []
    for value in prefill_list:
        while value > 0 and (value in decode_list or value in distinct):
            value = (value - 1) // CCL_UNIQUE_STEP * CCL_UNIQUE_STEP
        if value > 0:
            distinct.append(value)
    return sorted(distinct), decode_list


def speculative_lengths(num_speculative_tokens: int | Sequence[int] | None) -> list[int] | None:
    """The proposal lengths K of a speculative-decoding target, sorted and unique (an int is [K])."""
    if num_speculative_tokens is None:
        return None
    values = [num_speculative_tokens] if isinstance(num_speculative_tokens, int) else list(num_speculative_tokens)
    return sorted(set(values))


def specializations(ctx_len: int, prefill_seq_len: int, batch_size: int, full_batch_size: int | None, *,
                    comp_ctx_lengths_prefill: Sequence[int] | None = None,
                    comp_ctx_lengths_decode: Sequence[int] | None = None,
                    num_speculative_tokens: int | Sequence[int] | None = None, phases: str = "both",
                    extra_symbols: Mapping[str, int] | None = None, kv_cache_batch_size: int | None = None) -> dict:
    """specializations.json as QEfficient writes it (`build_prefill_specialization`,
    `build_decode_specialization`, `to_named_specializations`).

    The comp_ctx_lengths lists are the buckets already processed by `ccl_lists` (None: no CCL);
    num_speculative_tokens: K or a list of K (a target model: decode entries of seq_len K+1);
    phases: "both", "prefill" (a prefill-only export) or "decode" (decode-only); extra_symbols: more
    symbols every entry carries (e.g. a ring-cache length). Decode entries are listed per K, then per
    bucket (QEfficient refuses CCL with several K; qtrace compiles each pair). An entry identical to
    an earlier one is dropped; with prefill_seq_len 1 the prefill entries serve decode as well.
    kv_cache_batch_size (prefix caching): more cache slots than the full_batch_size decode lanes; the
    `full_batch_size` symbol (the caches' first dim) then carries the slots, decode's batch_size the lanes."""
    if phases not in ("both", "prefill", "decode"):
        raise SpecializationError(f"phases must be both, prefill or decode, got {phases!r}")
    lengths = speculative_lengths(num_speculative_tokens)
    cb = full_batch_size is not None
    extra = {k: str(v) for k, v in (extra_symbols or {}).items()}

    def entry(name: str, rows: int, seq_len: int, ccl: int | None, keep: int | None, exec_rows: int | None) -> dict:
        symbols = {"batch_size": str(rows), "ctx_len": str(ctx_len), "seq_len": str(seq_len)}
        if ccl is not None:
            symbols["comp_ctx_lengths"] = str(ccl)
        if keep is not None:
            symbols["num_logits_to_keep"] = str(keep)
        if cb:
            symbols["full_batch_size"] = str(kv_cache_batch_size or full_batch_size)
            if exec_rows is not None:
                symbols["full_batch_exec_size"] = str(exec_rows)
        return {"name": name, "symbols": {**symbols, **extra}}

    entries = []
    if phases in ("both", "prefill") or prefill_seq_len == 1:
        rows = batch_size if not cb else (full_batch_size if prefill_seq_len == 1 else 1)
        buckets = comp_ctx_lengths_decode if prefill_seq_len == 1 and phases == "decode" else comp_ctx_lengths_prefill
        name = "Decode" if phases == "decode" else "Prefill"
        for ccl in buckets or [None]:
            entries.append(entry(name, rows, prefill_seq_len, ccl, 1 if lengths else None, rows if cb else None))
    if phases in ("both", "decode") and prefill_seq_len != 1:
        rows = full_batch_size if cb else batch_size
        for k in lengths or [None]:
            for ccl in comp_ctx_lengths_decode or [None]:
                entries.append(entry("Decode", rows, 1 if k is None else k + 1, ccl, None if k is None else k + 1,
                                     None))
    unique: list[dict] = []
    for e in entries:
        if all(e["symbols"] != u["symbols"] for u in unique):
            unique.append(e)
    return {"specializations": _number_repeated_names(unique)}


def _number_repeated_names(entries: list[dict]) -> list[dict]:
    """Names that repeat get _0, _1, ... in order; a name used once keeps its bare form."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["name"]] = counts.get(e["name"], 0) + 1
    seen: dict[str, int] = {}
    named = []
    for e in entries:
        name = e["name"]
        if counts[name] > 1:
            seen[name] = seen.get(name, 0) + 1
            name = f"{name}_{seen[name] - 1}"
        named.append({"name": name, "symbols": e["symbols"]})
    return named


def mdp_partition_config(num_devices: int, num_cores: int) -> dict:
    """The tensor-slicing partition config QEfficient writes as mdp_ts_<n>.json for n devices: one
    partition over all devices, each with num_cores cores, connected peer to peer."""
    return {"connections": [{"devices": list(range(num_devices)), "type": "p2p"}],
            "partitions": [{"name": "Partition0",
                            "devices": [{"deviceId": d, "numCores": num_cores} for d in range(num_devices)]}]}


def mdp_config_name(num_devices: int) -> str:
    return f"mdp_ts_{num_devices}.json"


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
    num_devices: int = 1  # > 1: tensor slicing over that many devices (mdp_ts_<n>.json)
    hw_version: str = "ai100"  # or "ai200"


def kv_precision(options: CompileOptions, model_dtype: str = "float32") -> str:
    """The KV cache's precision on the device: as asked, else bfloat16 for a bfloat16 model and float16
    for any other (the compiler converts float32 to float16)."""
    return options.kv_cache_precision or ("bfloat16" if model_dtype == "bfloat16" else "float16")


def compile_command(model: str, specs: str, custom_io: str, out: str, options: CompileOptions = CompileOptions(),
                    sub_functions: bool = False, mdp_config: str | None = None, model_dtype: str = "float32") -> str:
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
    if options.num_devices > 1:
        parts.append(f"-mdp-load-partition-config={mdp_config or mdp_config_name(options.num_devices)}")
    return " ".join(parts)


def compile_script(options: CompileOptions, sub_functions: bool, model_dtype: str = "float32") -> str:
    return ("#!/usr/bin/env bash\n# Compile for Cloud AI 100 (qaic-compile from the Qualcomm Apps SDK).\n"
            "cd \"$(dirname \"$0\")\"\n" + compile_command("model.onnx", "specializations.json", "custom_io.yaml",
                                                         "qpc", options, sub_functions, model_dtype=model_dtype) + "\n")


def check_export_options(ctx_len: object, prefill_seq_len: object, batch_size: object, full_batch_size: object,
                         options: CompileOptions = CompileOptions()) -> None:
    """Refuse sizes and compile options no compiled model can have, naming the `qtrace export` flag
    (before any work: nothing is loaded or written)."""
    from qtrace.errors import UsageError

    def whole(value: object, flag: str, minimum: int = 1) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{flag} must be an integer, got {value!r}")
        if value < minimum:
            raise UsageError(f"{flag} must be >= {minimum}, got {value}")

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
    whole(options.num_devices, "--num-devices")
    if options.mos is not None:
        whole(options.mos, "--mos")
    if options.kv_cache_precision not in (None, "float16", "bfloat16", "mxint8"):
        raise UsageError(f"--kv-cache-precision must be float16, bfloat16 or mxint8, got "
                         f"{options.kv_cache_precision!r}")


__all__ = ["CompileOptions", "HW_VERSIONS", "SpecializationError", "automatic_ccl_lists", "ccl_lists",
           "check_export_options", "compile_command", "compile_script", "custom_io_yaml", "kv_precision",
           "kv_state_names", "mdp_config_name", "mdp_partition_config", "specializations", "speculative_lengths"]
