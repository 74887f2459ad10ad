"""Hugging Face checkpoints in, Cloud AI 100-ready exports out.

Weights are memory-mapped straight from the `*.safetensors` files (the format is an 8-byte header
length, a JSON header of dtype/shape/byte ranges, then raw little-endian data), so nothing is read
until it is written, and every tensor knows its byte range: with `weights="reference"` the ONNX
external-data entries point into the checkpoint itself and the export writes only the graph.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import qtrace
from qtrace.weights import lazy_cast

from .llama import ConfigError, LlamaConfig, causal_lm_signature, load_config

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


class CheckpointError(qtrace.QtraceError, ValueError):
    """A checkpoint is missing, corrupt or does not match its config."""


def _bfloat16() -> Any:
    from qtrace.dtypes import bfloat16

    return bfloat16


def read_safetensors(path: str) -> dict[str, np.memmap]:
    """Every tensor of one safetensors file as a read-only memory map (no data is read)."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > file_size:
                raise ValueError(f"its header length {header_len} exceeds the file size {file_size}")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (OSError, struct.error, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) or (_bfloat16() if info["dtype"] == "BF16" else None)
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = (int(offset) for offset in info["data_offsets"])
            shape = tuple(int(d) for d in info["shape"])
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for tensor {name} ({exc})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if start < 0 or end - start != nbytes or data_start + end > file_size:
            raise CheckpointError(f"{path}: tensor {name} has a byte range that does not fit its shape or the file")
        tensors[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + start, shape=shape)
    return tensors


def _hf_names(cfg: LlamaConfig) -> dict[str, tuple[str, ...]]:
    """params pytree path -> checkpoint tensor name, and the expected shape."""
    q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    d, i = cfg.hidden_size, cfg.intermediate_size
    names: dict[str, tuple[str, tuple[int, ...]]] = {
        "embed_tokens": ("model.embed_tokens.weight", (cfg.vocab_size, d)),
        "norm": ("model.norm.weight", (d,)),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head"] = ("lm_head.weight", (cfg.vocab_size, d))
    for n in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{n}."
        layer = {
            "input_layernorm": ("input_layernorm.weight", (d,)),
            "post_attention_layernorm": ("post_attention_layernorm.weight", (d,)),
            "q_proj": ("self_attn.q_proj.weight", (q_size, d)), "k_proj": ("self_attn.k_proj.weight", (kv_size, d)),
            "v_proj": ("self_attn.v_proj.weight", (kv_size, d)), "o_proj": ("self_attn.o_proj.weight", (d, q_size)),
            "gate_proj": ("mlp.gate_proj.weight", (i, d)), "up_proj": ("mlp.up_proj.weight", (i, d)),
            "down_proj": ("mlp.down_proj.weight", (d, i)),
        }
        if cfg.attention_bias:
            layer.update({"q_bias": ("self_attn.q_proj.bias", (q_size,)), "k_bias": ("self_attn.k_proj.bias", (kv_size,)),
                          "v_bias": ("self_attn.v_proj.bias", (kv_size,))})
        for key, (name, shape) in layer.items():
            names[f"layers.{n}.{key}"] = (prefix + name, shape)
    return names


def load_checkpoint(directory: str, dtype: Any = np.float32) -> tuple[LlamaConfig, dict[str, Any]]:
    """Config and params pytree of a checkpoint directory. Weights already in `dtype` stay memory maps;
    others (e.g. bfloat16) become ConvertedWeights, converted piece by piece when the model is saved."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    cfg = load_config(os.path.join(directory, "config.json"))
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for file in files:
        for name, array in read_safetensors(os.path.join(directory, file)).items():
            tensors[name], origin[name] = array, file
    flat: dict[str, np.ndarray] = {}
    for path, (name, shape) in _hf_names(cfg).items():
        array = tensors.get(name)
        if array is None:
            searched = os.path.join(directory, files[0]) if len(files) == 1 else \
                f"{directory} ({', '.join(files)})"
            raise CheckpointError(f"{searched}: tensor {name} is missing (expected shape {list(shape)})")
        if tuple(array.shape) != shape:
            raise CheckpointError(f"{os.path.join(directory, origin[name])}: tensor {name} has shape "
                                  f"{list(array.shape)}, the config implies {list(shape)}")
        flat[path] = lazy_cast(array, dtype)  # converted while the export writes it, never whole in memory
    params: dict[str, Any] = {"embed_tokens": flat["embed_tokens"], "norm": flat["norm"],
                              "lm_head": flat.get("lm_head", flat["embed_tokens"])}
    params["layers"] = [{k.split(".", 2)[2]: v for k, v in flat.items() if k.startswith(f"layers.{n}.")}
                        for n in range(cfg.num_hidden_layers)]
    return cfg, params


# -- side files for the compiler ------------------------------------------------------------------------


def specializations(ctx_len: int, prefill_seq_len: int, batch_size: int, full_batch_size: int | None) -> dict:
    prefill = {"batch_size": str(batch_size), "ctx_len": str(ctx_len), "seq_len": str(prefill_seq_len)}
    decode = {"batch_size": str(batch_size if full_batch_size is None else full_batch_size),
              "ctx_len": str(ctx_len), "seq_len": "1"}
    if full_batch_size is not None:
        prefill.update(full_batch_size=str(full_batch_size), full_batch_exec_size="1")
        decode["full_batch_size"] = str(full_batch_size)
    return {"specializations": [{"name": "Prefill", "symbols": prefill}, {"name": "Decode", "symbols": decode}]}


def custom_io_yaml(num_layers: int, precision: str) -> str:
    lines = []
    for suffix in ("", "_RetainedState"):
        for i in range(num_layers):
            for kind in ("past_key", "past_value"):
                lines += [f" - IOName: {kind}.{i}{suffix}", f"   Precision: {precision}", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class CompileOptions:
    """What compile.sh asks qaic-compile for (design.md §6)."""

    num_cores: int = 16
    mxfp6_matmul: bool = False
    mos: int | None = None
    depth_first: bool = False
    kv_cache_precision: str = "float16"  # or "mxint8"


def compile_command(model: str, specs: str, custom_io: str, out: str, options: CompileOptions = CompileOptions()) -> str:
    parts = ["qaic-compile", "-aic-hw", "-aic-hw-version=ai100", f"-m={model}", "-retained-state",
             "-convert-to-fp16", f"-aic-num-cores={options.num_cores}", f"-network-specialization-config={specs}",
             f"-custom-IO-list-file={custom_io}", f"-aic-binary-dir={out}"]
    if options.mxfp6_matmul:
        parts.append("-mxfp6-matmul")
    if options.mos is not None:
        parts.append(f"-mos={options.mos}")
    if options.depth_first:
        parts.append("-aic-enable-depth-first")
    return " ".join(parts)


# -- export ---------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    files: list[str]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    lowered: Any = None


def _atomic_directory(out_dir: str) -> str:
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.", dir=parent)


def export_model(cfg: LlamaConfig, params: dict[str, Any], out_dir: str, *, ctx_len: int = 128,
                 prefill_seq_len: int = 32, batch_size: int = 1, full_batch_size: int | None = None,
                 dtype: str = "float32", weights: str = "copy", layer_functions: bool = True,
                 compile_options: CompileOptions = CompileOptions(),
                 progress: Callable[[str], None] | None = None,
                 bytes_progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Lower the model and write model.onnx (+ external data), specializations.json, custom_io.yaml and
    compile.sh into out_dir. Everything is written in a scratch directory first: a failure leaves
    out_dir as it was. progress(stage) names each stage; bytes_progress(done, total) follows the weights."""
    if weights not in ("copy", "reference"):
        raise CheckpointError(f"--weights must be copy or reference, got {weights!r}")
    if cfg.sliding_window is not None and ctx_len > cfg.sliding_window:
        raise ConfigError(f"{cfg.architecture}: ctx_len {ctx_len} exceeds the model's sliding window of "
                          f"{cfg.sliding_window} positions, which qtrace's attention does not implement; "
                          f"export with --ctx-len {cfg.sliding_window} or less")
    say = progress or (lambda _: None)
    stages: dict[str, float] = {}
    start = time.perf_counter()
    say("tracing and lowering")
    # The cache has the weights' dtype (float16 weights, as `qtrace export --dtype float16` loads them,
    # make float16 keys and values); lowering to float16 converts whatever is still float32.
    fn, args = causal_lm_signature(cfg, params, full_batch_size="full_batch_size" if full_batch_size else None,
                                   ctx_len="ctx_len", dtype=params["embed_tokens"].dtype,
                                   layer_functions=layer_functions, max_ctx_len=ctx_len)
    lowered = qtrace.lower(fn, args, dtype=np.float16 if dtype == "float16" else None)
    stages["lower"] = time.perf_counter() - start
    scratch = _atomic_directory(out_dir)
    try:
        start = time.perf_counter()
        say("writing model.onnx")
        model_path = os.path.join(scratch, "model.onnx")
        lowered.save(model_path, external_data=True, reference_weights=(weights == "reference"),
                               progress=bytes_progress)
        stages["save"] = time.perf_counter() - start
        with open(os.path.join(scratch, "specializations.json"), "w") as f:
            json.dump(specializations(ctx_len, prefill_seq_len, batch_size, full_batch_size), f, indent=2)
        with open(os.path.join(scratch, "custom_io.yaml"), "w") as f:
            f.write(custom_io_yaml(cfg.num_hidden_layers, compile_options.kv_cache_precision))
        with open(os.path.join(scratch, "compile.sh"), "w") as f:
            f.write("#!/usr/bin/env bash\n# Compile for Cloud AI 100 (qaic-compile from the Qualcomm Apps SDK).\n"
                    "cd \"$(dirname \"$0\")\"\n" + compile_command("model.onnx", "specializations.json",
                                                                 "custom_io.yaml", "qpc", compile_options) + "\n")
        os.chmod(os.path.join(scratch, "compile.sh"), 0o755)
        os.makedirs(out_dir, exist_ok=True)
        files = []
        for name in sorted(os.listdir(scratch)):
            target = os.path.join(out_dir, name)
            os.replace(os.path.join(scratch, name), target)
            files.append(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportReport(files, stages, lowered)


__all__ = ["CompileOptions", "load_checkpoint", "read_safetensors", "export_model", "specializations", "custom_io_yaml",
           "compile_command", "CheckpointError", "ConfigError"]
