"""Prefix caching: more cache slots than decode lanes (`--kv-cache-batch-size S --full-batch-size F`).

The graph is the continuous-batching one; the specializations are QEfficient's (the `full_batch_size`
symbol, the caches' first dim, carries the S slots; decode's batch_size is the F lanes). A finished
sequence's slot keeps its keys and values, and `qtrace generate` gives a new prompt that shares a
prefix with them that slot, prefilling only the rest at its real positions: the tokens equal a full
prefill's. Idle lanes (position -1) write nothing, so the cached prefixes stay intact.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnx
import pytest

from qtrace import cli
from qtrace.examples.checkpoint import CheckpointError, export_model, load_checkpoint
from qtrace.examples.generation import Decoder, Executable
from qtrace.lowering.side_files import specializations

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
CTX_LEN = 48
SHARED = [7, 81, 2, 45, 110, 9, 33, 5, 62, 17, 3, 90]            # 12 tokens: a chunk and a half
FIRST = SHARED + [4, 55, 13]
SECOND = SHARED + [91, 6, 27, 100]
UNRELATED = [19, 84, 6, 33, 71]


def test_specializations_are_qeffs_for_prefix_caching() -> None:
    """qeff-interface.md §5: full_batch_size 2 lanes, kv_cache_batch_size 4 slots."""
    assert specializations(128, 32, 1, 2, kv_cache_batch_size=4) == {"specializations": [
        {"name": "Prefill", "symbols": {"batch_size": "1", "ctx_len": "128", "seq_len": "32", "full_batch_size": "4",
                                        "full_batch_exec_size": "1"}},
        {"name": "Decode", "symbols": {"batch_size": "2", "ctx_len": "128", "seq_len": "1", "full_batch_size": "4"}}]}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: Any) -> dict[str, str]:
    model = load_checkpoint(os.path.join(FIXTURES, "qwen2"))
    out = {}
    for name, slots in (("prefix", 3), ("plain", None)):
        out[name] = str(tmp_path_factory.mktemp(name))
        export_model(model, out[name], ctx_len=CTX_LEN, prefill_seq_len=8, full_batch_size=1 if slots else 3,
                     kv_cache_batch_size=slots)
    return out


def test_the_export_is_the_continuous_batching_graph_over_the_slots(exported: dict[str, str]) -> None:
    model = onnx.load(os.path.join(exported["prefix"], "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["past_key.0"][0] == "full_batch_size" and dims["batch_index"] == ["batch_size", 1]
    with open(os.path.join(exported["prefix"], "specializations.json")) as f:
        entries = {e["name"]: e["symbols"] for e in json.load(f)["specializations"]}
    assert entries["Decode"]["batch_size"] == "1" and entries["Decode"]["full_batch_size"] == "3"


def test_a_shared_prefix_is_prefilled_once_and_gives_a_full_prefills_tokens(exported: dict[str, str]) -> None:
    """One lane, three slots: FIRST fills a slot, UNRELATED takes an empty one, SECOND reuses FIRST's
    slot and prefills only its 4 own tokens; every prompt gets the tokens a full prefill gives it."""
    runs = {}
    for name, model_dir, reuse in (("cached", "prefix", None), ("full", "prefix", False), ("alone", "plain", None)):
        decoder = Decoder(Executable.load(exported[model_dir]), reuse_prefixes=reuse)
        logits: list[np.ndarray] = []
        tokens = decoder.generate([FIRST, UNRELATED, SECOND], 6,
                                  record=lambda kind, out: logits.append(out["logits"][..., -1, :].max(axis=0)))
        runs[name] = (decoder, tokens, logits)
    cached, tokens, logits = runs["cached"]
    assert cached.reuse_prefixes and cached.lanes == 1 and cached.full_batch_size == 3
    assert cached.reused_tokens == len(SHARED)
    assert runs["full"][0].reused_tokens == 0
    for other in ("full", "alone"):
        assert runs[other][1] == tokens
    # SECOND's prefill is one chunk shorter when its prefix is reused: compare its decode steps (the last 5)
    np.testing.assert_allclose(np.stack(logits[-5:]), np.stack(runs["full"][2][-5:]), rtol=1e-5, atol=1e-5)


def test_a_reused_prefix_stops_where_the_prompts_differ(exported: dict[str, str]) -> None:
    cached = Decoder(Executable.load(exported["prefix"]))
    cached.generate([FIRST], 3)
    # FIRST's slot holds FIRST plus 2 generated tokens; a prompt equal to FIRST reuses all but its last
    # token (one token must be fed to get the next one)
    cached.generate([FIRST], 3)
    assert cached.reused_tokens == len(FIRST) - 1


def test_cli_prefix_caching_export_and_generate(tmp_path: Any, capsys: Any) -> None:
    out = str(tmp_path / "out")
    assert cli.main(["export", os.path.join(FIXTURES, "llama"), "-o", out, "--ctx-len", str(CTX_LEN),
                     "--prefill-seq-len", "8", "--full-batch-size", "1", "--kv-cache-batch-size", "2"]) == 0
    capsys.readouterr()
    argv = ["generate", out, "--max-new-tokens", "4"]
    for prompt in (FIRST, SECOND):
        argv += ["--prompt-ids", ",".join(map(str, prompt))]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert f"{len(SHARED)} prompt tokens reused" in captured.err
    assert len(captured.out.strip().splitlines()) == 2


@pytest.mark.parametrize("argv, message", [
    (["--kv-cache-batch-size", "4"], "--full-batch-size"),
    (["--full-batch-size", "4", "--kv-cache-batch-size", "2"], "--kv-cache-batch-size 2"),
])
def test_cli_refuses_slots_without_or_below_the_lanes(argv: list[str], message: str, tmp_path: Any,
                                                       capsys: Any) -> None:
    assert cli.main(["export", os.path.join(FIXTURES, "llama"), "-o", str(tmp_path / "out"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_export_model_refuses_fewer_slots_than_lanes(tmp_path: Any) -> None:
    with pytest.raises(CheckpointError, match="kv-cache-batch-size 1"):
        export_model(load_checkpoint(os.path.join(FIXTURES, "llama")), str(tmp_path), ctx_len=CTX_LEN,
                     prefill_seq_len=8, full_batch_size=2, kv_cache_batch_size=1)
