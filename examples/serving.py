"""Serving modes of an export: what `qtrace export` is asked for beyond a plain prefill/decode pair,
checked before any work, and turned into the step's options and the specializations' arguments.

- compute-context length (CCL): `ccl_enabled` and/or bucket lists for prefill and decode;
- speculative decoding: a target model for proposal lengths `num_speculative_tokens` (K or a list);
- disaggregated serving: `prefill_only` / `decode_only` exports of the same graph, whose retained
  states have one layout, so a decode export consumes a prefill export's outputs as they are;
- on-device sampling: `sampling` (with `max_top_k_ids` candidates and optionally `return_pdfs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from qtrace.errors import QtraceError
from qtrace.lowering.side_files import ccl_lists, speculative_lengths

from .blocks.causal_lm import StepOptions
from .blocks.sampler import SamplerOptions


class ServingError(QtraceError, ValueError):
    """A serving option, or a combination of them, that cannot be exported (names the flags)."""


def _ints(values: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if values is None else tuple(int(v) for v in values)


@dataclass(frozen=True)
class ServingOptions:
    ccl_enabled: bool = False
    comp_ctx_lengths_prefill: tuple[int, ...] | None = None
    comp_ctx_lengths_decode: tuple[int, ...] | None = None
    num_speculative_tokens: tuple[int, ...] | None = None
    prefill_only: bool = False
    decode_only: bool = False
    sampling: bool = False
    max_top_k_ids: int = 512
    return_pdfs: bool = False

    def __post_init__(self) -> None:
        for name in ("comp_ctx_lengths_prefill", "comp_ctx_lengths_decode", "num_speculative_tokens"):
            object.__setattr__(self, name, _ints(getattr(self, name)))

    @property
    def ccl(self) -> bool:
        return self.ccl_enabled or bool(self.comp_ctx_lengths_prefill) or bool(self.comp_ctx_lengths_decode)

    @property
    def phases(self) -> str:
        return "prefill" if self.prefill_only else "decode" if self.decode_only else "both"

    def validate(self, *, ctx_len: int, prefill_seq_len: int, prefill_seq_len_given: bool = False) -> None:
        """Raise ServingError for a bad value or combination (before any model is loaded)."""
        if self.prefill_only and self.decode_only:
            raise ServingError("--prefill-only and --decode-only exclude each other (export each separately)")
        if self.decode_only and prefill_seq_len_given:
            raise ServingError(f"--decode-only exports no prefill specialization, so --prefill-seq-len "
                               f"{prefill_seq_len} has no meaning; drop it")
        if self.decode_only and self.comp_ctx_lengths_prefill:
            raise ServingError("--comp-ctx-lengths-prefill with --decode-only: a decode-only export has no prefill "
                               "buckets")
        if self.prefill_only and self.comp_ctx_lengths_decode:
            raise ServingError("--comp-ctx-lengths-decode with --prefill-only: a prefill-only export has no decode "
                               "buckets")
        for flag, values in (("--comp-ctx-lengths-prefill", self.comp_ctx_lengths_prefill),
                             ("--comp-ctx-lengths-decode", self.comp_ctx_lengths_decode)):
            for value in values or ():
                if value > ctx_len:
                    raise ServingError(f"{flag} {','.join(map(str, values))}: {value} is larger than --ctx-len "
                                       f"{ctx_len}")
                if value < 1:
                    raise ServingError(f"{flag} {','.join(map(str, values))}: {value} is not a positive length")
        ks = self.num_speculative_tokens
        if ks is not None:
            if not ks or min(ks) < 0 or max(ks) < 1:
                raise ServingError(f"--num-speculative-tokens {','.join(map(str, ks)) or '(empty)'}: K must be >= 1 "
                                   "(0 is allowed only next to a larger K, as a single-token fallback, e.g. 0,3)")
            if not self.decode_only and prefill_seq_len < max(ks) + 1:
                raise ServingError(f"--num-speculative-tokens {max(ks)} needs --prefill-seq-len >= {max(ks) + 1} "
                                   f"(got {prefill_seq_len})")
            if max(ks) + 1 > ctx_len:
                raise ServingError(f"--num-speculative-tokens {max(ks)}: K+1 tokens do not fit --ctx-len {ctx_len}")
        if self.sampling:
            if ks is not None:
                raise ServingError("--sampling with --num-speculative-tokens: the on-device sampler does not verify "
                                   "proposals (QEfficient refuses this combination too)")
            if self.max_top_k_ids < 1:
                raise ServingError(f"--max-top-k-ids must be >= 1, got {self.max_top_k_ids}")
            if not self.decode_only and prefill_seq_len == 1:
                raise ServingError("--sampling needs --prefill-seq-len > 1: the sampler tells a prompt chunk from a "
                                   "decode step by its length")
        elif self.return_pdfs:
            raise ServingError("--return-pdfs needs --sampling")
        elif self.max_top_k_ids != 512:
            raise ServingError("--max-top-k-ids needs --sampling")

    def step_options(self, vocab_size: int) -> StepOptions:
        sampler = None
        if self.sampling:
            sampler = SamplerOptions(max_top_k_ids=min(self.max_top_k_ids, vocab_size), return_pdfs=self.return_pdfs)
        return StepOptions(comp_ctx_lengths=self.ccl, num_logits_to_keep=self.num_speculative_tokens is not None,
                           sampler=sampler)

    def specialization_args(self, *, ctx_len: int, prefill_seq_len: int) -> dict[str, Any]:
        """Keyword arguments of lowering.side_files.specializations."""
        args: dict[str, Any] = {"phases": self.phases, "num_speculative_tokens": speculative_lengths(
            list(self.num_speculative_tokens) if self.num_speculative_tokens is not None else None)}
        if self.ccl:
            prefill, decode = ccl_lists(self.comp_ctx_lengths_prefill, self.comp_ctx_lengths_decode, ctx_len,
                                        prefill_seq_len, phases=self.phases)
            args["comp_ctx_lengths_prefill"], args["comp_ctx_lengths_decode"] = prefill, decode
        return args


__all__ = ["ServingError", "ServingOptions"]
