"""Serving modes (issue #13) on every family of the zoo, exported and run on onnxruntime.

Token equality: one family per mechanism a serving mode meets in the step (SERVING_NAMES: plain
RoPE with GQA, alternating and all-layer sliding windows, local/global RoPE, chunked attention with
NoPE layers, attention sinks, ALiBi, learned absolute positions, MoE routing) -- the modes live in
the shared blocks, never in a family file -- and with QTRACE_ALL_FAMILIES=1 (the nightly size)
every fixture under tests/fixtures/ (discovered, so new families join by adding a fixture). Each is
exported plainly and in each mode; in every mode the greedy tokens equal the plain
export's (whose first 9 are transformers' own, test_zoo_parity.py), while the mode does what it is
for: compute-context-length buckets switch as positions grow (prefill, decode, continuous batching,
and a prompt past QEfficient's ctx_len - 32 hole), a speculative target accepts every proposal of
itself and keeps only its own tokens from another draft or prompt lookup, a decode-only export
continues from a prefill-only export's retained state, and the sampler with top-k 1 is greedy while
with real sampling it draws, call by call, the ids of the numpy reference on the plain model's
logits.

Interface (Llama and non-Llama families): the names, dtypes, dims and order of the inputs and
outputs each mode adds, and every output dim tied to an input symbol. The side files themselves
are tested in test_serving_side_files.py, the CLI in test_serving_cli.py.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
import pytest

from qtrace.examples.checkpoint import export_model, load_checkpoint
from qtrace.examples.generation import Decoder, Executable, GenerationError, SamplingParams, check_handoff
from qtrace.examples.serving import ServingOptions

from sampler_reference import MARGIN, reference_sample

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
ALL_NAMES = sorted(d for d in os.listdir(FIXTURES) if os.path.isfile(os.path.join(FIXTURES, d, "reference.npz")))
SERVING_NAMES = ["llama", "gemma2", "starcoder2", "gemma3", "llama4", "gpt_oss", "mpt", "gpt2", "qwen3_moe"]
NAMES = ALL_NAMES if os.environ.get("QTRACE_ALL_FAMILIES") else SERVING_NAMES
INTERFACE_NAMES = ["llama", "gemma2"]  # Llama and a non-Llama family (sliding window, softcaps, tied head)
CTX_LEN, PREFILL_LEN, NEW_TOKENS = 64, 8, 20
CCL = dict(comp_ctx_lengths_prefill=(8, 16, 40), comp_ctx_lengths_decode=(12, 24, 64))
# prefill buckets after QEfficient's de-duplication: 8, 16, 32 (64 collides with decode), 40
EXPORTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "ccl_target": dict(serving=ServingOptions(**CCL, num_speculative_tokens=(0, 3))),
    "ccl_cb": dict(full_batch_size=3, serving=ServingOptions(**CCL)),
    "target_cb": dict(full_batch_size=3, serving=ServingOptions(num_speculative_tokens=(0, 3))),
    "prefill_only": dict(serving=ServingOptions(prefill_only=True, comp_ctx_lengths_prefill=(8, 16))),
    "decode_only": dict(serving=ServingOptions(decode_only=True, comp_ctx_lengths_decode=(24,))),
    "prefill_only_cb": dict(full_batch_size=3, serving=ServingOptions(prefill_only=True)),
    "decode_only_cb": dict(full_batch_size=3, serving=ServingOptions(decode_only=True)),
    "sampling": dict(serving=ServingOptions(sampling=True, max_top_k_ids=32)),
    "sampling_cb": dict(full_batch_size=3, serving=ServingOptions(sampling=True, max_top_k_ids=32, return_pdfs=True)),
}


def reference_prompt(name: str) -> list[int]:
    with np.load(os.path.join(FIXTURES, name, "reference.npz")) as data:
        return data["prompt"].tolist()


def reference_tokens(name: str) -> list[int]:
    with np.load(os.path.join(FIXTURES, name, "reference.npz")) as data:
        return data["tokens"].tolist()


def other_prompts(name: str) -> list[list[int]]:
    """Prompts of several lengths (one longer than three prefill chunks) from the fixture's own."""
    prompt = reference_prompt(name)
    return [prompt[:3], (prompt * 3)[:26], prompt[::-1], [prompt[0]]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: Any) -> Any:
    made: dict[tuple[str, str], str] = {}

    def get(name: str, kind: str) -> str:
        if (name, kind) not in made:
            out = str(tmp_path_factory.mktemp(f"{name}-{kind}"))
            model = load_checkpoint(os.path.join(FIXTURES, name))
            export_model(model, out, ctx_len=CTX_LEN, prefill_seq_len=PREFILL_LEN, **EXPORTS[kind])
            made[name, kind] = out
        return made[name, kind]

    return get


class Calls:
    """An Executable whose calls are logged: (specialization name, feeds, outputs)."""

    def __init__(self, model_dir: str):
        self.model = Executable.load(model_dir)
        self.log: list[tuple[str, dict, dict]] = []
        run = self.model.run

        def logged(feeds: dict) -> dict:
            outputs = run(feeds)
            self.log.append((self.model.matching(feeds).name, feeds, dict(outputs)))
            return outputs

        self.model.run = logged

    def buckets(self, seq_len: int) -> list[int]:
        """The comp_ctx_lengths of the calls with this seq_len, in call order."""
        return [f["comp_ctx_lengths"].size for _, f, _ in self.log if f["input_ids"].shape[1] == seq_len]


@pytest.fixture(scope="module")
def plain_tokens(exported: Any) -> Any:
    """The plain export's greedy tokens for a prompt (NEW_TOKENS of them, or as many as fit), computed once."""
    made: dict[tuple[str, tuple[int, ...]], list[int]] = {}

    def get(name: str, prompt: list[int]) -> list[int]:
        key = (name, tuple(prompt))
        if key not in made:
            count = min(NEW_TOKENS, CTX_LEN - len(prompt))
            made[key] = Decoder(Executable.load(exported(name, "plain"))).generate([prompt], count)[0]
        return made[key]

    return get


# -- compute-context length --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_ccl_buckets_switch_as_positions_grow_and_tokens_stay_the_plain_ones(name: str, exported: Any,
                                                                              plain_tokens: Any) -> None:
    prompt = reference_prompt(name)
    calls = Calls(exported(name, "ccl_target"))
    tokens = Decoder(calls.model).generate([prompt], NEW_TOKENS)[0]
    assert tokens == plain_tokens(name, prompt)
    assert tokens[:9] == reference_tokens(name)
    assert calls.buckets(PREFILL_LEN) == [8, 16]  # the prompt's second chunk crosses into the next bucket
    decode = calls.buckets(1)
    assert decode == sorted(decode) and {12, 24, 64} <= set(decode) or {24, 64} <= set(decode)
    for _, feeds, _ in calls.log:  # every call reads at least up to its largest position
        assert feeds["comp_ctx_lengths"].size > feeds["position_ids"].max()


@pytest.mark.parametrize("name", NAMES)
def test_ccl_prompt_past_the_largest_prefill_bucket_goes_through_decode_entries(name: str, exported: Any,
                                                                                 plain_tokens: Any) -> None:
    """QEfficient's de-duplication leaves prefill buckets up to 40 (< ctx_len 64 - 32 + 8): a
    45-token prompt's last chunk is fed by single-token decode calls, and the tokens are unchanged."""
    prompt = (reference_prompt(name) * 5)[:45]
    calls = Calls(exported(name, "ccl_target"))
    tokens = Decoder(calls.model).generate([prompt], 8)[0]
    assert tokens == plain_tokens(name, prompt)[:8]
    first_decode = next(i for i, (entry, _, _) in enumerate(calls.log) if entry.startswith("Decode"))
    assert calls.log[first_decode][1]["position_ids"].max() < len(prompt)  # a prompt position, fed by decode
    assert max(calls.buckets(PREFILL_LEN)) == 40


@pytest.mark.parametrize("name", NAMES)
def test_ccl_with_continuous_batching_recomputes_the_bucket_for_the_whole_batch(name: str, exported: Any,
                                                                                plain_tokens: Any) -> None:
    """Five prompts through three cache slots (refilled as sequences finish): each gets its plain
    tokens, and the decode bucket follows the batch's largest position, down again after the long
    sequence leaves."""
    prompts = [(reference_prompt(name) * 4)[:34], *other_prompts(name)]
    calls = Calls(exported(name, "ccl_cb"))
    tokens = Decoder(calls.model).generate(prompts, 10)
    assert tokens == [plain_tokens(name, p)[:10] for p in prompts]
    decode = calls.buckets(1)
    assert 64 in decode and decode[-1] < 64


# -- speculative decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_speculative_draft_equal_to_the_target_accepts_every_proposal(name: str, exported: Any,
                                                                      plain_tokens: Any) -> None:
    prompt = reference_prompt(name)
    target = Decoder(Executable.load(exported(name, "ccl_target")))
    draft = Decoder(Executable.load(exported(name, "ccl_target")))
    tokens, stats = target.speculate([prompt], NEW_TOKENS, draft=draft)
    assert tokens[0] == plain_tokens(name, prompt)
    assert stats.acceptance_rate == 1.0 and stats.proposed >= 15
    assert stats.tokens / stats.target_calls == 4.0


@pytest.mark.parametrize("name", NAMES)
def test_speculative_with_another_draft_keeps_only_the_targets_tokens(name: str, exported: Any,
                                                                      plain_tokens: Any) -> None:
    prompt = reference_prompt(name)
    other = "qwen3" if name != "qwen3" else "llama"
    target = Decoder(Executable.load(exported(name, "ccl_target")))
    tokens, stats = target.speculate([prompt], NEW_TOKENS, draft=Decoder(Executable.load(exported(other, "plain"))))
    assert tokens[0] == plain_tokens(name, prompt)
    assert stats.accepted < stats.proposed


@pytest.mark.parametrize("name", NAMES)
def test_prompt_lookup_proposals_keep_the_targets_tokens(name: str, exported: Any, plain_tokens: Any) -> None:
    prompt = (reference_prompt(name) * 2)[:20]
    calls = Calls(exported(name, "ccl_target"))
    tokens, stats = Decoder(calls.model).speculate([prompt], NEW_TOKENS, prompt_lookup=3)
    assert tokens[0] == plain_tokens(name, prompt)
    assert stats.proposed > 0
    widths = {feeds["input_ids"].shape[1] for entry, feeds, _ in calls.log if entry.startswith("Decode")}
    assert widths <= {1, 4}  # the smallest compiled K that fits each step's proposals


@pytest.mark.parametrize("name", NAMES)
def test_speculative_decoding_with_continuous_batching(name: str, exported: Any, plain_tokens: Any) -> None:
    prompts = [reference_prompt(name), *other_prompts(name)]
    target = Decoder(Executable.load(exported(name, "target_cb")))
    draft = Decoder(Executable.load(exported(name, "target_cb")))
    tokens, stats = target.speculate(prompts, 12, draft=draft)
    assert tokens == [plain_tokens(name, p)[:12] for p in prompts]
    assert stats.acceptance_rate == 1.0


# -- disaggregated serving -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_decode_only_export_continues_from_the_prefill_only_exports_state(name: str, exported: Any,
                                                                         plain_tokens: Any) -> None:
    prompts = [reference_prompt(name), (reference_prompt(name) * 5)[:45]]
    prefill, decode = Calls(exported(name, "prefill_only")), Calls(exported(name, "decode_only"))
    tokens = Decoder(prefill.model, decode.model).generate(prompts, 8)
    assert tokens == [plain_tokens(name, p)[:8] for p in prompts]
    assert {e for e, _, _ in prefill.log} == {"Prefill_0", "Prefill_1", "Prefill_2"}
    assert max(prefill.buckets(PREFILL_LEN)) == CTX_LEN  # no ctx_len - 32 hole without decode entries
    assert {e for e, _, _ in decode.log} == {"Decode_0", "Decode_1"}


@pytest.mark.parametrize("name", NAMES)
def test_disaggregated_continuous_batching(name: str, exported: Any, plain_tokens: Any) -> None:
    prompts = [reference_prompt(name), *other_prompts(name)]
    decoder = Decoder(Executable.load(exported(name, "prefill_only_cb")),
                      Executable.load(exported(name, "decode_only_cb")))
    assert decoder.generate(prompts, 10) == [plain_tokens(name, p)[:10] for p in prompts]


# -- on-device sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_sampling_with_top_k_1_or_temperature_0_is_greedy(name: str, exported: Any, plain_tokens: Any) -> None:
    prompt = reference_prompt(name)
    sampler = Executable.load(exported(name, "sampling"))
    expected = plain_tokens(name, prompt)
    top_1 = SamplingParams(temperature=0.7, top_k=1, top_p=0.5, seed=3)
    assert Decoder(sampler, sampling=top_1).generate([prompt], NEW_TOKENS)[0] == expected
    assert Decoder(sampler).generate([prompt], NEW_TOKENS)[0] == expected
    prompts = [prompt, *other_prompts(name)]
    batched = Decoder(Executable.load(exported(name, "sampling_cb")), sampling=top_1).generate(prompts, 10)
    assert batched == [plain_tokens(name, p)[:10] for p in prompts]


@pytest.mark.parametrize("name", NAMES)
def test_sampled_ids_equal_the_numpy_reference_on_the_plain_models_logits(name: str, exported: Any) -> None:
    """Every call of a sampled generation (penalties, temperature, top-k, top-p, min-p on): the plain
    export, fed the same tokens, gives logits; the numpy reference samples them with the call's random
    numbers and the penalty masks kept by hand; the ids and the retained masks are the exported
    sampler's."""
    prompt = (reference_prompt(name) * 2)[:14]
    params = SamplingParams(temperature=0.9, top_k=12, top_p=0.85, min_p=0.05, repetition_penalty=1.3,
                            presence_penalty=0.4, seed=11)
    calls = Calls(exported(name, "sampling"))
    tokens = Decoder(calls.model, sampling=params).generate([prompt], 12)[0]
    plain = Executable.load(exported(name, "plain"))
    state = plain.new_state(1)
    seen, generated = np.zeros(128, bool), np.zeros(128, bool)
    clear = 0
    for _, feeds, outputs in calls.log:
        ids, positions = feeds["input_ids"], feeds["position_ids"]
        logits, state = plain({"input_ids": ids, "position_ids": positions}, state)
        valid = ids[0][positions[0] >= 0]
        if ids.shape[1] > 1:
            if positions[0, 0] == 0:
                seen[:] = False
            generated[:] = False
            seen[valid] = True
        else:
            seen[valid] = generated[valid] = True
        np.testing.assert_array_equal(outputs["past_repetition_penalty_buffer_RetainedState"][0], seen)
        np.testing.assert_array_equal(outputs["past_presence_penalty_buffer_RetainedState"][0], generated)
        token, margin, _ = reference_sample(logits["logits"][0, 0], seen, generated, temperature=0.9, top_k=12,
                                            top_p=0.85, min_p=0.05, repetition=1.3, presence=0.4,
                                            random_numbers=feeds["random_numbers"][0])
        if margin > MARGIN:
            clear += 1
            assert int(outputs["next_tokens"][0, 0, 0]) == token
    assert clear >= len(calls.log) - 1
    assert len(set(tokens)) > 1


# -- interfaces ------------------------------------------------------------------------------------------


def io(model_dir: str) -> tuple[list[tuple[str, str, list[Any]]], list[tuple[str, str, list[Any]]]]:
    model = onnx.load(os.path.join(model_dir, "model.onnx"), load_external_data=False)

    def rows(values: Any) -> list[tuple[str, str, list[Any]]]:
        return [(v.name, onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type),
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return rows(model.graph.input), rows(model.graph.output)


def kv(layers: int, batch: str, prefix: str = "", suffix: str = "") -> list[str]:
    return [f"{prefix}past_{k}.{i}{suffix}" for i in range(layers) for k in ("key", "value")]


@pytest.mark.parametrize("kind", list(EXPORTS))
@pytest.mark.parametrize("name", INTERFACE_NAMES)
def test_every_output_is_named_and_its_dims_are_input_symbols(name: str, kind: str, exported: Any) -> None:
    inputs, outputs = io(exported(name, kind))
    symbols = {d for _, _, dims in inputs for d in dims if isinstance(d, str)}
    for output, _, dims in outputs:
        assert output and not output.isdigit()
        assert all(isinstance(d, int) and d > 0 or d in symbols for d in dims), (output, dims)


@pytest.mark.parametrize("name", INTERFACE_NAMES)
def test_ccl_adds_comp_ctx_lengths_after_the_caches(name: str, exported: Any) -> None:
    plain_in, plain_out = io(exported(name, "plain"))
    ccl_in, ccl_out = io(exported(name, "ccl_cb"))
    layers = sum(1 for n, _, _ in plain_in if n.startswith("past_key"))
    names = [n for n, _, _ in ccl_in]
    assert names == ["input_ids", "position_ids", *kv(layers, "full_batch_size"), "comp_ctx_lengths", "batch_index"]
    assert ccl_in[names.index("comp_ctx_lengths")] == ("comp_ctx_lengths", "INT64", ["comp_ctx_lengths"])
    assert [(n, t) for n, t, _ in ccl_out] == [(n, t) for n, t, _ in plain_out]
    assert ccl_out[0][2] == ["batch_size", 1, plain_out[0][2][2]]
    # the cache read is bounded by the input's length: CtxGather reads as many rows as it has
    model = onnx.load(os.path.join(exported(name, "ccl_cb"), "model.onnx"), load_external_data=False)
    shapes = [n for n in model.graph.node if n.op_type == "Shape" and n.input[0] == "comp_ctx_lengths"]
    assert len(shapes) == 1
    gathers = [n for f in model.functions for n in f.node if n.op_type == "CtxGatherCB"]
    assert gathers and all(len(n.input) == 4 for n in gathers)


@pytest.mark.parametrize("name", INTERFACE_NAMES)
def test_speculative_target_keeps_num_logits_to_keep_rows(name: str, exported: Any) -> None:
    inputs, outputs = io(exported(name, "target_cb"))
    assert [n for n, _, _ in inputs][-2:] == ["batch_index", "num_logits_to_keep"]
    assert inputs[-1] == ("num_logits_to_keep", "INT64", ["num_logits_to_keep", 1])
    assert outputs[0][:2] == ("logits", "FLOAT") and outputs[0][2][:2] == ["batch_size", "num_logits_to_keep"]
    target = Executable.load(exported(name, "target_cb"))
    state = target.new_state(3)
    feeds = {"input_ids": np.array([[5, 6, 7, 8]] * 3), "position_ids": np.array([[0, 1, 2, 3], [0, 1, -1, -1],
                                                                                  [4, 5, 6, 7]]),
             "batch_index": np.array([[0], [1], [2]]), "num_logits_to_keep": np.zeros((4, 1), np.int64)}
    logits = target(feeds, state)[0]["logits"]
    assert logits.shape == (3, 4, 128)


@pytest.mark.parametrize("name", INTERFACE_NAMES)
def test_prefill_only_and_decode_only_share_one_retained_state_layout(name: str, exported: Any) -> None:
    for prefill, decode in (("prefill_only", "decode_only"), ("prefill_only_cb", "decode_only_cb")):
        prefill_in, prefill_out = io(exported(name, prefill))
        decode_in, decode_out = io(exported(name, decode))
        assert prefill_in == decode_in and prefill_out == decode_out
        handed = [(n[:-len("_RetainedState")], t, d) for n, t, d in prefill_out if n.endswith("_RetainedState")]
        assert handed == [row for row in decode_in if row[0].startswith("past_")]
        check_handoff(Executable.load(exported(name, prefill)), Executable.load(exported(name, decode)))


@pytest.mark.parametrize("name", INTERFACE_NAMES)
def test_sampling_replaces_logits_by_next_tokens_and_retains_the_penalty_masks(name: str, exported: Any) -> None:
    inputs, outputs = io(exported(name, "sampling_cb"))
    names = [n for n, _, _ in inputs]
    layers = sum(1 for n in names if n.startswith("past_key"))
    assert names == ["input_ids", "position_ids", *kv(layers, "full_batch_size"), "batch_index",
                     "last_accepted_output_tokens", "past_repetition_penalty_buffer", "repetition_penalties",
                     "past_presence_penalty_buffer", "presence_penalties", "temperatures", "top_ks", "top_ps",
                     "min_ps", "random_numbers"]
    buffer = ("BOOL", ["full_batch_size", 128])
    assert {n: (t, d) for n, t, d in inputs if "buffer" in n} == {"past_repetition_penalty_buffer": buffer,
                                                                  "past_presence_penalty_buffer": buffer}
    assert inputs[names.index("top_ks")][1] == "INT32"
    assert inputs[-1] == ("random_numbers", "FLOAT", ["batch_size", 32])
    assert [n for n, _, _ in outputs] == ["probs", "next_tokens", *kv(layers, "", suffix="_RetainedState"),
                                          "past_repetition_penalty_buffer_RetainedState",
                                          "past_presence_penalty_buffer_RetainedState"]
    assert outputs[0] == ("probs", "FLOAT", ["batch_size", 1, 128])
    assert outputs[1] == ("next_tokens", "INT64", ["batch_size", 1, 1])
    assert outputs[-1] == ("past_presence_penalty_buffer_RetainedState", "BOOL", ["full_batch_size", 128])
    with open(os.path.join(exported(name, "sampling_cb"), "custom_io.yaml")) as f:
        assert "buffer" not in f.read()  # the bool masks keep their type (QEfficient lists only the caches)


@pytest.mark.parametrize("name", INTERFACE_NAMES)
def test_comp_ctx_lengths_bounds_what_every_layer_reads(name: str, exported: Any) -> None:
    """A decode step at position 12 after a 12-token prefill: any bucket of at least 13 slots gives the
    plain model's logits; 8 slots hide positions 8..12 (the step's own key among them) and change them."""
    prompt = (reference_prompt(name) * 2)[:12]
    ccl, plain = Executable.load(exported(name, "ccl_target")), Executable.load(exported(name, "plain"))
    state = ccl.new_state(1)
    for start in (0, 8):
        chunk = prompt[start:start + 8]
        ids = np.array([chunk + [0] * (8 - len(chunk))])
        positions = np.array([list(range(start, start + len(chunk))) + [-1] * (8 - len(chunk))])
        _, state = ccl({"input_ids": ids, "position_ids": positions, "comp_ctx_lengths": np.zeros(16, np.int64),
                        "num_logits_to_keep": np.zeros((1, 1), np.int64)}, state)
    step = {"input_ids": np.array([[3]]), "position_ids": np.array([[12]])}
    expected = plain.run({**step, **state})["logits"]
    logits = {k: ccl.run({**step, **state, "comp_ctx_lengths": np.zeros(k, np.int64),
                          "num_logits_to_keep": np.zeros((1, 1), np.int64)})["logits"] for k in (8, 13, 24, 64)}
    for k in (13, 24, 64):
        np.testing.assert_allclose(logits[k], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[8], expected, atol=1e-3)  # (NaN for a sliding layer that sees no slot)


def test_a_call_outside_the_specializations_is_refused(exported: Any) -> None:
    ccl = Executable.load(exported("llama", "ccl_target"))
    feeds = {"input_ids": np.zeros((1, 1), np.int64), "position_ids": np.zeros((1, 1), np.int64),
             "comp_ctx_lengths": np.zeros(20, np.int64), "num_logits_to_keep": np.zeros((1, 1), np.int64)}
    with pytest.raises(GenerationError, match=r"no specialization accepts .*comp_ctx_lengths \[20\]"):
        ccl(feeds, ccl.new_state(1))


def test_handoff_between_exports_of_different_layouts_is_refused(exported: Any, tmp_path: Any) -> None:
    model = load_checkpoint(os.path.join(FIXTURES, "llama"))
    export_model(model, str(tmp_path), ctx_len=32, serving=ServingOptions(decode_only=True))
    with pytest.raises(GenerationError, match=r"past_key.0.*\[.*64.*\].*\[.*32.*\]"):
        Decoder(Executable.load(exported("llama", "prefill_only")), Executable.load(str(tmp_path)))
