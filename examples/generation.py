"""Generation the way QEfficient's runtime drives an export (docs/architecture.md, "Cloud AI 100
conventions" and "Serving interfaces").

An `Executable` is one exported model as the device sees it: named inputs and outputs, the retained
state (every input X with an output X_RetainedState) fed back from one call to the next, and the
specializations it was compiled for. Every call is checked against them, as the device refuses a
shape it has no program for, so whatever runs here runs on the accelerator.

A `Decoder` drives one executable, or a prefill-only and a decode-only one (disaggregated serving,
the prefill's retained state handed to the decode model as it is):
- prefill in chunks of the prefill length (padding positions -1), then one token per decode step;
  with continuous batching each prompt is prefilled into a free cache slot (`batch_index`) and all
  slots decode together, a slot refilled with the next prompt as soon as its sequence is done;
- compute-context length: each call feeds the `comp_ctx_lengths` array of the smallest bucket that
  covers its largest position (recomputed for every call, so a batch moves down again when a long
  sequence finishes); a prompt chunk that no prefill bucket covers (QEfficient's ctx_len - 32 hole,
  lowering/side_files.py) goes through the decode entries one token at a time instead;
- speculative decoding against a target export (`num_logits_to_keep`): a draft export or prompt
  lookup proposes up to K tokens, the target checks them in one call, and the longest prefix equal
  to the target's own greedy tokens is accepted, plus the target's next token;
- on-device sampling: the sampler's inputs are fed per row (random numbers from a seeded generator),
  and the tokens come from `next_tokens`.

`generate`/`prefill` over a `Step` (`step(input_ids, position_ids, cache, batch_index) -> (logits,
cache)`, from `onnx_step` or `eager_step`) are the plain greedy loop on the same machinery.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from qtrace.errors import QtraceError

RETAINED = "_RetainedState"
Step = Callable[[np.ndarray, np.ndarray, dict[str, np.ndarray], Any], tuple[np.ndarray, dict[str, np.ndarray]]]
Layout = dict[str, tuple[tuple[Any, ...], np.dtype]]  # input name -> (dims, symbolic ones by name; dtype)
CacheLayout = Layout
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


class GenerationError(QtraceError, ValueError):
    """An export cannot serve the request (names the export, the shapes or the flags)."""


def onnx_session(model_dir: str, threads: int | None = None) -> Any:
    from qtrace.lowering.session import inference_session

    return inference_session(os.path.join(model_dir, "model.onnx"), threads=threads)


def onnx_step(session: Any) -> Step:
    output_names = [o.name for o in session.get_outputs()]

    def step(input_ids, position_ids, cache, batch_index=None):
        feeds = {"input_ids": input_ids, "position_ids": position_ids, **cache}
        if batch_index is not None:
            feeds["batch_index"] = batch_index
        outputs = dict(zip(output_names, session.run(None, feeds)))
        new_cache = {name[:-len(RETAINED)]: value for name, value in outputs.items() if name.endswith(RETAINED)}
        return outputs["logits"], new_cache

    return step


def eager_step(fn: Callable[..., dict[str, Any]]) -> Step:
    """`fn(input_ids, position_ids, cache[, batch_index])` is the model function run on numpy."""

    def step(input_ids, position_ids, cache, batch_index=None):
        args = (input_ids, position_ids, cache) + ((batch_index,) if batch_index is not None else ())
        outputs = fn(*args)
        return outputs["logits"], {k: v for k, v in outputs.items() if k != "logits"}

    return step


def cache_layout(session: Any) -> CacheLayout:
    """The cache inputs of an exported model: name -> (dims, symbolic ones by name; dtype)."""
    return {i.name: (tuple(i.shape), np.dtype(_ORT_DTYPES[i.type]))
            for i in session.get_inputs() if i.name.startswith("past_")}


def model_cache_layout(model: Any, full_batch_size: bool = False) -> CacheLayout:
    """The same for a zoo model run eagerly (dims named as the export names them)."""
    batch = "full_batch_size" if full_batch_size else "batch_size"
    return {f"past_{kind}.{i}": (model.cache_shape(i, batch, "ctx_len"), model.dtype)
            for i in range(model.cfg.num_hidden_layers) for kind in ("key", "value")}


def _resolve(dims: Sequence[Any], sizes: dict[str, int], what: str) -> tuple[int, ...]:
    try:
        return tuple(d if isinstance(d, int) else int(sizes[d]) for d in dims)
    except KeyError as exc:
        raise GenerationError(f"{what}: no size for its symbolic dim {exc.args[0]}") from None


def new_cache(layout: Layout, batch: int, ctx_len: int, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Zero state for `batch` rows (or slots) and `ctx_len` positions; other symbolic dims from `sizes`."""
    known = {"batch_size": batch, "full_batch_size": batch, "ctx_len": ctx_len, **(sizes or {})}
    return {name: np.zeros(_resolve(dims, known, name), dtype) for name, (dims, dtype) in layout.items()}


# -- the exported model as the device sees it -------------------------------------------------------------


@dataclass(frozen=True)
class Specialization:
    name: str
    symbols: dict[str, int]


def read_specializations(model_dir: str) -> list[Specialization]:
    path = os.path.join(model_dir, "specializations.json")
    try:
        with open(path) as f:
            entries = json.load(f)["specializations"]
        return [Specialization(e["name"], {k: int(v) for k, v in e["symbols"].items()}) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GenerationError(f"{path}: not a readable specializations file ({exc})") from None


class Executable:
    """One exported model: `run(feeds) -> outputs` by name, its inputs' layout, its specializations
    (None: any shape; used for models run without side files)."""

    def __init__(self, run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], inputs: Layout,
                 outputs: Sequence[str], specializations: Sequence[Specialization] | None = None,
                 name: str = "model", sizes: dict[str, int] | None = None):
        self.run, self.inputs, self.outputs = run, dict(inputs), list(outputs)
        self.specializations = None if specializations is None else list(specializations)
        self.name = name
        self.sizes = dict(sizes or (self.specializations[0].symbols if self.specializations else {}))
        self.state_names = [n for n in self.inputs if n + RETAINED in self.outputs]

    @classmethod
    def load(cls, model_dir: str, threads: int | None = None) -> "Executable":
        """An export directory on onnxruntime (`threads`: its thread pools' size), with its
        specializations.json."""
        if not os.path.isfile(os.path.join(model_dir, "model.onnx")):
            raise GenerationError(f"{model_dir}: no model.onnx (not a qtrace export directory)")
        specs = read_specializations(model_dir)
        session = onnx_session(model_dir, threads)
        names = [o.name for o in session.get_outputs()]
        inputs = {i.name: (tuple(i.shape), np.dtype(_ORT_DTYPES[i.type])) for i in session.get_inputs()}
        return cls(lambda feeds: dict(zip(names, session.run(None, feeds))), inputs, names, specs, model_dir)

    @classmethod
    def from_step(cls, step: Step, layout: Layout, batch_index: bool = False,
                  sizes: dict[str, int] | None = None) -> "Executable":
        """A Step (its logits and cache) under the export's names; `sizes` resolves the layout's
        symbolic dims other than the batch (ctx_len, ...)."""
        ids = (("batch_size", "seq_len"), np.dtype(np.int64))
        inputs: Layout = {"input_ids": ids, "position_ids": ids, **layout}
        if batch_index:
            inputs["batch_index"] = (("batch_size", 1), np.dtype(np.int64))

        def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            logits, cache = step(feeds["input_ids"], feeds["position_ids"], {k: feeds[k] for k in layout},
                                 feeds.get("batch_index"))
            return {"logits": logits, **{k + RETAINED: v for k, v in cache.items()}}

        return cls(run, inputs, ["logits", *(k + RETAINED for k in layout)], sizes=sizes)

    def has_input(self, name: str) -> bool:
        return name in self.inputs

    def entries(self, **symbols: int) -> list[Specialization]:
        """The specializations whose symbols include these values."""
        return [s for s in self.specializations or () if all(s.symbols.get(k) == v for k, v in symbols.items())]

    def symbol(self, name: str) -> int | None:
        values = {s.symbols[name] for s in self.specializations or () if name in s.symbols}
        return max(values) if values else None

    def matching(self, feeds: dict[str, np.ndarray]) -> Specialization | None:
        """The first specialization all of whose symbolic dims the feeds' shapes take."""
        for spec in self.specializations or ():
            if all(self._fits(name, np.shape(value), spec.symbols) for name, value in feeds.items()):
                return spec
        return None

    def _fits(self, name: str, shape: tuple[int, ...], symbols: dict[str, int]) -> bool:
        dims = self.inputs[name][0]
        return len(dims) == len(shape) and all(
            (d == s) if isinstance(d, int) else symbols.get(d) == s for d, s in zip(dims, shape))

    def new_state(self, rows: int, sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        known = {**self.sizes, **(sizes or {})}
        known["batch_size"] = known["full_batch_size"] = rows
        return {n: np.zeros(_resolve(self.inputs[n][0], known, f"{self.name}: input {n}"), self.inputs[n][1])
                for n in self.state_names}

    def __call__(self, feeds: dict[str, np.ndarray], state: dict[str, np.ndarray]) -> tuple[dict, dict]:
        feeds = {**feeds, **state}
        unknown = sorted(set(feeds) - set(self.inputs))
        missing = sorted(set(self.inputs) - set(feeds))
        if unknown or missing:
            raise GenerationError(f"{self.name}: inputs {missing} missing, {unknown} unknown")
        feeds = {k: np.asarray(v, dtype=self.inputs[k][1]) for k, v in feeds.items()}
        if self.specializations is not None and self.matching(feeds) is None:
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items() if k not in self.state_names)
            raise GenerationError(f"{self.name}: no specialization accepts {shapes} "
                                  f"(compiled: {[s.name for s in self.specializations]})")
        outputs = self.run(feeds)
        new_state = {n: outputs.pop(n + RETAINED) for n in self.state_names}
        return outputs, new_state


def check_handoff(prefill: Executable, decode: Executable) -> None:
    """The decode model must take the prefill model's retained state as it is: the same names,
    dtypes and dims (symbols resolved by each one's specializations)."""
    if prefill.state_names != decode.state_names:
        raise GenerationError(f"{decode.name} keeps state {decode.state_names}, {prefill.name} hands over "
                              f"{prefill.state_names}")
    for name in prefill.state_names:
        a, b = prefill.inputs[name], decode.inputs[name]
        sizes_a = prefill.specializations[0].symbols if prefill.specializations else {}
        sizes_b = decode.specializations[0].symbols if decode.specializations else {}
        dims_a = tuple(sizes_a.get(d, d) if d not in ("batch_size", "full_batch_size") else "rows" for d in a[0])
        dims_b = tuple(sizes_b.get(d, d) if d not in ("batch_size", "full_batch_size") else "rows" for d in b[0])
        if a[1] != b[1] or dims_a != dims_b:
            raise GenerationError(f"retained state {name}: {prefill.name} writes {a[1].name}{list(dims_a)}, "
                                  f"{decode.name} reads {b[1].name}{list(dims_b)}")
    rows_a, rows_b = prefill.symbol("full_batch_size"), decode.symbol("full_batch_size")
    if rows_a != rows_b:
        raise GenerationError(f"{prefill.name} has full_batch_size {rows_a}, {decode.name} {rows_b}")


# -- sampling parameters -----------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    """What `qtrace generate --temperature ... --seed ...` feeds the on-device sampler (every row alike).
    temperature 0 is greedy; top_k 0 means all `max_top_k_ids` candidates."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    seed: int = 0

    def feeds(self, rows: int, width: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        column = lambda value, dtype=np.float32: np.full((rows, 1), value, dtype)  # noqa: E731
        return {"repetition_penalties": column(self.repetition_penalty),
                "presence_penalties": column(self.presence_penalty), "temperatures": column(self.temperature),
                "top_ks": column(self.top_k, np.int32), "top_ps": column(self.top_p), "min_ps": column(self.min_p),
                "random_numbers": rng.random((rows, width), dtype=np.float32)}

    @property
    def random(self) -> bool:
        return self.temperature != 0


# -- decoding ------------------------------------------------------------------------------------------------


@dataclass
class Lane:
    """One sequence in a decode batch: its cache row (slot), the next position and token to feed."""

    prompt_index: int
    slot: int
    position: int
    last: int
    tokens: list[int] = field(default_factory=list)


@dataclass
class SpeculationStats:
    proposed: int = 0
    accepted: int = 0
    target_calls: int = 0
    tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


class Decoder:
    """Prefill and decode with one export, or a prefill-only and a decode-only export (see the module
    docstring). prefill_len, ctx_len and full_batch_size come from the specializations; a model
    without them (a Step) needs them given."""

    def __init__(self, model: Executable, decode_model: Executable | None = None, *, prefill_len: int | None = None,
                 ctx_len: int | None = None, full_batch_size: int | None = None,
                 sampling: SamplingParams | None = None, reuse_prefixes: bool | None = None):
        self.prefill_model, self.decode_model = model, decode_model or model
        if decode_model is not None:
            check_handoff(model, decode_model)
        prefill_entries = [s for s in model.specializations or () if s.name.startswith("Prefill")]
        if model.specializations is not None and not prefill_entries:
            raise GenerationError(f"{model.name} is a decode-only export: give the prefill export first "
                                  "(qtrace generate PREFILL_OUT --decode-model DECODE_OUT)")
        self.prefill_len = prefill_len or max(s.symbols["seq_len"] for s in prefill_entries)
        self.ctx_len = ctx_len or model.symbol("ctx_len")
        self.full_batch_size = full_batch_size if model.specializations is None else model.symbol("full_batch_size")
        # Continuous batching: full_batch_size cache slots; the decode entries' batch_size lanes decode
        # together. More slots than lanes is prefix caching: a finished sequence's slot keeps its keys
        # and values, and a new prompt sharing a prefix with them prefills only the rest.
        decode_entries = [s for s in self.decode_model.specializations or () if not s.name.startswith("Prefill")]
        self.lanes = min((s.symbols["batch_size"] for s in decode_entries), default=self.full_batch_size) \
            if self.full_batch_size else None
        self.reuse_prefixes = bool(self.full_batch_size and self.lanes < self.full_batch_size) \
            if reuse_prefixes is None else reuse_prefixes
        self.reused_tokens = 0  # prompt tokens not prefilled because a slot held them
        self._kept_slots: tuple[list[dict], dict[int, list[int]]] | None = None
        self.batch_size = 1 if model.specializations is None or self.full_batch_size else \
            min(s.symbols["batch_size"] for s in prefill_entries)
        self.sampler = model.has_input("random_numbers")
        if (sampling is not None and sampling != SamplingParams()) and not self.sampler:
            raise GenerationError(f"{model.name} has no on-device sampler: export it with --sampling to sample "
                                  "(without sampling options generation is greedy)")
        self.sampling = sampling or SamplingParams()
        self.rng = np.random.default_rng(self.sampling.seed)
        # a prefill-only export cannot continue (a seq_len 1 "Prefill" entry, QEfficient's decode-only form, can)
        self.can_decode = self.decode_model.specializations is None or any(
            not s.name.startswith("Prefill") or s.symbols["seq_len"] == 1 for s in self.decode_model.specializations)

    # -- one call ---------------------------------------------------------------------------------------
    @staticmethod
    def _bucket(model: Executable, seq_len: int, rows: int, keep: int, needed: int) -> int | None | bool:
        """The comp_ctx_lengths bucket for a call (None without CCL, False when none covers `needed`)."""
        if not model.has_input("comp_ctx_lengths"):
            return None
        want = {"seq_len": seq_len, "batch_size": rows}
        if model.has_input("num_logits_to_keep"):
            want["num_logits_to_keep"] = keep
        buckets = sorted(s.symbols["comp_ctx_lengths"] for s in model.entries(**want))
        return next((b for b in buckets if b >= needed), False)

    def call(self, model: Executable, ids: np.ndarray, positions: np.ndarray, state: dict, slots: np.ndarray | None,
             keep: int = 1) -> tuple[dict, dict]:
        """One model call over rows (ids/positions [R,S]); adds batch_index, the CCL bucket,
        num_logits_to_keep and the sampler inputs the model takes."""
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "position_ids": positions}
        rows, seq_len = ids.shape
        bucket = self._bucket(model, seq_len, rows, keep, int(positions.max()) + 1)
        if bucket is False:
            raise GenerationError(f"{model.name}: no comp_ctx_lengths bucket covers position {int(positions.max())}")
        if bucket is not None:
            feeds["comp_ctx_lengths"] = np.zeros(bucket, np.int64)
        if model.has_input("batch_index"):
            feeds["batch_index"] = np.asarray(slots, np.int64).reshape(-1, 1)
        if model.has_input("num_logits_to_keep"):
            feeds["num_logits_to_keep"] = np.zeros((keep, 1), np.int64)
        if model.has_input("random_numbers"):
            feeds["last_accepted_output_tokens"] = ids
            feeds.update(self.sampling.feeds(rows, model.inputs["random_numbers"][0][1], self.rng))
        return model(feeds, state)

    @staticmethod
    def choices(outputs: dict) -> np.ndarray:
        """The next token after each kept position, [R, N]: the sampler's, or the greedy argmax."""
        if "next_tokens" in outputs:
            return outputs["next_tokens"][..., 0]
        return np.argmax(outputs["logits"], axis=-1)

    # -- prefill --------------------------------------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], state: dict, slot: int | None = None,
                record: Callable[[dict], None] | None = None, start: int = 0) -> tuple[list[int], dict]:
        """Feed the prompts (one per row; with continuous batching one prompt into cache slot `slot`)
        in chunks; returns each row's first generated token and the state. start > 0 (one prompt):
        positions before it are already in the slot (a cached prefix); only the rest is fed."""
        if any(not p for p in prompts):
            raise GenerationError("a prompt is empty")
        if start:
            if len(prompts) != 1 or not 0 < start < len(prompts[0]):
                raise GenerationError(f"a cached prefix of {start} tokens needs one longer prompt")
            return self._prefill_rest(prompts[0], state, slot, record, start)
        P = self.prefill_len
        chunks = max((len(p) + P - 1) // P for p in prompts)
        slots = None if slot is None else np.array([slot])
        first: list[int] = [0] * len(prompts)
        for c in range(chunks):
            ids = np.zeros((len(prompts), P), np.int64)
            positions = np.full((len(prompts), P), -1, np.int64)
            for r, prompt in enumerate(prompts):
                part = prompt[c * P:(c + 1) * P]
                ids[r, :len(part)] = part
                positions[r, :len(part)] = np.arange(c * P, c * P + len(part))
            if positions.max() < 0:
                continue
            if self._bucket(self.prefill_model, P, len(prompts), 1, int(positions.max()) + 1) is False:
                outputs, state = self._prefill_by_decode(ids, positions, state, slots)
            else:
                outputs, state = self.call(self.prefill_model, ids, positions, state, slots)
            if record is not None:
                record(outputs)
            chosen = self.choices(outputs)[:, -1]
            for r, prompt in enumerate(prompts):
                if c * P < len(prompt) <= (c + 1) * P:
                    first[r] = int(chosen[r])
        return first, state

    def _prefill_rest(self, prompt: list[int], state: dict, slot: int | None, record: Callable[[dict], None] | None,
                      start: int) -> tuple[list[int], dict]:
        """Prefill prompt[start:] at its own positions (chunks of prefill_len from `start`)."""
        P = self.prefill_len
        slots = None if slot is None else np.array([slot])
        first = 0
        for chunk in range(start, len(prompt), P):
            part = prompt[chunk:chunk + P]
            ids = np.zeros((1, P), np.int64)
            positions = np.full((1, P), -1, np.int64)
            ids[0, :len(part)] = part
            positions[0, :len(part)] = np.arange(chunk, chunk + len(part))
            if self._bucket(self.prefill_model, P, 1, 1, int(positions.max()) + 1) is False:
                outputs, state = self._prefill_by_decode(ids, positions, state, slots)
            else:
                outputs, state = self.call(self.prefill_model, ids, positions, state, slots)
            if record is not None:
                record(outputs)
            first = int(self.choices(outputs)[0, -1])
        return [first], state

    def _prefill_by_decode(self, ids: np.ndarray, positions: np.ndarray, state: dict,
                           slots: np.ndarray | None) -> tuple[dict, dict]:
        """A prompt chunk no prefill bucket covers, fed one token per call through the decode entries
        (which reach ctx_len). Exact for greedy decoding; the sampler would count these prompt
        tokens as generated ones, so it is refused there."""
        if self.sampler:
            raise GenerationError(f"the prompt reaches past the largest prefill comp_ctx_lengths bucket of "
                                  f"{self.prefill_model.name}; with the on-device sampler it cannot be fed by decode "
                                  "steps: export with a prefill bucket of ctx_len (e.g. --prefill-only or "
                                  "--comp-ctx-lengths-prefill without the decode list)")
        rows = ids.shape[0]
        decode_rows = self._decode_rows() if slots is not None else rows
        width = min((s.symbols["seq_len"] for s in self.decode_model.specializations or ()
                     if not s.name.startswith("Prefill")), default=1)
        last: dict = {}
        outputs = None
        for column in range(ids.shape[1]):
            if positions[:, column].max() < 0:
                continue
            step_ids = np.zeros((decode_rows, width), np.int64)
            step_pos = np.full((decode_rows, width), -1, np.int64)
            step_ids[:rows, 0], step_pos[:rows, 0] = ids[:, column], positions[:, column]
            step_slots = None if slots is None else self._row_slots(list(slots), decode_rows)
            outputs, state = self.call(self.decode_model, step_ids, step_pos, state, step_slots, keep=width)
            for r in range(rows):
                if positions[r, column] >= 0:
                    last[r] = {k: v[r:r + 1, :1] if v.ndim == 3 else v[r:r + 1] for k, v in outputs.items()}
        assert outputs is not None
        return {k: np.concatenate([last[r][k] for r in range(rows)]) for k in outputs}, state

    # -- decode ---------------------------------------------------------------------------------------------
    def decode_call(self, model: Executable, lanes: Sequence[Lane | None], width: int, state: dict,
                    inputs: Callable[[int, Lane], list[int]] | None = None) -> tuple[np.ndarray, dict, dict]:
        """One decode call of `width` tokens per row; row r is lanes[r] (None: idle, positions -1).
        inputs(r, lane) gives row r's tokens (default: the lane's last one); positions start at
        lane.position."""
        rows = len(lanes)
        ids = np.zeros((rows, width), np.int64)
        positions = np.full((rows, width), -1, np.int64)
        for r, lane in enumerate(lanes):
            if lane is None:
                continue
            tokens = inputs(r, lane) if inputs is not None else [lane.last]
            ids[r, :len(tokens)] = tokens
            positions[r, :len(tokens)] = np.arange(lane.position, lane.position + len(tokens))
        slots = None
        if self.full_batch_size:
            slots = self._row_slots([None if lane is None else lane.slot for lane in lanes], rows, row_default=True)
        outputs, state = self.call(model, ids, positions, state, slots, keep=width)
        return self.choices(outputs), outputs, state

    def _row_slots(self, slots: list[int | None], rows: int, row_default: bool = False) -> np.ndarray:
        """batch_index for `rows` rows whose first len(slots) rows read and write those cache slots
        (None: idle). An idle row writes nothing (its positions are -1); it still names a slot, one no
        busy row uses (its own row number when that is free, as with one slot per lane)."""
        slots = list(slots) + [None] * (rows - len(slots))
        busy = {s for s in slots if s is not None}
        spare = iter([s for s in range(self.full_batch_size) if s not in busy])
        out = []
        for r, slot in enumerate(slots):
            if slot is None:
                slot = r if row_default and r not in busy and r < self.full_batch_size else next(spare, 0)
                busy.add(slot)
            out.append(slot)
        return np.array(out, np.int64)

    def _decode_rows(self) -> int:
        return self.lanes or self.batch_size

    def generate(self, prompts: list[list[int]], max_new_tokens: int,
                 record: Callable[[str, dict], None] | None = None,
                 on_tokens: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """Greedy (or sampled) tokens for each prompt: prefill, then one token per step.
        on_tokens(prompt_index, new_tokens) sees each prompt's tokens as they come (to show them
        while generating); returning True ends that prompt's sequence there."""
        if self.decode_model.has_input("num_logits_to_keep") and self.decode_model.specializations is not None and \
                0 not in self.speculative_lengths():
            raise GenerationError(f"{self.decode_model.name} is a speculative-decoding target compiled for K = "
                                  f"{self.speculative_lengths()} only: give a proposer (--draft or --prompt-lookup), "
                                  "or export with K 0 too for single-token steps")
        return self._run(prompts, max_new_tokens, self._plain_round, record, on_tokens=on_tokens)

    def _check_lengths(self, prompts: list[list[int]], max_new_tokens: int, lookahead: int = 0) -> None:
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        for prompt in prompts:
            if len(prompt) + max_new_tokens + lookahead > self.ctx_len:
                raise GenerationError(f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new ones"
                                      + (f" and {lookahead} proposals" if lookahead else "")
                                      + f" exceeds ctx_len {self.ctx_len}")
        if max_new_tokens > 1 and not self.can_decode:
            raise GenerationError(f"{self.decode_model.name} is a prefill-only export: give the decode export "
                                  "too (--decode-model DECODE_OUT)")

    def _run(self, prompts: list[list[int]], max_new_tokens: int, round_fn: Callable[..., Any],
             record: Callable[[str, dict], None] | None, lookahead: int = 0, companions: Sequence["Decoder"] = (),
             on_tokens: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
        """Schedule prompts onto lanes (groups of batch_size rows, or refilled cache slots) and call
        round_fn(lanes, states) until every prompt has max_new_tokens tokens (or on_tokens ends it)."""
        self._check_lengths(prompts, max_new_tokens, lookahead)
        results: list[list[int]] = [[] for _ in prompts]
        rows = self._decode_rows()
        decoders = [self, *companions]
        shown = [0] * len(prompts)  # tokens of each prompt handed to on_tokens so far

        def rec(kind: str) -> Callable[[dict], None]:
            return (lambda outputs: record(kind, outputs)) if record else (lambda outputs: None)

        def finish(lane: Lane) -> bool:
            done = len(lane.tokens) >= max_new_tokens
            new = lane.tokens[shown[lane.prompt_index]:max_new_tokens]
            if on_tokens is not None and new:
                shown[lane.prompt_index] += len(new)
                done = bool(on_tokens(lane.prompt_index, new)) or done
            if done:
                results[lane.prompt_index] = lane.tokens[:max_new_tokens]
            return done

        if self.full_batch_size:
            # With prefix reuse the slots (their caches and what they hold) outlive a call, as on a server.
            kept = self._kept_slots if self.reuse_prefixes and not companions else None
            states = kept[0] if kept else [d.prefill_model.new_state(self.full_batch_size) for d in decoders]
            held: dict[int, list[int]] = kept[1] if kept else {}  # slot -> the tokens whose keys/values it holds
            pending = list(range(len(prompts)))
            lanes: list[Lane | None] = [None] * rows
            free_rows = list(range(rows))[::-1]
            free_slots = list(range(self.full_batch_size))[::-1]  # reverse: batch_index is not the row order

            def release(lane: Lane, row: int) -> None:
                held[lane.slot] = (prompts[lane.prompt_index] + lane.tokens)[:lane.position]
                free_rows.append(row)
                free_slots.append(lane.slot)

            while pending or any(lanes):
                while pending and free_rows:
                    index, row = pending.pop(0), free_rows.pop(0)
                    slot, start = self._slot_for(prompts[index], free_slots, held)
                    free_slots.remove(slot)
                    self.reused_tokens += start
                    token = None
                    for k, d in enumerate(decoders):
                        (first,), states[k] = d.prefill([prompts[index]], states[k], slot=slot, start=start,
                                                        record=rec("prefill") if k == 0 else None)
                        token = first if token is None else token
                    lane = Lane(index, slot, len(prompts[index]), token, [token])
                    if finish(lane):
                        release(lane, row)
                    else:
                        lanes[row] = lane
                if not any(lanes):
                    continue
                states = round_fn(lanes, states, rec)
                for row, lane in enumerate(lanes):
                    if lane is not None and finish(lane):
                        lanes[row] = None
                        release(lane, row)
            if self.reuse_prefixes and not companions:
                self._kept_slots = (states, held)
            return results

        for start in range(0, len(prompts), rows):
            group = list(range(start, min(start + rows, len(prompts))))
            batch = [prompts[i] for i in group] + [prompts[group[0]]] * (rows - len(group))  # pad the last group
            states, firsts = [], None
            for k, d in enumerate(decoders):
                tokens, state = d.prefill(batch, d.prefill_model.new_state(rows), record=rec("prefill") if k == 0 else None)
                states.append(state)
                firsts = tokens if firsts is None else firsts
            lanes = [Lane(i, r, len(prompts[i]), firsts[r], [firsts[r]]) for r, i in enumerate(group)]
            lanes += [None] * (rows - len(group))
            lanes = [None if lane is None or finish(lane) else lane for lane in lanes]
            while any(lanes):
                states = round_fn(lanes, states, rec)
                lanes = [None if lane is None or finish(lane) else lane for lane in lanes]
        return results

    def _slot_for(self, prompt: list[int], free_slots: list[int], held: dict[int, list[int]]) -> tuple[int, int]:
        """A free cache slot for the prompt and how many of its first tokens that slot already holds
        (with prefix reuse: the free slot sharing the longest prefix, at least one token left to feed)."""
        # without a shared prefix: a slot that holds nothing, so cached prefixes live longer
        best, best_shared = next((s for s in free_slots if s not in held), free_slots[0]), 0
        if self.reuse_prefixes:
            for slot in free_slots:
                tokens = held.get(slot, [])
                shared = 0
                while shared < min(len(tokens), len(prompt) - 1) and tokens[shared] == prompt[shared]:
                    shared += 1
                if shared > best_shared:
                    best, best_shared = slot, shared
        return best, best_shared

    def _plain_round(self, lanes: list[Lane | None], states: list[dict], rec: Callable) -> list[dict]:
        chosen, outputs, states[0] = self.decode_call(self.decode_model, lanes, 1, states[0])
        rec("decode")(outputs)
        for r, lane in enumerate(lanes):
            if lane is not None:
                lane.position += 1
                lane.last = int(chosen[r, 0])
                lane.tokens.append(lane.last)
        return states

    # -- speculative decoding -------------------------------------------------------------------------------
    def speculative_lengths(self) -> list[int]:
        """The proposal lengths K the target was compiled for (decode entries of seq_len K+1)."""
        if not self.decode_model.has_input("num_logits_to_keep"):
            raise GenerationError(f"{self.decode_model.name} is not a speculative-decoding target: export it with "
                                  "--num-speculative-tokens K")
        return sorted({s.symbols["seq_len"] - 1 for s in self.decode_model.specializations or ()
                       if not s.name.startswith("Prefill")})

    def speculate(self, prompts: list[list[int]], max_new_tokens: int, *, draft: "Decoder | None" = None,
                  prompt_lookup: int | None = None, record: Callable[[str, dict], None] | None = None,
                  on_tokens: Callable[[int, list[int]], bool] | None = None
                  ) -> tuple[list[list[int]], SpeculationStats]:
        """Greedy speculative decoding with this target: the draft decoder proposes K tokens (K the
        largest compiled), or prompt lookup proposes up to K tokens that followed an earlier
        occurrence of the last n-gram (n <= prompt_lookup); the target keeps the longest prefix it
        agrees with. The tokens are the target's own greedy tokens."""
        if self.sampler:
            raise GenerationError("speculative decoding is greedy: the target must not hold the on-device sampler")
        if (draft is None) == (prompt_lookup is None):
            raise GenerationError("speculative decoding needs a draft model or prompt lookup (one of them)")
        lengths = self.speculative_lengths()
        if max(lengths) < 1:
            raise GenerationError(f"{self.decode_model.name} was compiled for no proposal length K >= 1")
        if draft is not None and (draft.full_batch_size != self.full_batch_size or
                                  draft._decode_rows() != self._decode_rows()):
            raise GenerationError(f"the draft export has {draft._decode_rows()} decode rows "
                                  f"(full_batch_size {draft.full_batch_size}), the target "
                                  f"{self._decode_rows()} ({self.full_batch_size}): export both alike")
        if draft is not None and draft.decode_model.has_input("num_logits_to_keep") and \
                0 not in draft.speculative_lengths():
            raise GenerationError(f"the draft {draft.decode_model.name} is a target compiled without K 0: a draft "
                                  "decodes one token per call (export it plainly, or with K 0 too)")
        if prompt_lookup is not None and prompt_lookup < 1:
            raise GenerationError(f"--prompt-lookup needs an n-gram size >= 1, got {prompt_lookup}")
        stats = SpeculationStats()
        history = {i: list(p) for i, p in enumerate(prompts)}

        def round_fn(lanes: list[Lane | None], states: list[dict], rec: Callable) -> list[dict]:
            if draft is not None:
                k = max(lengths)
                proposals, states[1] = draft._propose(lanes, k, states[1])
            else:
                proposals = {r: lookup_proposals(history[lane.prompt_index] + lane.tokens, prompt_lookup, max(lengths))
                             for r, lane in enumerate(lanes) if lane is not None}
                need = max(len(p) for p in proposals.values())
                k = next(x for x in lengths if x >= need)
            chosen, outputs, states[0] = self.decode_call(self.decode_model, lanes, k + 1, states[0],
                                                          inputs=lambda r, lane: [lane.last, *proposals[r]])
            rec("verify")(outputs)
            stats.target_calls += 1
            behind: list[int] = []
            for r, lane in enumerate(lanes):
                if lane is None:
                    continue
                proposed = proposals[r]
                accepted = 0
                while accepted < len(proposed) and proposed[accepted] == int(chosen[r, accepted]):
                    accepted += 1
                new = proposed[:accepted] + [int(chosen[r, accepted])]
                stats.proposed += len(proposed)
                stats.accepted += accepted
                stats.tokens += len(new)
                lane.tokens.extend(new)
                lane.position += len(new)
                lane.last = new[-1]
                if draft is not None and accepted == len(proposed):
                    behind.append(r)
            if behind:
                states[1] = draft._catch_up(lanes, proposals, behind, states[1])
            return states

        companions = [draft] if draft is not None else []
        tokens = self._run(prompts, max_new_tokens, round_fn, record, lookahead=max(lengths) + 1,
                           companions=companions, on_tokens=on_tokens)
        return tokens, stats

    def _propose(self, lanes: list[Lane | None], k: int, state: dict) -> tuple[dict[int, list[int]], dict]:
        """K greedy draft tokens per row (K single-token decode calls from each lane's last token)."""
        proposals: dict[int, list[int]] = {r: [] for r, lane in enumerate(lanes) if lane is not None}
        for step in range(k):
            fed = [None if lane is None else Lane(lane.prompt_index, lane.slot, lane.position + step,
                                                  lane.last if step == 0 else proposals[r][-1])
                   for r, lane in enumerate(lanes)]
            chosen, _, state = self.decode_call(self.decode_model, fed, 1, state)
            for r in proposals:
                proposals[r].append(int(chosen[r, 0]))
        return proposals, state

    def _catch_up(self, lanes: list[Lane | None], proposals: dict[int, list[int]], rows: list[int],
                  state: dict) -> dict:
        """Rows whose every proposal was accepted: the draft has not been fed its last proposal yet
        (it sits just before the target's bonus token)."""
        fed = [Lane(lane.prompt_index, lane.slot, lane.position - 1, proposals[r][-1])
               if lane is not None and r in rows else None for r, lane in enumerate(lanes)]
        _, _, state = self.decode_call(self.decode_model, fed, 1, state)
        return state


def lookup_proposals(tokens: Sequence[int], max_ngram: int, count: int) -> list[int]:
    """Prompt-lookup decoding's proposer: for n from max_ngram down to 1, the tokens that followed an
    earlier occurrence of the last n tokens (up to `count` of them, the longest run found; an
    occurrence overlapping the last n-gram itself does not count). [] when nothing matches."""
    best: list[int] = []
    length = len(tokens)
    for n in range(min(max_ngram, length), 0, -1):
        tail = list(tokens[length - n:])
        for start in range(0, length - n):
            follow = start + n
            if follow >= length - n + 1 or list(tokens[start:follow]) != tail:
                continue
            run = list(tokens[follow:follow + count])
            if len(run) > len(best):
                best = run
                if len(best) == count:
                    return best
    return best


# -- the plain greedy loop over a Step ---------------------------------------------------------------------


def prefill(step: Step, prompt: list[int], cache: dict[str, np.ndarray], prefill_len: int,
            slot: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """Feed the prompt in chunks; returns the first generated token and the cache."""
    if not prompt:
        raise ValueError("the prompt is empty")
    model = Executable.from_step(step, {k: (v.shape, v.dtype) for k, v in cache.items()}, batch_index=slot is not None)
    decoder = Decoder(model, prefill_len=prefill_len, ctx_len=max(len(prompt), 1),
                      full_batch_size=None if slot is None else 1)
    (token,), cache = decoder.prefill([prompt], cache, slot=slot)
    return token, cache


def generate(step: Step, prompts: list[list[int]], max_new_tokens: int, *, prefill_len: int, ctx_len: int,
             layout: CacheLayout, full_batch_size: int | None = None,
             sizes: dict[str, int] | None = None) -> list[list[int]]:
    """Greedy tokens for each prompt. Without continuous batching each prompt runs alone (batch 1);
    with it, the prompts are prefilled into cache slots (refilled as sequences finish) and decode
    together. `sizes`: the caches' other symbolic dims (ring caches' lengths, as specializations.json
    gives them)."""
    model = Executable.from_step(step, layout, batch_index=full_batch_size is not None,
                                 sizes={"ctx_len": ctx_len, **(sizes or {})})
    decoder = Decoder(model, prefill_len=prefill_len, ctx_len=ctx_len, full_batch_size=full_batch_size)
    try:
        return decoder.generate(prompts, max_new_tokens)
    except GenerationError as exc:
        raise ValueError(str(exc)) from None
