"""Serving modes in the compiler's side files, against the facts recorded from QEfficient's own
exports in ../shared/qeff-interface.md (§1 CCL, §2 speculative decoding, §3 prefill-only/decode-only,
§12 multi-device): specializations entries, their symbols and order, CCL list rules, the partition
config and the compile command."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from qtrace.examples.checkpoint import export_model, load_checkpoint
from qtrace.examples.serving import ServingError, ServingOptions
from qtrace.lowering.side_files import (CompileOptions, SpecializationError, automatic_ccl_lists, ccl_lists,
                                        compile_command, mdp_partition_config, specializations)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def entries(spec: dict) -> list[tuple[str, dict[str, str]]]:
    return [(e["name"], e["symbols"]) for e in spec["specializations"]]


def sym(**values: Any) -> dict[str, str]:
    return {k: str(v) for k, v in values.items()}


# -- CCL (§1) ------------------------------------------------------------------------------------------------


def test_ccl_example_of_the_interface_document() -> None:
    """ctx_len 4096, prefill [1024, 2048], decode [2048, 4096]: Prefill_0 1024, Prefill_1 2016,
    Prefill_2 4064, Decode_0 2048, Decode_1 4096 (QEfficient's run)."""
    prefill, decode = ccl_lists([1024, 2048], [2048, 4096], 4096, 32)
    assert (prefill, decode) == ([1024, 2016, 4064], [2048, 4096])
    spec = specializations(4096, 32, 1, None, comp_ctx_lengths_prefill=prefill, comp_ctx_lengths_decode=decode)
    base = dict(batch_size=1, ctx_len=4096)
    assert entries(spec) == [("Prefill_0", sym(**base, seq_len=32, comp_ctx_lengths=1024)),
                             ("Prefill_1", sym(**base, seq_len=32, comp_ctx_lengths=2016)),
                             ("Prefill_2", sym(**base, seq_len=32, comp_ctx_lengths=4064)),
                             ("Decode_0", sym(**base, seq_len=1, comp_ctx_lengths=2048)),
                             ("Decode_1", sym(**base, seq_len=1, comp_ctx_lengths=4096))]


def test_automatic_ccl_lists_as_qefficient_makes_them() -> None:
    assert automatic_ccl_lists(32768, 128) == ([4000, 8000, 16000, 32768], [4096, 8192, 16384, 32768])
    assert ccl_lists(None, None, 32768, 128) == ([4000, 8000, 16000, 32736], [4096, 8192, 16384, 32768])
    assert automatic_ccl_lists(4096, 128) == ([4096], [4096])  # up to 4096: one bucket
    # 40960 rounds to itself (a multiple of 1024, not a power of two): prefill ends at floor-1000, then ctx
    assert automatic_ccl_lists(40960, 128) == ([8000, 16000, 32000, 40960], [8192, 16384, 32768, 40960])
    assert automatic_ccl_lists(131072, 1)[0] == [4096, 8192, 16384, 32768, 65536, 131072]  # 10 shared values at most


def test_ccl_list_rules() -> None:
    assert ccl_lists([300, 100, 300], None, 512, 32) == ([100, 300, 480], [512])  # sorted, unique, ctx appended
    assert ccl_lists([64, 100], [64], 512, 32, phases="prefill") == ([64, 100, 512], [64, 512])  # no de-dup
    assert ccl_lists([64, 128], [96], 512, 1) == ([64, 96, 128, 512], [64, 96, 128, 512])  # seq_len 1: union
    assert ccl_lists([32, 64], [64], 64, 8) == ([32], [64])  # 64 -> 32 -> 0: dropped, not a 0 bucket
    with pytest.raises(SpecializationError, match=r"--comp-ctx-lengths-decode 16,300: 300 .* ctx_len 256"):
        ccl_lists(None, [16, 300], 256, 32)


# -- speculative decoding (§2) ----------------------------------------------------------------------------


def test_speculative_target_specializations_of_the_interface_document() -> None:
    """prefill_seq_len 32, ctx_len 128, full_batch_size 4, num_speculative_tokens [0, 3]."""
    spec = specializations(128, 32, 1, 4, num_speculative_tokens=[3, 0])
    assert entries(spec) == [
        ("Prefill", sym(batch_size=1, ctx_len=128, seq_len=32, num_logits_to_keep=1, full_batch_size=4,
                        full_batch_exec_size=1)),
        ("Decode_0", sym(batch_size=4, ctx_len=128, seq_len=1, num_logits_to_keep=1, full_batch_size=4)),
        ("Decode_1", sym(batch_size=4, ctx_len=128, seq_len=4, num_logits_to_keep=4, full_batch_size=4))]


def test_speculative_target_with_ccl_has_an_entry_per_k_and_bucket() -> None:
    """QEfficient refuses CCL with several K; qtrace compiles each (K, bucket) pair, K major."""
    spec = specializations(64, 8, 1, None, comp_ctx_lengths_prefill=[32], comp_ctx_lengths_decode=[24, 64],
                           num_speculative_tokens=[0, 3])
    assert [(n, s["seq_len"], s.get("comp_ctx_lengths"), s["num_logits_to_keep"]) for n, s in entries(spec)] == [
        ("Prefill", "8", "32", "1"), ("Decode_0", "1", "24", "1"), ("Decode_1", "1", "64", "1"),
        ("Decode_2", "4", "24", "4"), ("Decode_3", "4", "64", "4")]


# -- prefill-only / decode-only (§3) ------------------------------------------------------------------------


@pytest.mark.parametrize("cb", [None, 4])
def test_prefill_only_and_decode_only_specializations(cb: int | None) -> None:
    prefill = entries(specializations(128, 32, 1, cb, phases="prefill"))
    decode = entries(specializations(128, 32, 1, cb, phases="decode"))
    both = entries(specializations(128, 32, 1, cb))
    assert prefill == both[:1] and decode == both[1:]
    assert [n for n, _ in prefill] == ["Prefill"] and [n for n, _ in decode] == ["Decode"]


def test_prefill_seq_len_1_is_one_entry_named_prefill() -> None:
    """QEfficient's naming quirk: a decode-only graph made with prefill_seq_len 1 is labelled Prefill."""
    assert entries(specializations(128, 1, 1, None)) == [("Prefill", sym(batch_size=1, ctx_len=128, seq_len=1))]
    assert entries(specializations(128, 1, 1, 4)) == [
        ("Prefill", sym(batch_size=4, ctx_len=128, seq_len=1, full_batch_size=4, full_batch_exec_size=4))]


def test_extra_symbols_reach_every_entry() -> None:
    spec = specializations(128, 32, 1, None, extra_symbols={"sliding_window": 48})
    assert all(s["sliding_window"] == "48" for _, s in entries(spec))


# -- multi-device (§12) ------------------------------------------------------------------------------------


def test_partition_config_and_compile_flag_for_several_devices() -> None:
    assert mdp_partition_config(2, 16) == {
        "connections": [{"devices": [0, 1], "type": "p2p"}],
        "partitions": [{"name": "Partition0", "devices": [{"deviceId": 0, "numCores": 16},
                                                          {"deviceId": 1, "numCores": 16}]}]}
    one = compile_command("m.onnx", "s.json", "c.yaml", "qpc", CompileOptions())
    four = compile_command("m.onnx", "s.json", "c.yaml", "qpc", CompileOptions(num_cores=14, num_devices=4))
    assert "mdp" not in one
    assert four.endswith("-aic-binary-dir=qpc -mdp-load-partition-config=mdp_ts_4.json")


def test_export_writes_every_side_file_of_a_serving_mode(tmp_path: Any) -> None:
    model = load_checkpoint(os.path.join(FIXTURES, "gemma2"))
    serving = ServingOptions(comp_ctx_lengths_prefill=(16,), comp_ctx_lengths_decode=(24,), num_speculative_tokens=(3,))
    export_model(model, str(tmp_path), ctx_len=64, prefill_seq_len=8, serving=serving,
                 compile_options=CompileOptions(num_devices=2, num_cores=8))
    with open(tmp_path / "specializations.json") as f:
        written = json.load(f)
    assert [e["name"] for e in written["specializations"]] == ["Prefill_0", "Prefill_1", "Decode_0", "Decode_1"]
    with open(tmp_path / "mdp_ts_2.json") as f:
        assert json.load(f) == mdp_partition_config(2, 8)
    script = (tmp_path / "compile.sh").read_text()
    assert "-mdp-load-partition-config=mdp_ts_2.json" in script and "-aic-num-cores=8" in script
    custom_io = (tmp_path / "custom_io.yaml").read_text()
    assert custom_io.count("IOName") == 4 * model.cfg.num_hidden_layers  # only the caches, as without modes


def test_serving_options_refuse_bad_combinations_before_any_work() -> None:
    def bad(match: str, ctx_len: int = 64, prefill_seq_len: int = 8, given: bool = False, **options: Any) -> None:
        with pytest.raises(ServingError, match=match):
            ServingOptions(**options).validate(ctx_len=ctx_len, prefill_seq_len=prefill_seq_len,
                                               prefill_seq_len_given=given)

    bad(r"--comp-ctx-lengths-prefill 16,128: 128 is larger than --ctx-len 64", comp_ctx_lengths_prefill=(16, 128))
    bad(r"--comp-ctx-lengths-decode 0: 0 is not a positive", comp_ctx_lengths_decode=(0,))
    bad(r"K must be >= 1", num_speculative_tokens=(0,))
    bad(r"K must be >= 1", num_speculative_tokens=(-1, 3))
    bad(r"needs --prefill-seq-len >= 5", num_speculative_tokens=(4,), prefill_seq_len=4)
    bad(r"--decode-only .* --prefill-seq-len 8 has no meaning", decode_only=True, given=True)
    bad(r"exclude each other", prefill_only=True, decode_only=True)
    bad(r"decode-only export has no prefill buckets", decode_only=True, comp_ctx_lengths_prefill=(16,))
    bad(r"--sampling with --num-speculative-tokens", sampling=True, num_speculative_tokens=(3,))
    bad(r"--sampling needs --prefill-seq-len > 1", sampling=True, prefill_seq_len=1)
    bad(r"--return-pdfs needs --sampling", return_pdfs=True)
    bad(r"--max-top-k-ids needs --sampling", max_top_k_ids=16)
