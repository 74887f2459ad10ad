"""Real checkpoints (examples/checkpoint.py, `qtrace export --hw`): bfloat16 weights streamed into float32
or float16 exports bit-identical to numpy's conversion, `--weights reference` saying what it had to
convert, sharded checkpoints read through model.safetensors.index.json (errors naming the index or the
shard file), and ai200 exports that keep bfloat16 end to end with the compiler flags QEfficient uses.

Truths: numpy's conversions (ml_dtypes for bfloat16), byte-for-byte comparison with the unsharded
export, onnx's checker, onnxruntime (an ai200 model runs there once its bfloat16 is retyped to float32:
onnxruntime's CPU provider has no bfloat16 MatMul), and the file formats of docs/architecture.md,
"Cloud AI 100 conventions".
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qtrace import NonFiniteWeightsWarning, cli
from qtrace.dtypes import bfloat16, result_type
from qtrace.examples.checkpoint import (CheckpointError, export_model, load_checkpoint, read_checkpoint_index,
                                        read_safetensors, write_safetensors)
from qtrace.examples.generation import cache_layout, generate, onnx_step
from qtrace.weights import ConvertedWeight

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LLAMA = os.path.join(FIXTURES, "llama")
CTX_LEN, PREFILL_LEN = 32, 8
PROMPTS = [[5, 9, 2], [2, 71, 82, 81, 82, 84, 59, 4, 52, 35, 36, 28, 1, 17, 42, 99, 7, 3, 120]]
F16_MAX = 65504.0


def fixture_tensors() -> dict[str, np.ndarray]:
    return {name: np.array(array) for name, array in read_safetensors(os.path.join(LLAMA, "model.safetensors")).items()}


def write_checkpoint(directory: str, tensors: dict[str, np.ndarray]) -> str:
    os.makedirs(directory, exist_ok=True)
    shutil.copyfile(os.path.join(LLAMA, "config.json"), os.path.join(directory, "config.json"))
    write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
    return directory


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory: Any) -> str:
    """The llama fixture in bfloat16."""
    tensors = {name: array.astype(bfloat16) for name, array in fixture_tensors().items()}
    return write_checkpoint(str(tmp_path_factory.mktemp("bf16")), tensors)


@pytest.fixture(scope="module")
def spiky_tensors() -> dict[str, np.ndarray]:
    """The llama fixture in bfloat16, with values past float16's range and infinities in one weight."""
    tensors = {name: array.astype(bfloat16) for name, array in fixture_tensors().items()}
    spiky = tensors["model.layers.1.mlp.up_proj.weight"].copy()
    spiky.reshape(-1)[:6] = np.array([1e5, -1e5, 3e38, 65504, 65536, -np.inf], np.float32).astype(bfloat16)
    tensors["model.layers.1.mlp.up_proj.weight"] = spiky
    return tensors


@pytest.fixture(scope="module")
def spiky_checkpoint(spiky_tensors: dict[str, np.ndarray], tmp_path_factory: Any) -> str:
    return write_checkpoint(str(tmp_path_factory.mktemp("spiky")), spiky_tensors)


def copied_without_links(model_dir: str, target: str) -> str:
    """The export copied file by file: onnx refuses external data in a file with several hard links
    (a reference export links the checkpoint), onnxruntime does not."""
    shutil.copytree(model_dir, target)
    return target


def saved_weights(model_dir: str) -> dict[str, np.ndarray]:
    model = onnx.load(os.path.join(model_dir, "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")


def numpy_float16(x: np.ndarray) -> np.ndarray:
    x32 = np.asarray(x, np.float32)
    return np.where(np.isfinite(x32), np.clip(x32, -F16_MAX, F16_MAX), x32).astype(np.float16)


def run_cli(capsys: Any, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def export_args(checkpoint: str, out: str, *flags: str) -> list[str]:
    return ["export", checkpoint, "-o", out, "--ctx-len", str(CTX_LEN), "--prefill-seq-len", str(PREFILL_LEN), *flags]


def greedy(session: Any, full_batch_size: int | None = None) -> list[list[int]]:
    return generate(onnx_step(session), PROMPTS, 6, prefill_len=PREFILL_LEN, ctx_len=CTX_LEN,
                    layout=cache_layout(session), full_batch_size=full_batch_size)


def session_of(model: Any) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.path.join(model, "model.onnx")
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# -- bfloat16 checkpoints on ai100 ---------------------------------------------------------------------


def test_loading_bf16_for_float32_defers_every_conversion(bf16_checkpoint: str) -> None:
    model = load_checkpoint(bf16_checkpoint, dtype=np.float32)
    weights = [model.params["embed_tokens"], *model.params["layers"][0].values()]
    assert all(isinstance(w, ConvertedWeight) and w.dtype == np.float32 and w.source_dtype == bfloat16
               for w in weights)
    assert model.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_bf16_export_holds_numpys_conversion_bit_for_bit(dtype: str, spiky_checkpoint: str,
                                                         spiky_tensors: dict[str, np.ndarray], tmp_path: Any,
                                                         capsys: Any) -> None:
    # the spiky tensor holds an infinity on purpose: the export warns and still writes it as it is
    with pytest.warns(NonFiniteWeightsWarning, match="model.layers.1.mlp.up_proj.weight"):
        code, out, err = run_cli(capsys, *export_args(spiky_checkpoint, str(tmp_path), "--dtype", dtype))
    assert code == 0, err
    assert re.search(r"weights: \d+ written \(.*\), \d+ of them converted bfloat16 -> " + dtype, out)
    saved = saved_weights(str(tmp_path))
    model = load_checkpoint(spiky_checkpoint)
    names = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight",
             "layers.1.up_proj": "model.layers.1.mlp.up_proj.weight",
             "layers.0.q_proj": "model.layers.0.self_attn.q_proj.weight", "norm": "model.norm.weight"}
    for initializer, tensor in names.items():
        source = spiky_tensors[tensor]
        expected = source.astype(np.float32) if dtype == "float32" else numpy_float16(source)
        assert saved[initializer].dtype == expected.dtype
        np.testing.assert_array_equal(bits(saved[initializer]), bits(expected), err_msg=initializer)
    assert model.params["layers"][1]["up_proj"].shape == saved["layers.1.up_proj"].shape


def test_bf16_float32_export_generates_the_eager_models_tokens(bf16_checkpoint: str, tmp_path: Any) -> None:
    from qtrace.examples.generation import eager_step, model_cache_layout

    model = load_checkpoint(bf16_checkpoint, dtype=np.float32)
    export_model(model, str(tmp_path), ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN)
    fn, _ = model.signature()
    eager = generate(eager_step(fn), PROMPTS, 6, prefill_len=PREFILL_LEN, ctx_len=CTX_LEN,
                     layout=model_cache_layout(model))
    assert greedy(session_of(str(tmp_path))) == eager


def test_reference_mode_on_ai100_says_which_weights_it_converted(bf16_checkpoint: str, tmp_path: Any,
                                                                 capsys: Any) -> None:
    code, out, err = run_cli(capsys, *export_args(bf16_checkpoint, str(tmp_path), "--weights", "reference"))
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("weights:"))
    converted = int(re.search(r"; (\d+) had to be converted \(bfloat16 -> float32\)", line).group(1))
    assert converted == 16  # every checkpoint tensor of 1 KiB or more: embed, lm_head, 2 x 7 linears
    assert "embed_tokens, layers.{0..1}.q_proj" in line and "lm_head" in line
    written = float(re.search(r"and were written \(([\d.]+) GiB\)", line).group(1))
    data_bytes = os.path.getsize(tmp_path / "model.onnx.data")
    assert abs(written * 2**30 - data_bytes) < 0.01 * 2**30
    assert "0 referenced in the checkpoint" in line


# -- ai200 keeps bfloat16 --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ai200_export(bf16_checkpoint: str, tmp_path_factory: Any) -> str:
    out = str(tmp_path_factory.mktemp("ai200"))
    assert cli.main(export_args(bf16_checkpoint, out, "--hw", "ai200", "--weights", "reference")) == 0
    return out


def test_ai200_export_is_bfloat16_end_to_end(ai200_export: str) -> None:
    model = onnx.load(os.path.join(ai200_export, "model.onnx"), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    io = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert {name: t for name, t in io.items() if t in floats} == \
        {name: onnx.TensorProto.BFLOAT16 for name in io if "ids" not in name}
    assert {t.data_type for t in model.graph.initializer if t.data_type in floats} == {onnx.TensorProto.BFLOAT16}


def test_ai200_reference_export_says_nothing_was_converted(bf16_checkpoint: str, tmp_path: Any, capsys: Any) -> None:
    code, out, err = run_cli(capsys, *export_args(bf16_checkpoint, str(tmp_path), "--hw", "ai200", "--weights",
                                                  "reference"))
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("weights:"))
    assert line.startswith("weights: 16 referenced in the checkpoint (zero-copy") and "none had to be converted" in line


def test_ai200_reference_export_is_zero_copy(ai200_export: str, bf16_checkpoint: str) -> None:
    model = onnx.load(os.path.join(ai200_export, "model.onnx"), load_external_data=False)
    checkpoint_file = os.path.join(bf16_checkpoint, "model.safetensors")
    big = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
           and int({e.key: e.value for e in t.external_data}["length"]) >= 4096]
    locations = {os.path.join(ai200_export, {e.key: e.value for e in t.external_data}["location"]) for t in big}
    assert len(big) >= 16 and all(os.path.samefile(location, checkpoint_file) for location in locations)
    assert os.path.getsize(os.path.join(ai200_export, "model.onnx.data")) < 16 << 10  # RoPE tables only


def test_ai200_export_passes_onnx_full_check(ai200_export: str, tmp_path: Any) -> None:
    copy = copied_without_links(ai200_export, str(tmp_path / "copy"))
    onnx.checker.check_model(os.path.join(copy, "model.onnx"), full_check=True)


def test_ai200_compile_flags_keep_bfloat16(ai200_export: str) -> None:
    with open(os.path.join(ai200_export, "compile.sh")) as f:
        command = f.read().splitlines()[-1]
    assert command.startswith("qaic-compile -aic-hw -aic-hw-version=ai200 -m=model.onnx -retained-state ")
    assert "-convert-to-fp16" not in command
    assert "-custom-IO-list-file" not in command  # QEfficient leaves it out when model and cache are bfloat16
    with open(os.path.join(ai200_export, "custom_io.yaml")) as f:
        precisions = re.findall(r"Precision: (\S+)", f.read())
    assert len(precisions) == 8 and set(precisions) == {"bfloat16"}


def test_ai200_with_mxint8_cache_passes_the_custom_io_file(bf16_checkpoint: str, tmp_path: Any) -> None:
    assert cli.main(export_args(bf16_checkpoint, str(tmp_path), "--hw", "ai200", "--kv-cache-precision", "mxint8")) == 0
    command = (tmp_path / "compile.sh").read_text().splitlines()[-1]
    assert "-custom-IO-list-file=custom_io.yaml" in command and "-convert-to-fp16" not in command
    assert set(re.findall(r"Precision: (\S+)", (tmp_path / "custom_io.yaml").read_text())) == {"mxint8"}


def retyped_to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every bfloat16 tensor, value and cast made float32 (exact for the data)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT

    def tensor(t: onnx.TensorProto) -> None:
        if t.data_type == bf16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))

    def nodes(node_list: Any) -> None:
        for node in node_list:
            for attribute in node.attribute:
                if attribute.name in ("to", "dtype") and attribute.i == bf16:
                    attribute.i = f32
                if attribute.HasField("t"):
                    tensor(attribute.t)

    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = f32
    for t in model.graph.initializer:
        tensor(t)
    nodes(model.graph.node)
    for function in model.functions:
        nodes(function.node)
    return model


def test_ai200_graph_computes_the_float32_exports_function(ai200_export: str, bf16_checkpoint: str,
                                                           tmp_path: Any) -> None:
    """onnxruntime cannot run bfloat16 MatMul on CPU: run the ai200 graph with its bfloat16 retyped to
    float32 and compare with the ai100 float32 export of the same checkpoint. The weights are equal
    (bfloat16 -> float32 is exact); only the RoPE tables differ, rounded to bfloat16."""
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        session_of(ai200_export)
    copy = copied_without_links(ai200_export, str(tmp_path / "copy"))
    retyped = session_of(retyped_to_float32(onnx.load(os.path.join(copy, "model.onnx"))))
    export_model(load_checkpoint(bf16_checkpoint), str(tmp_path / "f32"), ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN)
    float32 = session_of(str(tmp_path / "f32"))
    ids = np.array([PROMPTS[1][:PREFILL_LEN]]); positions = np.arange(PREFILL_LEN)[None]
    cache = {name: np.zeros((1, 2, CTX_LEN, 16), np.float32) for name in cache_layout(float32)}
    logits = [onnx_step(s)(ids, positions, cache)[0] for s in (retyped, float32)]
    assert np.max(np.abs(logits[0] - logits[1])) < 0.01 * np.max(np.abs(logits[1]))  # measured: 0.07 %
    assert greedy(retyped) == greedy(float32)


def test_generate_on_an_ai200_export_says_onnxruntime_cannot_run_it(ai200_export: str, capsys: Any) -> None:
    code, out, err = run_cli(capsys, "generate", ai200_export, "--prompt-ids", "1,2,3")
    assert code == 2 and "--hw ai100" in err and "bfloat16" in err


def test_bfloat16_with_a_python_scalar_stays_bfloat16() -> None:
    assert result_type(bfloat16, 0.5) == bfloat16 and result_type(bfloat16, 3) == bfloat16
    assert result_type(bfloat16, np.dtype(np.float32), 0.5) == np.float32


@pytest.mark.parametrize("flags, message", [
    (["--dtype", "bfloat16"], "--dtype bfloat16 needs --hw ai200"),
    (["--kv-cache-precision", "bfloat16"], "--kv-cache-precision bfloat16 needs --hw ai200"),
])
def test_bfloat16_on_ai100_is_refused_before_any_work(flags: list[str], message: str, bf16_checkpoint: str, tmp_path: Any,
                                                      capsys: Any) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *export_args(bf16_checkpoint, str(out), *flags))
    assert code == 2 and message in err and not out.exists()


def test_bfloat16_model_for_ai100_is_refused_by_export_model(bf16_checkpoint: str, tmp_path: Any) -> None:
    with pytest.raises(CheckpointError, match="needs --hw ai200"):
        export_model(load_checkpoint(bf16_checkpoint, dtype=None), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -- sharded checkpoints -------------------------------------------------------------------------------


def write_sharded(directory: str, tensors: dict[str, np.ndarray], shards: int = 3) -> dict[str, str]:
    """HF's layout: model-0000i-of-0000n.safetensors and an index mapping every tensor to its shard."""
    os.makedirs(directory, exist_ok=True)
    shutil.copyfile(os.path.join(LLAMA, "config.json"), os.path.join(directory, "config.json"))
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::shards]}
        write_safetensors(os.path.join(directory, shard), part)
        weight_map.update(dict.fromkeys(part, shard))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}, f)
    return weight_map


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: Any) -> str:
    directory = str(tmp_path_factory.mktemp("sharded"))
    write_sharded(directory, fixture_tensors())
    return directory


def test_index_maps_each_tensor_to_its_shard(sharded: str) -> None:
    index = read_checkpoint_index(sharded)
    assert index is not None and len(set(index.values())) == 3
    for name, shard in index.items():
        assert name in read_safetensors(os.path.join(sharded, shard))


@pytest.mark.parametrize("weights", ["copy", "reference"])
def test_sharded_checkpoint_exports_the_same_model(weights: str, sharded: str, tmp_path: Any) -> None:
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    export_model(load_checkpoint(LLAMA), one, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN)
    export_model(load_checkpoint(sharded), many, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN, weights=weights)
    if weights == "copy":
        for name in ("model.onnx", "model.onnx.data"):
            with open(os.path.join(one, name), "rb") as a, open(os.path.join(many, name), "rb") as b:
                assert a.read() == b.read(), name
    else:
        locations = {e.value for t in onnx.load(os.path.join(many, "model.onnx"), load_external_data=False)
                     .graph.initializer for e in t.external_data if e.key == "location"}
        assert {f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)} <= locations
    assert greedy(session_of(many)) == greedy(session_of(one))


def test_unlisted_safetensors_files_are_ignored_when_there_is_an_index(sharded: str, tmp_path: Any) -> None:
    directory = str(tmp_path / "ckpt")
    shutil.copytree(sharded, directory)
    with open(os.path.join(directory, "stray.safetensors"), "wb") as f:
        f.write(b"not a safetensors file")
    assert load_checkpoint(directory).cfg.num_hidden_layers == 2


def _index(directory: str) -> str:
    return os.path.join(directory, "model.safetensors.index.json")


def _edit_index(directory: str, change: Any) -> None:
    with open(_index(directory)) as f:
        index = json.load(f)
    change(index)
    with open(_index(directory), "w") as f:
        json.dump(index, f)


def _write_index(directory: str, text: str) -> None:
    with open(_index(directory), "w") as f:
        f.write(text)


def _first_shard(directory: str) -> str:
    return os.path.join(directory, "model-00001-of-00003.safetensors")


SHARD_CORRUPTIONS = {
    "index_not_json": (lambda d: _write_index(d, "{\"weight_map\": {"), _index, "not valid JSON"),
    "index_without_weight_map": (lambda d: _write_index(d, "{\"metadata\": {}}"), _index, "weight_map"),
    "index_not_an_object": (lambda d: _write_index(d, "[1, 2]"), _index, "weight_map"),
    "shard_outside_directory": (lambda d: _edit_index(d, lambda i: i["weight_map"].update(
        {"model.norm.weight": "../model.safetensors"})), _index, "not the name of a *.safetensors file"),
    "tensor_not_in_index": (lambda d: _edit_index(d, lambda i: i["weight_map"].pop("model.norm.weight")), _index,
                            "tensor model.norm.weight is missing"),
    "missing_shard": (lambda d: os.unlink(_first_shard(d)), _first_shard, "shard file is missing"),
    "tensor_not_in_its_shard": (lambda d: _edit_index(d, lambda i: i["weight_map"].update(
        {"model.norm.weight": "model-00001-of-00003.safetensors"})), _first_shard,
        "tensor model.norm.weight is missing (model.safetensors.index.json puts it in this shard)"),
    "corrupt_shard": (lambda d: open(_first_shard(d), "wb").write(b"\xff" * 4), _first_shard,
                      "not a readable safetensors file"),
}


@pytest.mark.parametrize("corruption", list(SHARD_CORRUPTIONS))
def test_corrupt_sharded_checkpoint_fails_naming_the_file(corruption: str, sharded: str, tmp_path: Any,
                                                          capsys: Any) -> None:
    directory = str(tmp_path / "ckpt")
    shutil.copytree(sharded, directory)
    if corruption == "tensor_not_in_its_shard":  # the shard must really lack it
        assert "model.norm.weight" not in read_safetensors(_first_shard(directory))
    damage, named_file, message = SHARD_CORRUPTIONS[corruption]
    damage(directory)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(directory)
    assert str(error.value).startswith(named_file(directory) + ":")
    assert message in str(error.value)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *export_args(directory, str(out)))
    assert code == 2 and named_file(directory) in err and not out.exists()


def test_ai200_continuous_batching_export_passes_onnx_full_check(bf16_checkpoint: str, tmp_path: Any) -> None:
    """Every custom-op body accepts a bfloat16 cache (ONNX's Compress, for one, has no bfloat16)."""
    out = str(tmp_path / "out")
    assert cli.main(export_args(bf16_checkpoint, out, "--hw", "ai200", "--full-batch-size", "2")) == 0
    onnx.checker.check_model(os.path.join(out, "model.onnx"), full_check=True)
    used = {n.op_type for f in onnx.load(os.path.join(out, "model.onnx"), load_external_data=False).functions
            for n in f.node if n.domain == "com.qualcomm.cloud"}
    assert {"CtxScatterCB", "CtxGatherCB"} <= used


def bf16_copy(family: str, directory: str) -> str:
    """A fixture checkpoint with its float tensors in bfloat16."""
    source = os.path.join(FIXTURES, family)
    os.makedirs(directory)
    shutil.copyfile(os.path.join(source, "config.json"), os.path.join(directory, "config.json"))
    tensors = {name: np.array(a) for name, a in read_safetensors(os.path.join(source, "model.safetensors")).items()}
    write_safetensors(os.path.join(directory, "model.safetensors"),
                      {name: a.astype(bfloat16) if a.dtype.kind == "f" else a for name, a in tensors.items()})
    return directory


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "gpt2", "gemma2"])
def test_ai200_export_of_each_kind_of_family_passes_onnx_full_check(family: str, tmp_path: Any) -> None:
    """Every operator of a bfloat16 graph accepts bfloat16 (ONNX's TopK, for one, does not before
    opset 24: the router's selection runs in float32)."""
    out = str(tmp_path / "out")
    assert cli.main(export_args(bf16_copy(family, str(tmp_path / "ckpt")), out, "--hw", "ai200")) == 0
    onnx.checker.check_model(os.path.join(out, "model.onnx"), full_check=True)


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, list):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


@pytest.mark.parametrize("family", ["mixtral", "phi3", "gemma", "gpt2"])
def test_bf16_checkpoint_of_each_weight_layout_streams_and_generates_the_eager_tokens(family: str,
                                                                                     tmp_path: Any) -> None:
    """Per-expert lists (Mixtral), fused row blocks (Phi-3), norms offset at load (Gemma) and
    [in, out] kernels (GPT-2): a bfloat16 checkpoint loads with every large weight still to convert
    (no expert stack made in memory) and its float32 export generates the eager model's tokens."""
    from qtrace.examples.generation import eager_step, model_cache_layout

    model = load_checkpoint(bf16_copy(family, str(tmp_path / "ckpt")))
    large = [leaf for leaf in _leaves(model.params) if getattr(leaf, "nbytes", 0) >= 4096]
    assert large and all(isinstance(leaf, ConvertedWeight) for leaf in large)
    export_model(model, str(tmp_path / "out"), ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN)
    fn, _ = model.signature()
    prompts = [[p % model.cfg.vocab_size for p in prompt] for prompt in PROMPTS]
    eager = generate(eager_step(fn), prompts, 4, prefill_len=PREFILL_LEN, ctx_len=CTX_LEN,
                     layout=model_cache_layout(model))
    session = session_of(str(tmp_path / "out"))
    assert generate(onnx_step(session), prompts, 4, prefill_len=PREFILL_LEN, ctx_len=CTX_LEN,
                    layout=cache_layout(session)) == eager
