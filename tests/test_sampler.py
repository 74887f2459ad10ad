"""The on-device sampler block on its own (examples/blocks/sampler.py), lowered and run on
onnxruntime, against the plain-numpy reference of the same algorithm (tests/sampler_reference.py):
exact token ids for given random numbers, the distribution Gumbel-max draws from, and the retained
penalty buffers' prompt/decode bookkeeping under continuous batching."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import qtrace
from qtrace.examples.blocks.sampler import SAMPLER_INPUTS, SamplerOptions, sample, sampler_input_specs

from sampler_reference import MARGIN, reference_sample

VOCAB, WIDTH = 64, 16


def lowered_sampler(options: SamplerOptions, continuous_batching: bool = False) -> Any:
    cache_rows = "full_batch_size" if continuous_batching else "batch_size"

    def sampler(logits, input_ids, position_ids, batch_index, inputs):
        return sample(logits, input_ids, position_ids, batch_index, inputs, options)

    ids = qtrace.ShapeDtype(("batch_size", "seq_len"), np.int64)
    args = (qtrace.ShapeDtype(("batch_size", 1, VOCAB), np.float32), ids, ids,
            qtrace.ShapeDtype(("batch_size", 1), np.int64) if continuous_batching else None,
            sampler_input_specs("batch_size", "seq_len", cache_rows, VOCAB, options))
    return qtrace.lower(sampler, args)


@pytest.fixture(scope="module")
def decode_sampler() -> Any:
    return lowered_sampler(SamplerOptions(max_top_k_ids=WIDTH, return_pdfs=True))


def decode_inputs(rng: np.random.Generator, rows: int, params: dict[str, np.ndarray]) -> tuple:
    """A decode step (one token per row at position 20) with random logits, buffers and last tokens."""
    logits = (rng.standard_normal((rows, 1, VOCAB)) * 3).astype(np.float32)
    last = rng.integers(0, VOCAB, (rows, 1))
    inputs = {"last_accepted_output_tokens": last,
              "past_repetition_penalty_buffer": rng.random((rows, VOCAB)) < 0.2,
              "past_presence_penalty_buffer": rng.random((rows, VOCAB)) < 0.1,
              "random_numbers": rng.random((rows, WIDTH), dtype=np.float32), **params}
    return logits, last, np.full((rows, 1), 20), inputs


def row_params(rng: np.random.Generator, rows: int) -> dict[str, np.ndarray]:
    def pick(values, dtype=np.float32):
        return np.array(values, dtype)[rng.integers(0, len(values), rows)][:, None]

    return {"repetition_penalties": pick([1.0, 1.3, 0.8]), "presence_penalties": pick([0.0, 0.5]),
            "temperatures": pick([0.0, 0.5, 1.3]), "top_ks": pick([0, 1, 5, WIDTH, 40], np.int32),
            "top_ps": pick([1.0, 0.9, 0.5]), "min_ps": pick([0.0, 0.1])}


def reference_rows(logits: np.ndarray, last: np.ndarray, inputs: dict[str, np.ndarray]) -> list[tuple]:
    out = []
    for b in range(logits.shape[0]):
        seen = inputs["past_repetition_penalty_buffer"][b].copy()
        generated = inputs["past_presence_penalty_buffer"][b].copy()
        seen[last[b, 0]] = generated[last[b, 0]] = True  # a decode step marks its input token first
        out.append(reference_sample(
            logits[b, 0], seen, generated, temperature=float(inputs["temperatures"][b, 0]),
            top_k=int(inputs["top_ks"][b, 0]), top_p=float(inputs["top_ps"][b, 0]), min_p=float(inputs["min_ps"][b, 0]),
            repetition=float(inputs["repetition_penalties"][b, 0]), presence=float(inputs["presence_penalties"][b, 0]),
            random_numbers=inputs["random_numbers"][b]))
    return out


def test_token_ids_equal_the_numpy_reference_for_given_random_numbers(decode_sampler: Any) -> None:
    rng = np.random.default_rng(7)
    logits, last, positions, inputs = decode_inputs(rng, 400, row_params(rng, 400))
    got = decode_sampler.run(logits, last, positions, None, inputs)["next_tokens"][:, 0, 0]
    expected = reference_rows(logits, last, inputs)
    clear = [b for b, (_, margin, _) in enumerate(expected) if margin > MARGIN]
    assert len(clear) >= 390, "the random inputs sit too close to the sampler's thresholds"
    assert [int(got[b]) for b in clear] == [expected[b][0] for b in clear]
    greedy = [b for b in clear if inputs["temperatures"][b, 0] == 0 or inputs["top_ks"][b, 0] == 1]
    assert len(greedy) > 100  # both the greedy branch and top-k 1 are exercised


def test_eager_sampler_draws_the_same_ids_as_onnxruntime(decode_sampler: Any) -> None:
    rng = np.random.default_rng(8)
    args = decode_inputs(rng, 50, row_params(rng, 50))
    eager = decode_sampler.fn(*args[:3], None, args[3])
    onnx = decode_sampler.run(*args[:3], None, args[3])
    np.testing.assert_array_equal(eager["next_tokens"], onnx["next_tokens"])
    np.testing.assert_allclose(eager["probs"], onnx["probs"], atol=1e-6)


def test_gumbel_max_draws_from_the_filtered_distribution(decode_sampler: Any) -> None:
    """One row of logits, 4000 draws: each token's count is within 5 sigma of its filtered
    probability (temperature, top-k, top-p and min-p applied), and filtered tokens never appear."""
    rng = np.random.default_rng(9)
    draws = 4000
    params = {"repetition_penalties": np.full((draws, 1), 1.0, np.float32),
              "presence_penalties": np.zeros((draws, 1), np.float32), "temperatures": np.full((draws, 1), 0.8, np.float32),
              "top_ks": np.full((draws, 1), 8, np.int32), "top_ps": np.full((draws, 1), 0.9, np.float32),
              "min_ps": np.full((draws, 1), 0.02, np.float32)}
    logits, last, positions, inputs = decode_inputs(rng, draws, params)
    logits[:] = logits[0]
    inputs["past_repetition_penalty_buffer"][:] = False
    inputs["past_presence_penalty_buffer"][:] = False
    got = decode_sampler.run(logits, last, positions, None, inputs)
    tokens = got["next_tokens"][:, 0, 0]
    _, _, probs = reference_sample(logits[0, 0], np.zeros(VOCAB, bool), np.zeros(VOCAB, bool), temperature=0.8,
                                   top_k=8, top_p=0.9, min_p=0.02, repetition=1.0, presence=0.0,
                                   random_numbers=inputs["random_numbers"][0])
    counts = np.bincount(tokens, minlength=VOCAB)
    support = probs > 0
    assert 2 <= support.sum() <= 8
    assert counts[~support].sum() == 0
    sigma = np.sqrt(draws * probs * (1 - probs))
    assert np.all(np.abs(counts - draws * probs) <= 5 * sigma + 1), (counts[support], (draws * probs)[support])
    np.testing.assert_allclose(got["probs"][0, 0], probs, atol=1e-6)  # return_pdfs gives that distribution


def test_penalty_buffers_track_prompt_and_output_per_slot() -> None:
    """Continuous batching, 4 slots: a prompt chunk at position 0 clears its slot's masks and marks
    the prompt in the repetition mask; a later chunk adds to it; a decode step marks the fed token
    in both; padding marks nothing; other slots are left alone."""
    lowered = lowered_sampler(SamplerOptions(max_top_k_ids=WIDTH), continuous_batching=True)
    ones = lambda rows, value, dtype=np.float32: np.full((rows, 1), value, dtype)  # noqa: E731
    params = lambda rows: {"repetition_penalties": ones(rows, 1.0), "presence_penalties": ones(rows, 0.0),  # noqa: E731
                           "temperatures": ones(rows, 0.0), "top_ks": ones(rows, 0, np.int32),
                           "top_ps": ones(rows, 1.0), "min_ps": ones(rows, 0.0),
                           "random_numbers": np.full((rows, WIDTH), 0.5, np.float32)}
    repetition = np.zeros((4, VOCAB), bool)
    presence = np.zeros((4, VOCAB), bool)
    repetition[2, 60] = presence[2, 61] = True   # left over from the slot's previous sequence
    repetition[0, 50] = presence[0, 51] = True   # another sequence, decoding in slot 0
    expected_rep, expected_pres = repetition.copy(), presence.copy()

    def step(ids, positions, batch_index, rep, pres):
        rows = ids.shape[0]
        inputs = {"last_accepted_output_tokens": ids, "past_repetition_penalty_buffer": rep,
                  "past_presence_penalty_buffer": pres, **params(rows)}
        args = (np.zeros((rows, 1, VOCAB), np.float32), ids, positions, batch_index, inputs)
        out = lowered.run(*args)
        eager = lowered.fn(*args)
        for key in ("past_repetition_penalty_buffer_RetainedState", "past_presence_penalty_buffer_RetainedState"):
            np.testing.assert_array_equal(out[key], eager[key])
        return out["past_repetition_penalty_buffer_RetainedState"], out["past_presence_penalty_buffer_RetainedState"]

    rep, pres = step(np.array([[5, 6, 7, 9]]), np.array([[0, 1, 2, 3]]), np.array([[2]]), repetition, presence)
    expected_rep[2] = False
    expected_rep[2, [5, 6, 7, 9]] = True
    expected_pres[2] = False
    np.testing.assert_array_equal(rep, expected_rep)
    np.testing.assert_array_equal(pres, expected_pres)

    rep, pres = step(np.array([[11, 12, 3, 4]]), np.array([[4, 5, -1, -1]]), np.array([[2]]), rep, pres)
    expected_rep[2, [11, 12]] = True
    np.testing.assert_array_equal(rep, expected_rep)
    np.testing.assert_array_equal(pres, expected_pres)

    rep, pres = step(np.array([[20], [21], [22], [23]]), np.array([[9], [-1], [6], [-1]]),
                     np.array([[0], [1], [2], [3]]), rep, pres)
    expected_rep[0, 20] = expected_pres[0, 20] = True
    expected_rep[2, 22] = expected_pres[2, 22] = True
    np.testing.assert_array_equal(rep, expected_rep)
    np.testing.assert_array_equal(pres, expected_pres)


def test_sampler_inputs_follow_qefficients_table() -> None:
    specs = sampler_input_specs("batch_size", "seq_len", "full_batch_size", VOCAB, SamplerOptions(max_top_k_ids=WIDTH))
    assert tuple(specs) == SAMPLER_INPUTS
    table = {name: (str(spec.dtype), tuple(map(str, spec.shape))) for name, spec in specs.items()}
    assert table == {
        "last_accepted_output_tokens": ("int64", ("batch_size", "seq_len")),
        "past_repetition_penalty_buffer": ("bool", ("full_batch_size", str(VOCAB))),
        "repetition_penalties": ("float32", ("batch_size", "1")),
        "past_presence_penalty_buffer": ("bool", ("full_batch_size", str(VOCAB))),
        "presence_penalties": ("float32", ("batch_size", "1")),
        "temperatures": ("float32", ("batch_size", "1")),
        "top_ks": ("int32", ("batch_size", "1")),
        "top_ps": ("float32", ("batch_size", "1")),
        "min_ps": ("float32", ("batch_size", "1")),
        "random_numbers": ("float32", ("batch_size", str(WIDTH)))}
