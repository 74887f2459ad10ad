"""The on-disk cache of compiled custom-op functions (lowering/custom_ops.py).

A valid cache file is used without compiling anything (so an export never imports onnxscript); a
file built for another key, or damaged in any way, is rebuilt and replaced; the cached functions are
byte for byte what a fresh build produces.
"""

from __future__ import annotations

import os
import subprocess
import sys

import onnx
import pytest

from qtrace.lowering import custom_op_bodies, custom_ops


@pytest.fixture
def builds(monkeypatch):
    """The opsets compiled with onnxscript during the test, in order."""
    compiled = []
    build = custom_op_bodies.build_functions

    def counting_build(opset):
        compiled.append(opset)
        return build(opset)

    monkeypatch.setattr(custom_op_bodies, "build_functions", counting_build)
    return compiled


def library_files(directory):
    folder = os.path.join(directory, "custom_ops")
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def serialized(functions):
    return {name: function.SerializeToString() for name, function in functions.items()}


def test_a_cold_cache_compiles_and_stores_every_function(tmp_path, builds):
    functions = custom_ops.load_functions(17, str(tmp_path))
    assert builds == [17]
    assert functions.keys() == custom_ops.CUSTOM_OP_DOMAINS.keys()
    (name,) = library_files(tmp_path)
    assert name.startswith("opset17-") and name.endswith(".onnx")


def test_a_warm_cache_is_used_without_compiling(tmp_path, builds):
    first = custom_ops.load_functions(18, str(tmp_path))
    second = custom_ops.load_functions(18, str(tmp_path))
    assert builds == [18]
    assert serialized(second) == serialized(first)


@pytest.mark.parametrize("opset", [17, 18, 19, 20, 21])
def test_cached_functions_are_byte_identical_to_a_fresh_build(tmp_path, opset):
    custom_ops.load_functions(opset, str(tmp_path))  # fills the cache
    cached = custom_ops.load_functions(opset, str(tmp_path))
    assert serialized(cached) == serialized(custom_op_bodies.build_functions(opset))


def test_a_new_onnxscript_version_rebuilds(tmp_path, builds, monkeypatch):
    custom_ops.load_functions(17, str(tmp_path))
    monkeypatch.setattr(custom_ops, "_onnxscript_version", lambda: "99.0")
    custom_ops.load_functions(17, str(tmp_path))
    assert builds == [17, 17]
    assert len(library_files(tmp_path)) == 2  # both versions stay usable side by side


def test_edited_bodies_rebuild(tmp_path, builds, monkeypatch):
    custom_ops.load_functions(17, str(tmp_path))
    edited = tmp_path / "custom_op_bodies.py"
    edited.write_bytes(open(custom_ops.BODIES_FILE, "rb").read() + b"\n# an edit\n")
    monkeypatch.setattr(custom_ops, "BODIES_FILE", str(edited))
    custom_ops.load_functions(17, str(tmp_path))
    assert builds == [17, 17]


def test_each_opset_has_its_own_entry(tmp_path, builds):
    custom_ops.load_functions(17, str(tmp_path))
    custom_ops.load_functions(21, str(tmp_path))
    custom_ops.load_functions(17, str(tmp_path))
    assert builds == [17, 21]


def _damage_by_garbage(path):
    with open(path, "wb") as file:
        file.write(b"\x08\x96\x01 not a protobuf \xff\xff")


def _damage_by_truncation(path):
    with open(path, "rb") as file:
        blob = file.read()
    with open(path, "wb") as file:
        file.write(blob[: len(blob) // 2])


def _damage_by_editing_a_body(path):
    library = onnx.load(path)
    library.functions[0].node[0].op_type = "Identity"  # parses, same key, wrong content
    onnx.save(library, path)


def _damage_by_dropping_a_function(path):
    library = onnx.load(path)
    del library.functions[-1]
    onnx.save(library, path)


def _damage_by_swapping_the_key(path):
    library = onnx.load(path)
    onnx.helper.set_model_props(library, {custom_ops._KEY_PROPERTY: "0" * 64,
                                          custom_ops._DIGEST_PROPERTY: custom_ops._payload_digest(
                                              {f.name: f for f in library.functions})})
    onnx.save(library, path)


def _damage_by_emptying(path):
    open(path, "wb").close()


DAMAGES = [_damage_by_garbage, _damage_by_truncation, _damage_by_editing_a_body, _damage_by_dropping_a_function,
           _damage_by_swapping_the_key, _damage_by_emptying]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__.removeprefix("_damage_by_") for d in DAMAGES])
def test_a_damaged_file_is_rebuilt_and_replaced(tmp_path, builds, damage):
    fresh = serialized(custom_ops.load_functions(17, str(tmp_path)))
    (name,) = library_files(tmp_path)
    damage(os.path.join(tmp_path, "custom_ops", name))
    assert serialized(custom_ops.load_functions(17, str(tmp_path))) == fresh
    assert builds == [17, 17]
    assert serialized(custom_ops.load_functions(17, str(tmp_path))) == fresh  # the file was replaced
    assert builds == [17, 17]


def test_an_unusable_cache_directory_only_costs_the_build(tmp_path, builds):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    functions = custom_ops.load_functions(17, str(blocker))
    assert functions.keys() == custom_ops.CUSTOM_OP_DOMAINS.keys()
    assert builds == [17]


def test_without_the_bodies_source_the_functions_are_built_uncached(tmp_path, builds, monkeypatch):
    monkeypatch.setattr(custom_ops, "BODIES_FILE", str(tmp_path / "missing.py"))
    for _ in range(2):
        assert custom_ops.load_functions(17, str(tmp_path)).keys() == custom_ops.CUSTOM_OP_DOMAINS.keys()
    assert builds == [17, 17]
    assert library_files(tmp_path) == []


def test_a_failed_write_leaves_no_file_behind(tmp_path, monkeypatch):
    def failing_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(custom_ops.os, "replace", failing_replace)
    custom_ops.load_functions(17, str(tmp_path))
    assert library_files(tmp_path) == []  # neither the library nor its temporary file


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QTRACE_CACHE_DIR", str(tmp_path / "explicit"))
    assert custom_ops.cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv("QTRACE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert custom_ops.cache_dir() == os.path.join(tmp_path, "xdg", "qtrace")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert custom_ops.cache_dir() == os.path.join(tmp_path, "home", ".cache", "qtrace")


# -- in a fresh process, as an export runs ---------------------------------------------------------------

FETCH_ONE_FUNCTION = (
    "import sys\n"
    "from qtrace.lowering.custom_ops import custom_op_function\n"
    "custom_op_function('CtxScatter')\n"
    "print('onnxscript' in sys.modules)\n"
)


def imports_onnxscript(cache_directory) -> bool:
    env = dict(os.environ, QTRACE_CACHE_DIR=str(cache_directory))
    result = subprocess.run([sys.executable, "-c", FETCH_ONE_FUNCTION], env=env, check=True, capture_output=True,
                            text=True)
    return result.stdout.strip() == "True"


def test_a_fresh_process_imports_onnxscript_only_on_a_cold_cache(tmp_path):
    assert imports_onnxscript(tmp_path)  # cold: compiles, and stores
    assert not imports_onnxscript(tmp_path)  # warm
