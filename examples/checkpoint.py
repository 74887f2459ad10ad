"""Hugging Face checkpoints in, Cloud AI 100-ready exports out.

Weights are memory-mapped straight from the `*.safetensors` files (the format is an 8-byte header
length, a JSON header of dtype/shape/byte ranges, then raw little-endian data), so nothing is read
until it is written, and every tensor knows its byte range: with `weights="reference"` the ONNX
external-data entries point into the checkpoint itself and the export writes only the graph.
The checkpoint's config.json names its architecture; the registry gives its config reader and
weight map.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

import qtrace
from qtrace import pytree
from qtrace.lowering import warn_nonfinite_weights
from qtrace.lowering.save import StoredWeight, scratch_directory
from qtrace.lowering.side_files import (HW_VERSIONS, CompileOptions, check_export_options, compile_script,
                                        custom_io_yaml, kv_precision, kv_state_names, mdp_config_name,
                                        mdp_partition_config, specializations)
from qtrace.weights import lazy_cast

from .blocks.causal_lm import Model
from .config import ConfigError, DecoderConfig, load_config_json
from .registry import Architecture, read_config
from .serving import ServingOptions
from .weights import checkpoint_shapes, params_from_tensors, random_tensors

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



INDEX_FILE = "model.safetensors.index.json"


def _checkpoint_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    return files


def read_checkpoint_index(directory: str) -> dict[str, str] | None:
    """The weight map of a sharded checkpoint's model.safetensors.index.json (tensor name -> shard
    file in the directory), or None when the directory has no index."""
    path = os.path.join(directory, INDEX_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: expected a JSON object with a \"weight_map\" object (tensor name -> "
                              "shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or os.path.basename(shard) != shard:
            raise CheckpointError(f"{path}: weight_map maps tensor {name} to {shard!r}, which is not the name of a "
                                  "*.safetensors file in this directory")
    return weight_map


def _read_tensors(directory: str, names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """Memory maps of the checkpoint's tensors, the file each comes from, and where a missing tensor
    would have been looked for. A sharded checkpoint's index decides the file of each tensor (only
    the shards holding `names` are opened); otherwise every *.safetensors file is read."""
    index = read_checkpoint_index(directory)
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    if index is None:
        files = _checkpoint_files(directory)
        for file in files:
            for name, array in read_safetensors(os.path.join(directory, file)).items():
                tensors[name], origin[name] = array, file
        searched = os.path.join(directory, files[0]) if len(files) == 1 else f"{directory} ({', '.join(files)})"
        return tensors, origin, searched
    index_path = os.path.join(directory, INDEX_FILE)
    shards: dict[str, list[str]] = {}
    for name in names:
        if name in index:
            shards.setdefault(index[name], []).append(name)
    for shard, wanted in sorted(shards.items()):
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: shard file is missing ({INDEX_FILE} puts {len(wanted)} tensor(s) in it, "
                                  f"e.g. {wanted[0]})")
        found = read_safetensors(path)
        for name in wanted:
            if name not in found:
                raise CheckpointError(f"{path}: tensor {name} is missing ({INDEX_FILE} puts it in this shard)")
            tensors[name], origin[name] = found[name], shard
    return tensors, origin, index_path


def read_checkpoint_config(directory: str) -> tuple[Architecture, DecoderConfig]:
    """The architecture and config of a checkpoint directory (config.json only; no tensor is read)."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a directory")
    path = os.path.join(directory, "config.json")
    return read_config(load_config_json(path), path)


def load_checkpoint(directory: str, dtype: Any = np.float32) -> Model:
    """The model of a checkpoint directory: its registered architecture, config and params. Weights
    already in `dtype` stay memory maps of the files; others (e.g. bfloat16) become ConvertedWeights,
    converted piece by piece while the export writes them (never whole in memory). dtype None: the
    dtype the checkpoint stores its embedding in."""
    arch, cfg = read_checkpoint_config(directory)
    weight_map = arch.weights(cfg)
    expected = checkpoint_shapes(weight_map)
    tensors, origin, searched = _read_tensors(directory, list(expected))
    for name, weight in expected.items():
        array = tensors.get(name)
        if array is None:
            raise CheckpointError(f"{searched}: tensor {name} is missing (expected shape {list(weight.shape)})")
        if tuple(array.shape) != weight.shape:
            raise CheckpointError(f"{os.path.join(directory, origin[name])}: tensor {name} has shape "
                                  f"{list(array.shape)}, the config implies {list(weight.shape)}")
    if dtype is None:
        dtype = tensors[weight_map["embed_tokens"].name].dtype
    return Model(arch, cfg, params_from_tensors(weight_map, tensors, dtype, convert=lazy_cast))


def random_model(config: dict[str, Any], seed: int = 0, dtype: Any = np.float32) -> Model:
    """A model with random weights from a Hugging Face config dict (its "architectures" decides the
    family): the embedded default and the tests' models, no download."""
    arch, cfg = read_config(config, "config")
    weight_map = arch.weights(cfg)
    return Model(arch, cfg, params_from_tensors(weight_map, random_tensors(weight_map, seed, dtype), dtype))


def checkpoint_tensors(model: Model) -> dict[str, np.ndarray]:
    """The model's params as checkpoint tensors under the family's names, in float32 (fused tensors
    rebuilt from their row blocks, load-time offsets undone): what `save_pretrained` would write."""
    weight_map = model.arch.weights(model.cfg)
    flat = {k: v for k, v in model.params.items() if k != "layers"}
    for i, layer in enumerate(model.params.get("layers", [])):
        for key, value in layer.items():
            per_expert = f"layers.{i}.{key}.0" in weight_map  # a list, or their stack
            items = enumerate(value) if per_expert else [(None, value)]
            flat.update({f"layers.{i}.{key}" + ("" if j is None else f".{j}"): v for j, v in items})
    blocks: dict[str, dict[int, np.ndarray]] = {}
    for path, weight in weight_map.items():
        array = np.asarray(flat[path], np.float32) - np.float32(weight.offset)
        blocks.setdefault(weight.name, {})[weight.rows[0] if weight.rows else 0] = array
    return {name: np.concatenate([parts[k] for k in sorted(parts)]) for name, parts in blocks.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of float32/float16/bfloat16/integer tensors."""
    dtype_names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
    dtype_names[_bfloat16()] = "BF16"
    header: dict[str, Any] = {}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        header[name] = {"dtype": dtype_names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for array in arrays:
            f.write(array.tobytes())


def save_checkpoint(model: Model, directory: str, config: dict[str, Any]) -> None:
    """config.json + model.safetensors of a model (how tests and benchmarks make checkpoints)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    write_safetensors(os.path.join(directory, "model.safetensors"), checkpoint_tensors(model))


# -- export ---------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    files: list[str]
    stage_seconds: dict[str, float] = field(default_factory=dict)
    lowered: Any = None
    weights: list[StoredWeight] = field(default_factory=list)  # how each weight was stored


def _atomic_directory(out_dir: str) -> str:
    return scratch_directory(out_dir)  # named for this process: the next export removes a killed one's


def _warn_nonfinite_params(model: Model) -> None:
    """Warn naming the checkpoint tensors (or param paths of a random model) that hold NaN or inf."""
    leaves, _ = pytree.flatten(model.params)
    weight_map = model.arch.weights(model.cfg)
    named: dict[str, np.ndarray] = {}
    for path, array in zip(pytree.leaf_paths(model.params), leaves):
        named.setdefault(weight_map[path].name if path in weight_map else path, np.asarray(array))
    warn_nonfinite_weights(named, stacklevel=3)


def export_model(model: Model, out_dir: str, *, ctx_len: int = 128, prefill_seq_len: int = 32, batch_size: int = 1,
                 full_batch_size: int | None = None, kv_cache_batch_size: int | None = None,
                 dtype: str = "float32", weights: str = "copy",
                 layer_functions: bool = True, kv_blocks: int = 0, head_block_size: int = 0, q_blocks: int = 0,
                 skip_kv: bool = False, compile_options: CompileOptions = CompileOptions(),
                 progress: Callable[[str], None] | None = None,
                 bytes_progress: Callable[[int, int], None] | None = None,
                 serving: ServingOptions = ServingOptions(), copy_files: Sequence[str] = ()) -> ExportReport:
    """Lower the model and write model.onnx (+ external data), specializations.json, custom_io.yaml and
    compile.sh (and mdp_ts_<n>.json for several devices) into out_dir, plus a copy of each of
    `copy_files` (the checkpoint's tokenizer files). Everything is written in a scratch directory
    first: a failure leaves out_dir as it was. progress(stage) names each stage; bytes_progress(done,
    total) follows the weights. kv_blocks > 0: blocked attention, the cache read in that many blocks
    (long contexts), optionally head_block_size KV heads and one of q_blocks blocks of query rows at a time,
    and with skip_kv a predicate per block that lets the accelerator skip blocks past every position. `serving` adds serving modes (CCL, a speculative-decoding target,
    prefill-only/decode-only, on-device sampling). kv_cache_batch_size > full_batch_size: prefix
    caching (more cache slots than decode lanes; the graph is the continuous-batching one).

    dtype "float16" lowers the model to float16; otherwise the model keeps its params' dtype (float32,
    or bfloat16 for `compile_options.hw_version` "ai200", which has it)."""
    if weights not in ("copy", "reference"):
        raise CheckpointError(f"--weights must be copy or reference, got {weights!r}")
    check_export_options(ctx_len, prefill_seq_len, batch_size, full_batch_size, compile_options)
    if kv_cache_batch_size is not None and (full_batch_size is None or kv_cache_batch_size < full_batch_size):
        raise CheckpointError(f"--kv-cache-batch-size {kv_cache_batch_size} needs --full-batch-size at most as large "
                              f"(got {full_batch_size}): it counts cache slots, full_batch_size the decode lanes")
    model_dtype = "float16" if dtype == "float16" else model.dtype.name
    check_target(compile_options.hw_version, model_dtype)
    serving.validate(ctx_len=ctx_len, prefill_seq_len=prefill_seq_len)
    spec_args = serving.specialization_args(ctx_len=ctx_len, prefill_seq_len=prefill_seq_len)
    say = progress or (lambda _: None)
    stages: dict[str, float] = {}
    start = time.perf_counter()
    say("tracing and lowering")
    # The cache has the weights' dtype (float16 weights, as `qtrace export --dtype float16` loads them,
    # make float16 keys and values); lowering to float16 converts whatever is still float32.
    fn, args = model.signature(full_batch_size="full_batch_size" if full_batch_size else None, ctx_len="ctx_len",
                               layer_functions=layer_functions, max_ctx_len=ctx_len, kv_blocks=kv_blocks,
                               head_block_size=head_block_size, q_blocks=q_blocks, skip_kv=skip_kv,
                               options=serving.step_options(model.cfg.vocab_size))
    lowered = qtrace.lower(fn, args, dtype=np.float16 if dtype == "float16" else None)
    stages["lower"] = time.perf_counter() - start
    scratch = _atomic_directory(out_dir)
    try:
        start = time.perf_counter()
        say("writing model.onnx")
        model_path = os.path.join(scratch, "model.onnx")
        stored: list[StoredWeight] = []
        lowered.save(model_path, external_data=True, reference_weights=(weights == "reference"),
                     progress=bytes_progress, on_weight=stored.append)
        stages["save"] = time.perf_counter() - start
        if weights == "copy":  # the weights were just read: naming NaN/inf ones costs one more pass in memory
            _warn_nonfinite_params(model)
        with open(os.path.join(scratch, "specializations.json"), "w") as f:
            json.dump(specializations(ctx_len, prefill_seq_len, batch_size, full_batch_size, **spec_args,
                                      extra_symbols=model.cache_sizes(ctx_len, prefill_seq_len),
                                      kv_cache_batch_size=kv_cache_batch_size), f, indent=2)
        if compile_options.num_devices > 1:
            with open(os.path.join(scratch, mdp_config_name(compile_options.num_devices)), "w") as f:
                json.dump(mdp_partition_config(compile_options.num_devices, compile_options.num_cores), f, indent=2)
        with open(os.path.join(scratch, "custom_io.yaml"), "w") as f:
            f.write(custom_io_yaml(kv_state_names(model.cfg.num_hidden_layers),
                                   kv_precision(compile_options, model_dtype)))
        with open(os.path.join(scratch, "compile.sh"), "w") as f:
            f.write(compile_script(compile_options, sub_functions=bool(lowered.graph.functions),
                                   model_dtype=model_dtype))
        os.chmod(os.path.join(scratch, "compile.sh"), 0o755)
        for source in copy_files:
            shutil.copyfile(source, os.path.join(scratch, os.path.basename(source)))
        os.makedirs(out_dir, exist_ok=True)
        files = []
        for name in sorted(os.listdir(scratch)):
            target = os.path.join(out_dir, name)
            os.replace(os.path.join(scratch, name), target)
            files.append(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportReport(files, stages, lowered, stored)


def check_target(hw_version: str, model_dtype: str) -> None:
    """A model dtype the target hardware runs: Cloud AI 100 (ai100) has no bfloat16, an ai200 has."""
    if hw_version not in HW_VERSIONS:
        raise CheckpointError(f"--hw must be one of {', '.join(HW_VERSIONS)}, got {hw_version!r}")
    if model_dtype == "bfloat16" and hw_version != "ai200":
        raise CheckpointError(f"a bfloat16 model needs --hw ai200: {hw_version} has no bfloat16; export it as "
                              "--dtype float32 or float16 for ai100")


__all__ = ["CheckpointError", "ConfigError", "ExportReport", "checkpoint_tensors", "export_model", "load_checkpoint",
           "random_model", "read_checkpoint_config", "read_checkpoint_index", "read_safetensors", "save_checkpoint",
           "write_safetensors"]
