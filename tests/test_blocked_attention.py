"""Blocked-KV attention (`qtrace export --kv-blocks N`) against the unblocked export of the same checkpoint.

The cache is read one block at a time (CtxGatherBlockedKV, or its continuous-batching form) and the
blocks are combined with an online softmax, which is exact up to float rounding: logits within 1e-5
(relative to the largest logit) and the same greedy tokens, for N in {1, 2, 4, 7} blocks of a 31-slot
context that no N > 1 divides, on families with plain, windowed + softcapped (Gemma 2) and ALiBi or
learned-position attention, chunked and padded prefill, decode, and continuous batching.
"""

from __future__ import annotations

import collections
import os
from typing import Any

import numpy as np
import onnx
import pytest

from qtrace.examples.checkpoint import export_model, load_checkpoint
from qtrace.examples.generation import cache_layout, generate, new_cache, onnx_session, onnx_step, prefill

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
# Llama, Gemma 2 (softcap + sliding window) and MPT (ALiBi, a per-head score bias per block).
FAMILIES = ["llama", "gemma2", "mpt"]
CTX_LEN = 31
BLOCKS = [1, 2, 4, 7]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: Any) -> Any:
    made: dict[tuple, str] = {}

    def get(name: str, blocks: int, prefill_len: int = 8, full_batch_size: int | None = None,
            head_block_size: int = 0, q_blocks: int = 0, skip_kv: bool = False) -> str:
        key = (name, blocks, prefill_len, full_batch_size, head_block_size, q_blocks, skip_kv)
        if key not in made:
            out = str(tmp_path_factory.mktemp(f"{name}-{blocks}"))
            export_model(load_checkpoint(os.path.join(FIXTURES, name)), out, ctx_len=CTX_LEN, prefill_seq_len=prefill_len,
                         full_batch_size=full_batch_size, kv_blocks=blocks, head_block_size=head_block_size,
                         q_blocks=q_blocks, skip_kv=skip_kv)
            made[key] = out
        return made[key]

    return get


def steps(model_dir: str, prompt: list[int], prefill_len: int, decode_steps: int = 8,
          ctx_len: int = CTX_LEN) -> tuple[np.ndarray, list[int]]:
    session = onnx_session(model_dir)
    step = onnx_step(session)
    seen = []

    def recording(*args: Any) -> Any:
        logits, cache = step(*args)
        seen.append(logits[0, -1])
        return logits, cache

    token, cache = prefill(recording, prompt, new_cache(cache_layout(session), 1, ctx_len), prefill_len)
    logits, tokens = [seen[-1]], [token]
    for position in range(len(prompt), len(prompt) + decode_steps):
        out, cache = step(np.array([[tokens[-1]]]), np.array([[position]]), cache, None)
        logits.append(out[0, -1])
        tokens.append(int(np.argmax(out[0, -1])))
    return np.stack(logits), tokens


def prompt_of(name: str) -> list[int]:
    with np.load(os.path.join(FIXTURES, name, "reference.npz")) as reference:
        return reference["prompt"].tolist()


@pytest.mark.parametrize("prefill_len", [8, 16], ids=["chunked", "padded"])
@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("name", FAMILIES)
def test_blocked_attention_equals_unblocked(name: str, blocks: int, prefill_len: int, exports: Any) -> None:
    prompt = prompt_of(name)
    expected_logits, expected_tokens = steps(exports(name, 0, prefill_len), prompt, prefill_len)
    logits, tokens = steps(exports(name, blocks, prefill_len), prompt, prefill_len)
    assert tokens == expected_tokens
    assert np.abs(logits - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()


def test_block_boundaries_follow_the_symbolic_ctx_len() -> None:
    """Blocks of ceil(ctx_len / N) slots computed in the graph: the block reads are that long at
    whatever context the export is specialized to, not at the exported one."""
    import qtrace
    from qtrace.dims import Dim

    fn, args = load_checkpoint(os.path.join(FIXTURES, "llama")).signature(ctx_len="ctx_len", max_ctx_len=CTX_LEN,
                                                                           kv_blocks=7)
    graph = qtrace.trace(fn, args)
    bodies = [graph] + [function.body for function in graph.functions.values()]
    reads = [n for body in bodies for n in body.nodes if n.op == "ctx_gather" and n.params.get("blocked")]
    # the block body is one shared function: its K and V reads see the block length as their own size
    indices = [n for n in graph.nodes if n.op == "broadcast_to"]
    block = (Dim.named("ctx_len") + 6) // 7
    assert reads and {n.outputs[0].shape[2] for n in reads} == {block}
    assert {n.outputs[0].shape[-1] for n in indices} == {block}


@pytest.mark.parametrize("ctx_len", [12, 20])
@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_blocked_attention_at_a_smaller_specialized_context_equals_unblocked(name: str, ctx_len: int,
                                                                             exports: Any) -> None:
    prompt = prompt_of(name)[:ctx_len - 9]
    expected_logits, expected_tokens = steps(exports(name, 0), prompt, 8, ctx_len=ctx_len)
    logits, tokens = steps(exports(name, 7), prompt, 8, ctx_len=ctx_len)
    assert tokens == expected_tokens
    assert np.abs(logits - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()


@pytest.mark.parametrize("blocks", [2, 7])
@pytest.mark.parametrize("name", FAMILIES)
def test_blocked_attention_with_continuous_batching(name: str, blocks: int, exports: Any) -> None:
    prompts = [prompt_of(name), [5, 9, 2], [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]]
    results = []
    for kv_blocks in (0, blocks):
        session = onnx_session(exports(name, kv_blocks, 8, 3))
        results.append(generate(onnx_step(session), prompts, 8, prefill_len=8, ctx_len=CTX_LEN,
                                layout=cache_layout(session), full_batch_size=3))
    assert results[1] == results[0]


@pytest.mark.parametrize("name", ["llama", "mpt", "gpt_oss"])
def test_head_blocking_equals_unblocked(name: str, exports: Any) -> None:
    """Blocked attention over one KV head at a time (per-head ALiBi bias and attention sinks included)."""
    prompt = prompt_of(name)
    expected_logits, expected_tokens = steps(exports(name, 0), prompt, 8)
    logits, tokens = steps(exports(name, 4, 8, None, head_block_size=1), prompt, 8)
    assert tokens == expected_tokens
    assert np.abs(logits - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()
    session = onnx_session(exports(name, 4, 8, 3, head_block_size=1))
    plain = onnx_session(exports(name, 0, 8, 3))
    prompts = [prompt, [5, 9, 2]]
    assert generate(onnx_step(session), prompts, 6, prefill_len=8, ctx_len=CTX_LEN, layout=cache_layout(session),
                    full_batch_size=3) == \
        generate(onnx_step(plain), prompts, 6, prefill_len=8, ctx_len=CTX_LEN, layout=cache_layout(plain),
                 full_batch_size=3)


@pytest.mark.parametrize("name, kv_blocks, q_blocks, head_block_size", [
    ("llama", 1, 3, 0),      # query blocking alone (one KV block: the cache read whole)
    ("gemma2", 4, 3, 0),     # softcap + window, query rows not divisible by 3
    ("gpt_oss", 2, 2, 1),    # attention sinks (the log-sum-exp rows are cut and merged too), head blocking
    ("gpt2", 2, 2, 0),       # learned positions; its row numbers are built in the step, outside the layer
])
def test_query_blocking_equals_unblocked(name: str, kv_blocks: int, q_blocks: int, head_block_size: int,
                                         exports: Any) -> None:
    """Blocks of ceil(G*S / Q) query rows (G query heads per KV head, S tokens), each against every KV
    block: padded and chunked prefill, decode (G rows), and continuous batching."""
    prompt = prompt_of(name)
    for prefill_len in (8, 16):
        expected_logits, expected_tokens = steps(exports(name, 0, prefill_len), prompt, prefill_len)
        logits, tokens = steps(exports(name, kv_blocks, prefill_len, None, head_block_size, q_blocks), prompt,
                               prefill_len)
        assert tokens == expected_tokens
        assert np.abs(logits - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()
    prompts = [prompt, [5, 9, 2], [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]]
    results = [generate(onnx_step(session), prompts, 6, prefill_len=8, ctx_len=CTX_LEN,
                        layout=cache_layout(session), full_batch_size=3)
               for session in (onnx_session(exports(name, 0, 8, 3)),
                               onnx_session(exports(name, kv_blocks, 8, 3, head_block_size, q_blocks)))]
    assert results[1] == results[0]


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_skipping_future_blocks_equals_unblocked(name: str, exports: Any) -> None:
    """--skip-kv: blocks past every position keep the running softmax as it was (prefill and decode
    reach only the first of 7 blocks early on, and every block later), continuous batching included."""
    prompt = prompt_of(name)
    for prefill_len in (8, 16):
        expected_logits, expected_tokens = steps(exports(name, 0, prefill_len), prompt, prefill_len)
        logits, tokens = steps(exports(name, 7, prefill_len, skip_kv=True), prompt, prefill_len)
        assert tokens == expected_tokens
        assert np.abs(logits - expected_logits).max() <= 1e-5 * np.abs(expected_logits).max()
    prompts = [prompt, [5, 9, 2], [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]]
    results = [generate(onnx_step(session), prompts, 6, prefill_len=8, ctx_len=CTX_LEN,
                        layout=cache_layout(session), full_batch_size=3)
               for session in (onnx_session(exports(name, 0, 8, 3)), onnx_session(exports(name, 7, 8, 3, skip_kv=True)))]
    assert results[1] == results[0]


def test_skip_kv_selects_the_running_state_when_a_block_lies_in_the_future(exports: Any) -> None:
    _, plain = op_counts(exports("llama", 7))
    _, skipping = op_counts(exports("llama", 7, skip_kv=True))
    assert skipping["attention_kv_block"]["Where"] == plain["attention_kv_block"]["Where"] + 3


def test_query_blocking_builds_no_range_inside_a_layer_function(exports: Any) -> None:
    """The row numbers that cut and merge the query blocks are built once per step in the main graph:
    the compiler rejects a Range of symbolic length inside a function."""
    main, functions = op_counts(exports("gpt2", 2, 8, None, q_blocks=2))
    assert main["Range"] >= 1 and all(ops["Range"] == 0 for ops in functions.values())


def test_query_blocking_scores_each_block_of_rows_against_every_kv_block(exports: Any) -> None:
    _, functions = op_counts(exports("llama", 2, 8, None, q_blocks=3))
    layer = functions["llama_layer"]
    # block 1's K and V are read once and scored by each of the 3 row blocks; block 2: one call per row block
    assert layer["CtxGatherBlockedKV"] == 2 and layer["attention_kv_block"] == 3
    assert layer["Softmax"] == 0 and layer["MatMul"] >= 2 * 3


def test_head_blocking_slices_the_heads_apart(exports: Any) -> None:
    _, functions = op_counts(exports("llama", 4, 8, None, head_block_size=1))
    kv_heads = 2
    assert functions["llama_layer"]["attention_kv_block"] == 3 * kv_heads
    assert functions["llama_layer"]["CtxGatherBlockedKV"] == 2 * kv_heads


def op_counts(model_dir: str) -> tuple[collections.Counter, dict[str, collections.Counter]]:
    model = onnx.load(os.path.join(model_dir, "model.onnx"), load_external_data=False)
    functions = {f.name: collections.Counter(n.op_type for n in f.node) for f in model.functions
                 if f.domain == "qtrace.local"}
    return collections.Counter(n.op_type for n in model.graph.node), functions


def test_blocked_graph_reads_blocks_through_one_shared_block_function(exports: Any) -> None:
    main, functions = op_counts(exports("llama", 7))
    layer = functions["llama_layer"]
    assert layer["CtxGather"] == 0 and layer["CtxGatherBlockedKV"] == 2   # the first block, K and V
    assert layer["attention_kv_block"] == 6                               # the other 6 blocks: calls
    assert functions["attention_kv_block"]["CtxGatherBlockedKV"] == 2
    _, cb_functions = op_counts(exports("llama", 7, 8, 3))
    assert cb_functions["attention_kv_block"]["CtxGatherBlockedKVCB"] == 2


def test_blocks_past_the_context_read_nothing(exports: Any) -> None:
    """31 slots in 4 blocks of 8: the last slot of block 4 lies past the cache; its index is
    INT32_MAX like every slot past the live context (the accelerator skips those reads)."""
    from qtrace.examples.blocks.masks import cache_indices, kv_block_slots

    blocks = kv_block_slots(CTX_LEN, 4)
    assert [len(b) for b in blocks] == [8] * 4 and blocks[-1][-1] == 31
    indices = cache_indices(np.array([[30]]), blocks[-1])
    assert indices[0, 0, -1] == 2147483647 and indices[0, 0, -2] == 30


@pytest.mark.parametrize("argv, message", [
    (["--head-block-size", "1"], "--head-block-size 1 needs --kv-blocks"),
    (["--q-blocks", "2"], "--q-blocks 2 needs --kv-blocks"),
    (["--skip-kv"], "--skip-kv needs --kv-blocks"),
    (["--kv-blocks", "2", "--q-blocks", "-1"], "--q-blocks -1 needs --kv-blocks"),
    (["--kv-blocks", "64"], "--kv-blocks 64"),
])
def test_cli_refuses_blocking_flags_that_cannot_apply(argv: list[str], message: str, tmp_path: Any,
                                                      capsys: Any) -> None:
    from qtrace import cli

    assert cli.main(["export", os.path.join(FIXTURES, "llama"), "-o", str(tmp_path / "out"), "--ctx-len", "32",
                     *argv]) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
