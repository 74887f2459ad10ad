"""The `qtrace` command: demo, export, generate, dump."""

from __future__ import annotations

import argparse
import atexit
import collections
import gc
import importlib.util
import os
import re
import sys
import tempfile
import time
from typing import Any, Sequence

from .errors import FileError, NumericsError, QtraceError, UsageError, user_location


def _progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


class _ProgressBar:
    """A one-line bar on stderr for writing weights (redrawn in place on a terminal, in quarters otherwise)."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.shown = -1

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        step = int(fraction * (40 if self.tty else 4))
        if step == self.shown:
            return
        self.shown = step
        bar = "#" * int(fraction * 30)
        end = "\r" if self.tty and done < total else "\n"
        print(f"  .. weights [{bar:<30}] {fraction:4.0%} of {total / 2**20:.1f} MiB", end=end, file=sys.stderr,
              flush=True)


def _summary(lowered: Any, stages: dict[str, float]) -> str:
    from .lowering import CUSTOM_OP_DOMAINS

    model = lowered.parts.model  # the graph without its weights: counting nodes needs no copy of them
    counts = collections.Counter(n.op_type for n in model.graph.node)
    custom_domains = set(CUSTOM_OP_DOMAINS.values())
    function_nodes = {f.name: len(f.node) for f in model.functions if f.domain not in custom_domains}
    custom = sorted({n.op_type for f in model.functions for n in f.node if n.domain in custom_domains} |
                    {n.op_type for n in model.graph.node if n.domain in custom_domains})
    lines = ["passes:", *("  " + line for line in lowered.pass_report.summary().splitlines()),
             f"main graph: {len(model.graph.node)} nodes: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()),
             "local functions: " + (", ".join(f"{k} ({v} nodes)" for k, v in function_nodes.items()) or "none"),
             "custom ops: " + (", ".join(custom) or "none"),
             "inputs:  " + ", ".join(f"{i.name}" for i in model.graph.input[:6]) +
             (f", ... ({len(model.graph.input)} in all)" if len(model.graph.input) > 6 else ""),
             "outputs: " + ", ".join(f"{o.name}" for o in model.graph.output[:6]) +
             (f", ... ({len(model.graph.output)} in all)" if len(model.graph.output) > 6 else ""),
             "time: " + ", ".join(f"{k} {v:.2f}s" for k, v in stages.items())]
    return "\n".join(lines)


# -- demo -------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from .examples.checkpoint import export_model, random_model
    from .examples.families.llama import tiny_config
    from .examples.generation import cache_layout, eager_step, generate, onnx_session, onnx_step

    model = random_model(tiny_config(), seed=args.seed)
    cfg = model.cfg
    ctx_len, prefill_len = 64, 8
    print(f"qtrace demo: a random-weight Llama ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads, vocab {cfg.vocab_size})")
    out_dir = args.output or tempfile.mkdtemp(prefix="qtrace-demo-")
    report = export_model(model, out_dir, ctx_len=ctx_len, prefill_seq_len=prefill_len, progress=_progress)
    print(f"exported to {out_dir}: {', '.join(os.path.basename(f) for f in report.files)}")
    print(_summary(report.lowered, report.stage_seconds))
    prompt = [1, 17, 42, 99, 7, 3, 250, 11, 64, 5]  # longer than one prefill chunk
    session = onnx_session(out_dir)
    common = dict(prefill_len=prefill_len, ctx_len=ctx_len, layout=cache_layout(session))
    start = time.perf_counter()
    onnx_tokens = generate(onnx_step(session), [prompt], args.max_new_tokens, **common)[0]
    onnx_seconds = time.perf_counter() - start
    fn, _ = model.signature(max_ctx_len=ctx_len)
    eager_tokens = generate(eager_step(fn), [prompt], args.max_new_tokens, **common)[0]
    # Max error of the logits of one prefill step, onnxruntime against the eager numpy model.
    ids = np.array([prompt[:prefill_len]]); positions = np.arange(prefill_len)[None]
    errors = report.lowered.verify(ids, positions, model.empty_cache(1, ctx_len))
    print(f"prompt:            {prompt}")
    print(f"onnxruntime:       {onnx_tokens}  ({onnx_seconds * 1000:.0f} ms)")
    print(f"eager numpy:       {eager_tokens}")
    print(f"max |error| prefill logits {errors['logits']:.2e}, caches "
          f"{max(v for k, v in errors.items() if k != 'logits'):.2e}")
    same = onnx_tokens == eager_tokens
    print("tokens match" if same else "TOKENS DIFFER")
    return 0 if same else 1


# -- export / generate ----------------------------------------------------------------------------------


def _list_architectures() -> int:
    from .examples.registry import architectures

    for name, arch in architectures().items():
        print(f"{name:28s} {arch.notes}")
    return 0


def _int_list(flag: str) -> Any:
    """An argparse type for `16,32` or `[16, 32]` (QEfficient accepts both) naming the flag on error."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(t) for t in text.strip().strip("[]").split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be comma-separated integers, got {text!r}") from None

    return parse


def _serving_options(args: argparse.Namespace) -> Any:
    """The export's serving modes, validated before any work (a QtraceError naming the flags)."""
    from .examples.serving import ServingError, ServingOptions

    options = ServingOptions(ccl_enabled=args.ccl_enabled, comp_ctx_lengths_prefill=args.comp_ctx_lengths_prefill,
                             comp_ctx_lengths_decode=args.comp_ctx_lengths_decode,
                             num_speculative_tokens=args.num_speculative_tokens, prefill_only=args.prefill_only,
                             decode_only=args.decode_only, sampling=args.sampling,
                             max_top_k_ids=512 if args.max_top_k_ids is None else args.max_top_k_ids,
                             return_pdfs=args.return_pdfs)
    if args.max_top_k_ids is not None and not args.sampling:
        raise ServingError("--max-top-k-ids needs --sampling")
    options.validate(ctx_len=args.ctx_len, prefill_seq_len=_prefill_seq_len(args),
                     prefill_seq_len_given=args.prefill_seq_len is not None)
    if args.num_devices < 1:
        raise ServingError(f"--num-devices must be >= 1, got {args.num_devices}")
    return options


def _prefill_seq_len(args: argparse.Namespace) -> int:
    return 32 if args.prefill_seq_len is None else args.prefill_seq_len


def _check_export_flags(args: argparse.Namespace) -> None:
    """Flags that contradict each other, refused before any work."""
    if args.hw == "ai100" and "bfloat16" in (args.dtype, args.kv_cache_precision):
        flag = "--dtype" if args.dtype == "bfloat16" else "--kv-cache-precision"
        raise QtraceError(f"{flag} bfloat16 needs --hw ai200: Cloud AI 100 (ai100) has no bfloat16; use float32 or "
                          "float16")


def _layer_pattern(names: list[str]) -> str:
    """`layers.0.q_proj` .. `layers.15.q_proj` as `layers.{0..15}.q_proj` (one entry per weight kind)."""
    groups: dict[str, list[int]] = {}
    for name in names:
        match = re.match(r"^(.*?)\.(\d+)\.(.*)$", name)
        key, number = (f"{match.group(1)}.{{}}.{match.group(3)}", int(match.group(2))) if match else (name, -1)
        groups.setdefault(key, []).append(number)
    parts = []
    for key, numbers in groups.items():
        if numbers == [-1]:
            parts.append(key)
            continue
        numbers = sorted(numbers)
        span = f"{numbers[0]}..{numbers[-1]}" if numbers == list(range(numbers[0], numbers[-1] + 1)) else \
            ",".join(map(str, numbers))
        parts.append(key.replace("{}", "{" + span + "}"))
    return ", ".join(parts)


def _weights_summary(stored: list[Any], reference: bool) -> str:
    """How the export stored its weights; in reference mode, which ones it had to convert and copy."""
    gib = 2**30
    referenced = [w for w in stored if w.how == "referenced"]
    written = [w for w in stored if w.how in ("copied", "converted")]
    converted = [w for w in written if w.how == "converted"]
    written_bytes = sum(w.nbytes for w in written)
    conversions = sorted({f"{w.source_dtype.name} -> {w.dtype.name}" for w in converted})
    if not reference:
        line = f"weights: {len(written)} written ({written_bytes / gib:.2f} GiB)"
        return line + (f", {len(converted)} of them converted {', '.join(conversions)}" if converted else "")
    line = f"weights: {len(referenced)} referenced in the checkpoint (zero-copy, " \
           f"{sum(w.nbytes for w in referenced) / gib:.2f} GiB)"
    if converted:
        line += f"; {len(converted)} had to be converted ({', '.join(conversions)}) and were written " \
                f"({sum(w.nbytes for w in converted) / gib:.2f} GiB): {_layer_pattern([w.name for w in converted])}"
    else:
        line += "; none had to be converted"
    copied = [w for w in written if w.how == "copied"]
    if copied:
        line += f"; {len(copied)} copied ({sum(w.nbytes for w in copied) / gib:.2f} GiB): " \
                f"{_layer_pattern([w.name for w in copied])}"
    return line + f"; {written_bytes / gib:.2f} GiB written in all"


def cmd_export(args: argparse.Namespace) -> int:
    if args.list_architectures:
        return _list_architectures()
    if args.checkpoint is None or args.output is None:
        raise QtraceError("export needs a CHECKPOINT_DIR and -o OUT (or --list-architectures)")
    _check_export_flags(args)
    from .examples.checkpoint import export_model, load_checkpoint
    from .examples.tokenizer import tokenizer_files
    from .lowering.side_files import CompileOptions, check_export_options

    compile_options = CompileOptions(args.num_cores, args.mxfp6_matmul, args.mos, args.depth_first,
                                     args.kv_cache_precision, num_devices=args.num_devices, hw_version=args.hw)
    check_export_options(args.ctx_len, _prefill_seq_len(args), args.batch_size, args.full_batch_size, compile_options)
    if args.kv_cache_batch_size is not None and (args.full_batch_size is None or
                                                 args.kv_cache_batch_size < args.full_batch_size):
        raise UsageError(f"--kv-cache-batch-size {args.kv_cache_batch_size} needs --full-batch-size at most as "
                         f"large (got {args.full_batch_size}): cache slots for prefix caching, beyond the decode lanes")
    if args.head_block_size and (args.head_block_size < 0 or not args.kv_blocks):
        raise UsageError(f"--head-block-size {args.head_block_size} needs --kv-blocks (head blocking splits "
                         "blocked attention) and a positive size")
    if args.q_blocks and (args.q_blocks < 0 or not args.kv_blocks):
        raise UsageError(f"--q-blocks {args.q_blocks} needs --kv-blocks (query blocking splits blocked attention; "
                         "--kv-blocks 1 reads the cache whole) and a positive count")
    if args.skip_kv and not args.kv_blocks:
        raise UsageError("--skip-kv needs --kv-blocks (it marks the KV blocks that lie past every position)")
    if not 0 <= args.kv_blocks <= args.ctx_len:
        raise UsageError(f"--kv-blocks {args.kv_blocks} must be between 1 and --ctx-len {args.ctx_len} (0: unblocked)")
    serving = _serving_options(args)
    if args.kv_blocks and serving.ccl:
        raise UsageError("--kv-blocks with compute-context lengths: blocked attention reads the whole context in "
                         "equal blocks")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"-o {args.output} is a file; give a directory (created when missing)")
    start = time.perf_counter()
    # ai100 runs float32 (or float16); an ai200 keeps the checkpoint's own dtype, bfloat16 included.
    dtype = args.dtype or ("float32" if args.hw == "ai100" else None)
    from .examples.blocks.causal_lm import Model, with_sliding_cache
    from .examples.blocks.moe import with_moe_strategy
    from .examples.checkpoint import read_checkpoint_config

    # refuse a flag that cannot apply before reading any weights
    configured = Model(*read_checkpoint_config(args.checkpoint), params={})
    if args.moe_strategy is not None:
        with_moe_strategy(configured, args.moe_strategy)
    with_sliding_cache(configured, args.sliding_cache)
    model = load_checkpoint(args.checkpoint, dtype=dtype)
    if args.moe_strategy is not None:
        model = with_moe_strategy(model, args.moe_strategy)
    model = with_sliding_cache(model, args.sliding_cache)
    load_seconds = time.perf_counter() - start
    report = export_model(model, args.output, ctx_len=args.ctx_len, prefill_seq_len=_prefill_seq_len(args),
                          batch_size=args.batch_size, full_batch_size=args.full_batch_size,
                          kv_cache_batch_size=args.kv_cache_batch_size, dtype=args.dtype or model.dtype.name,
                          weights=args.weights, layer_functions=not args.no_layer_functions, progress=_progress,
                          kv_blocks=args.kv_blocks, head_block_size=args.head_block_size, q_blocks=args.q_blocks,
                          skip_kv=args.skip_kv,
                          compile_options=compile_options,
                          bytes_progress=_ProgressBar(), serving=serving, copy_files=tokenizer_files(args.checkpoint))
    print(f"{model.cfg.architecture} -> {args.output}: {', '.join(os.path.basename(f) for f in report.files)}")
    print(_weights_summary(report.weights, args.weights == "reference"))
    print(_summary(report.lowered, {"load": load_seconds, **report.stage_seconds}))
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UsageError(f"--prompt-ids {text!r} holds no token id")
    return ids


def _check_token_ids(prompts: list[list[int]], model_dir: str) -> None:
    """Token ids in the vocabulary (the last dim of the export's logits): onnxruntime would fail on a
    Gather index past it, and a negative one would wrap around."""
    import onnx

    model = onnx.load(os.path.join(model_dir, "model.onnx"), load_external_data=False)
    logits = next((o for o in model.graph.output if o.name == "logits"), None)
    dims = logits.type.tensor_type.shape.dim if logits is not None else []
    vocab = dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None
    for prompt in prompts:
        for token in prompt:
            if token < 0 or (vocab is not None and token >= vocab):
                bound = f"0..{vocab - 1}" if vocab is not None else "non-negative"
                raise UsageError(f"--prompt-ids: token id {token} is outside the vocabulary of the export ({bound})")


def _stop_on_nonfinite_logits(executable: Any) -> Any:
    """Make an export's runs stop with a NumericsError on NaN or inf logits (greedy decoding would pick
    token 0 from them forever)."""
    import numpy as np

    run = executable.run

    def checked(feeds: dict[str, Any]) -> dict[str, Any]:
        outputs = run(feeds)
        logits = outputs.get("logits")
        if logits is not None and not np.isfinite(logits).all():
            bad = int((~np.isfinite(logits)).sum())
            raise NumericsError(f"{executable.name}: the logits hold NaN or inf ({bad} of {logits.size}); check the "
                                "weights for NaN or inf (qtrace.lowering.nonfinite_weights names them)")
        return outputs

    executable.run = checked
    return executable


def _sampling_params(args: argparse.Namespace) -> Any:
    """The sampler's parameters, or None when no sampling flag is given (greedy)."""
    from .examples.generation import GenerationError, SamplingParams

    given = {name: getattr(args, name) for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                                    "presence_penalty", "seed") if getattr(args, name) is not None}
    if not given:
        return None
    checks = [("temperature", lambda v: v >= 0, ">= 0"), ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
              ("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"), ("repetition_penalty", lambda v: v > 0, "> 0"),
              ("top_k", lambda v: v >= 0, ">= 0 (0: all candidates)")]
    for name, ok, want in checks:
        if name in given and not ok(given[name]):
            raise GenerationError(f"--{name.replace('_', '-')} must be {want}, got {given[name]}")
    if args.draft or args.prompt_lookup is not None:
        raise GenerationError("sampling flags with --draft/--prompt-lookup: speculative decoding is greedy")
    return SamplingParams(**given)


def _check_generate_flags(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.prompt_ids is None):
        raise QtraceError("generate needs either --prompt TEXT or --prompt-ids IDS (one of them)")
    if args.chat and args.prompt is None:
        raise QtraceError("--chat formats a --prompt TEXT with the chat template; it does not apply to --prompt-ids")


def _check_runnable(model_dir: str) -> None:
    """onnxruntime's CPU provider has no bfloat16 MatMul: say so instead of failing inside it."""
    import onnx

    path = os.path.join(model_dir, "model.onnx")
    if not os.path.isfile(path):
        return  # reported with the other directories below
    model = onnx.load(path, load_external_data=False)
    if any(i.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for i in model.graph.input):
        raise QtraceError(f"{path} keeps bfloat16 (an --hw ai200 export): onnxruntime's CPU provider cannot run "
                          "it; export with --hw ai100 to generate here")


class _TextStream:
    """Prints the text of generated tokens as they come (up to an end-of-sequence token), then the speed."""

    def __init__(self, tokenizer: Any, prompt_tokens: int):
        from .examples.tokenizer import TextStream

        self.stops = tokenizer.stop_ids()
        self.stream = TextStream(tokenizer)
        self.prompt_tokens = prompt_tokens
        self.start = time.perf_counter()
        self.first: float | None = None

    def __call__(self, index: int, tokens: list[int]) -> bool:
        """The Decoder's on_tokens hook: True stops the sequence."""
        self.first = self.first or time.perf_counter()
        for token in tokens:
            if token in self.stops:
                return True
            print(self.stream.push(token), end="", flush=True)
        return False

    def close(self) -> None:
        print(self.stream.finish(), flush=True)
        end = time.perf_counter()
        count, first = len(self.stream.tokens), self.first or end
        rate = f", then {(count - 1) / (end - first):.1f} tokens/s" if count > 1 and end > first else ""
        print(f"  .. {count} new tokens in {end - self.start:.2f} s: prefill of {self.prompt_tokens} prompt tokens "
              f"{first - self.start:.2f} s{rate}", file=sys.stderr, flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    _check_generate_flags(args)
    from .examples.generation import Decoder, Executable, GenerationError

    stream = None
    if args.prompt is not None:
        from .examples.tokenizer import TextTokenizer

        tokenizer = TextTokenizer(args.model_dir)
        prompts = [tokenizer.encode_chat(args.prompt) if args.chat else tokenizer.encode(args.prompt)]
        stream = _TextStream(tokenizer, len(prompts[0]))
    else:
        prompts = [_parse_ids(p) for p in args.prompt_ids]
    if args.max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.draft and args.prompt_lookup is not None:
        raise GenerationError("--draft and --prompt-lookup are two proposers: give one")
    if args.prompt_lookup is not None and args.prompt_lookup < 1:
        raise GenerationError(f"--prompt-lookup needs an n-gram size >= 1, got {args.prompt_lookup}")
    sampling = _sampling_params(args)
    for path in (args.model_dir, args.decode_model, args.draft):
        if path is not None and not os.path.isfile(os.path.join(path, "model.onnx")):
            raise GenerationError(f"{path}: no model.onnx (not a qtrace export directory)")
        if path is not None:
            _check_runnable(path)
            if path != args.draft:
                _check_token_ids(prompts, path)
    decoder = Decoder(_stop_on_nonfinite_logits(Executable.load(args.model_dir)),
                      _stop_on_nonfinite_logits(Executable.load(args.decode_model)) if args.decode_model else None,
                      sampling=sampling)
    if not 1 <= decoder.prefill_len <= (decoder.ctx_len or decoder.prefill_len):
        raise FileError(f"{os.path.join(args.model_dir, 'specializations.json')}: Prefill seq_len "
                        f"{decoder.prefill_len} with ctx_len {decoder.ctx_len} cannot run (1 <= seq_len <= ctx_len)")
    if args.draft or args.prompt_lookup is not None:
        draft = Decoder(Executable.load(args.draft)) if args.draft else None
        tokens, stats = decoder.speculate(prompts, args.max_new_tokens, draft=draft, prompt_lookup=args.prompt_lookup,
                                          on_tokens=stream)
        print(f"acceptance rate {stats.acceptance_rate:.3f} ({stats.accepted}/{stats.proposed} proposed tokens), "
              f"{stats.tokens / max(stats.target_calls, 1):.2f} tokens per target call", file=sys.stderr)
    else:
        tokens = decoder.generate(prompts, args.max_new_tokens, on_tokens=stream)
    if decoder.reused_tokens:
        print(f"prefix caching: {decoder.reused_tokens} prompt tokens reused from cached slots", file=sys.stderr)
    if stream is not None:
        stream.close()
        return 0
    for row in tokens:
        print(",".join(map(str, row)))
    return 0


# -- dump -------------------------------------------------------------------------------------------------


def _load_target(target: str) -> Any:
    path, _, name = target.rpartition(":")
    if not path or not name:
        raise QtraceError(f"expected FILE.py:FUNCTION, got {target!r}")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    if spec is None or spec.loader is None:
        raise QtraceError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise QtraceError(f"{path} has no {name}")
    return module, getattr(module, name)


def _parse_spec(text: str) -> Any:
    """`f32[batch_size,seq_len,64]` or `i64[b,s]` -> ShapeDtype."""
    import re

    from .dtypes import from_short_name
    from .ir import ShapeDtype

    match = re.fullmatch(r"\s*(\w+)\[([^\[\]]*)\]\s*", text)
    if match is None:
        raise UsageError(f"--example {text!r} is not a spec like f32[batch_size,seq_len,64]")
    dims = [d.strip() for d in match.group(2).split(",") if d.strip()]
    try:
        return ShapeDtype(tuple(int(d) if d.lstrip("-").isdigit() else d for d in dims), from_short_name(match.group(1)))
    except QtraceError as exc:
        raise UsageError(f"--example {text!r}: {exc.message}") from None


def cmd_dump(args: argparse.Namespace) -> int:
    from .passes import DEFAULT_PIPELINE, run_pipeline
    from . import trace  # the public API's: it loads the primitives the traced file's numpy calls need

    module, fn = _load_target(args.target)
    if args.example:
        example_args = tuple(_parse_spec(s) for s in args.example)
    elif hasattr(module, "example_args"):
        fn, example_args = module.example_args(fn)
    else:
        raise QtraceError("give --example specs (e.g. --example 'f32[b,s,64]') or define example_args(fn) "
                          "in the file")
    graph = trace(fn, example_args)
    passes = list(DEFAULT_PIPELINE)
    if args.after is not None:
        if args.after not in passes and args.after != "trace":
            raise UsageError(f"--after must be trace or one of {passes}, got {args.after!r}")
        passes = [] if args.after == "trace" else passes[:passes.index(args.after) + 1]
    report = run_pipeline(graph, passes)
    if args.svg:
        import shutil
        import subprocess

        if shutil.which("dot") is None:
            raise QtraceError("--svg needs Graphviz's `dot` on PATH")
        subprocess.run(["dot", "-Tsvg", "-o", args.svg], input=graph.to_dot().encode(), check=True)
        print(f"wrote {args.svg}")
    elif args.dot:
        print(graph.to_dot(), end="")
    else:
        print(graph, end="")
        if report.records:
            print("# " + report.summary().replace("\n", "\n# "))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qtrace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="export a small random Llama, generate on onnxruntime, check against numpy")
    demo.add_argument("-o", "--output", help="directory for the export (default: a temporary one)")
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)

    export = sub.add_parser("export", help="export a Hugging Face checkpoint directory for Cloud AI 100")
    export.add_argument("checkpoint", nargs="?", help="a directory with config.json and *.safetensors")
    export.add_argument("-o", "--output")
    export.add_argument("--list-architectures", action="store_true",
                        help="print the architectures qtrace can export, then exit")
    export.add_argument("--ctx-len", type=int, default=128)
    export.add_argument("--prefill-seq-len", type=int, default=None, help="prefill chunk length (default 32)")
    export.add_argument("--batch-size", type=int, default=1)
    export.add_argument("--full-batch-size", type=int, default=None)
    export.add_argument("--kv-cache-batch-size", type=int, default=None, metavar="S",
                        help="prefix caching: S cache slots for --full-batch-size decode lanes (S >= lanes); "
                             "qtrace generate reuses a slot's cached prefix and prefills only the rest")
    export.add_argument("--hw", choices=("ai100", "ai200"), default="ai100",
                        help="target hardware (qaic-compile -aic-hw-version); ai200 keeps bfloat16")
    export.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="model dtype (default: float32 on ai100, the checkpoint's own on ai200)")
    export.add_argument("--weights", choices=("copy", "reference"), default="copy")
    export.add_argument("--no-layer-functions", action="store_true")
    export.add_argument("--head-block-size", type=int, default=0, metavar="H",
                        help="with --kv-blocks: blocked attention over H KV heads at a time (QEfficient's head "
                             "blocking; default: all heads together)")
    export.add_argument("--q-blocks", type=int, default=0, metavar="Q",
                        help="with --kv-blocks: blocked attention over Q equal blocks of query rows, each against "
                             "every KV block (QEfficient's num_q_blocks; default: all rows together)")
    export.add_argument("--skip-kv", action="store_true",
                        help="with --kv-blocks: a predicate per KV block, true when the block lies past every "
                             "position, that keeps the running softmax unchanged so the accelerator may skip the "
                             "block (QEfficient's skip_kv)")
    export.add_argument("--kv-blocks", type=int, default=0, metavar="N",
                        help="blocked attention: read each layer's cache in N blocks (CtxGatherBlockedKV) with an "
                             "exact online softmax, for long contexts (default: one whole read)")
    export.add_argument("--sliding-cache", choices=("full", "ring"), default="full",
                        help="sliding-window and chunked layers: a full ctx_len cache (default), or a ring of "
                             "window + prefill-seq-len - 1 slots with its own symbolic dim")
    export.add_argument("--moe-strategy", choices=("gather", "dense"), default=None,
                        help="mixture-of-experts execution: gather the chosen experts per token, or run every "
                             "expert on every token with routing weights 0 where not chosen (default: gather)")
    export.add_argument("--num-cores", type=int, default=16, help="qaic-compile -aic-num-cores")
    export.add_argument("--mxfp6-matmul", action="store_true", help="qaic-compile -mxfp6-matmul")
    export.add_argument("--mos", type=int, default=None, help="qaic-compile -mos")
    export.add_argument("--depth-first", action="store_true", help="qaic-compile -aic-enable-depth-first")
    export.add_argument("--kv-cache-precision", choices=("float16", "bfloat16", "mxint8"), default=None,
                        help="precision of the KV cache in custom_io.yaml (default: bfloat16 for a bfloat16 "
                             "model, else float16)")
    export.add_argument("--num-devices", type=int, default=1,
                        help="tensor-slice over N devices: writes mdp_ts_N.json and adds "
                             "-mdp-load-partition-config to compile.sh")
    modes = export.add_argument_group("serving modes (QEfficient's interfaces; see qtrace generate)")
    modes.add_argument("--ccl-enabled", action="store_true",
                       help="compute-context length with QEfficient's automatic bucket lists")
    modes.add_argument("--comp-ctx-lengths-prefill", type=_int_list("--comp-ctx-lengths-prefill"), metavar="L1,L2,..",
                       help="compute-context-length buckets for prefill (a comp_ctx_lengths input bounds the cache "
                            "every layer reads; one specialization per bucket; values <= --ctx-len)")
    modes.add_argument("--comp-ctx-lengths-decode", type=_int_list("--comp-ctx-lengths-decode"), metavar="L1,L2,..",
                       help="compute-context-length buckets for decode")
    modes.add_argument("--num-speculative-tokens", type=_int_list("--num-speculative-tokens"), metavar="K[,K..]",
                       help="a speculative-decoding target: a num_logits_to_keep input and logits for K+1 positions, "
                            "one decode specialization of seq_len K+1 per K (K >= 1; 0 adds a single-token fallback)")
    modes.add_argument("--prefill-only", action="store_true",
                       help="only the prefill specializations (disaggregated serving; pair with a --decode-only export)")
    modes.add_argument("--decode-only", action="store_true",
                       help="only the decode specializations; takes a --prefill-only export's retained state as is "
                            "(no --prefill-seq-len)")
    modes.add_argument("--sampling", action="store_true",
                       help="on-device sampling: QEfficient's sampler inputs (temperatures, top_ks, top_ps, min_ps, "
                            "repetition/presence penalties and their retained buffers, random_numbers) and "
                            "next_tokens instead of logits")
    modes.add_argument("--max-top-k-ids", type=int, default=None,
                       help="candidates the sampler ranks (default 512, at most the vocabulary; with --sampling)")
    modes.add_argument("--return-pdfs", action="store_true",
                       help="the sampler also outputs probs, the filtered distribution (with --sampling)")
    export.set_defaults(run=cmd_export)

    generate = sub.add_parser("generate", help="greedy decoding with an exported model on onnxruntime")
    generate.add_argument("model_dir")
    generate.add_argument("--prompt", help="text, encoded with the tokenizer exported next to the model; the "
                                           "generated text is printed as it comes, then tokens/s")
    generate.add_argument("--chat", action="store_true", help="format --prompt with the model's chat template")
    generate.add_argument("--prompt-ids", action="append",
                          help="comma-separated token ids; repeat for several prompts")
    generate.add_argument("--max-new-tokens", type=int, default=8)
    generate.add_argument("--decode-model", metavar="DECODE_OUT",
                          help="disaggregated serving: MODEL_DIR is a --prefill-only export, this the --decode-only "
                               "export that continues from its retained state")
    spec = generate.add_argument_group("speculative decoding (MODEL_DIR exported with --num-speculative-tokens)")
    spec.add_argument("--draft", metavar="DRAFT_OUT",
                      help="a draft export proposing K tokens per step; prints the acceptance rate on stderr")
    spec.add_argument("--prompt-lookup", type=int, metavar="N",
                      help="draft-free proposals: the tokens that followed an earlier occurrence of the last "
                           "n-gram (n <= N)")
    sample = generate.add_argument_group("on-device sampling (MODEL_DIR exported with --sampling; default greedy)")
    sample.add_argument("--temperature", type=float, help="0 is greedy")
    sample.add_argument("--top-k", type=int, help="keep the K most likely tokens (0: all --max-top-k-ids)")
    sample.add_argument("--top-p", type=float, help="keep the smallest set with probability >= P")
    sample.add_argument("--min-p", type=float, help="drop tokens less likely than P times the most likely one")
    sample.add_argument("--repetition-penalty", type=float, help="divide (or multiply) logits of seen tokens")
    sample.add_argument("--presence-penalty", type=float, help="subtract from logits of generated tokens")
    sample.add_argument("--seed", type=int, help="seed of the random numbers fed to the sampler (reproducible runs)")
    generate.set_defaults(run=cmd_generate)

    dump = sub.add_parser("dump", help="trace FILE.py:FUNCTION and print its IR")
    dump.add_argument("target")
    dump.add_argument("--example", action="append", help="an input spec such as f32[batch_size,seq_len,64]")
    dump.add_argument("--after", help="stop after this pass (trace = no passes)")
    dump.add_argument("--dot", action="store_true", help="print Graphviz DOT instead of text")
    dump.add_argument("--svg", help="render to this SVG file (needs Graphviz)")
    dump.set_defaults(run=cmd_dump)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # A command is one burst of imports and tracing whose objects nearly all live to its end: at the
    # collector's default threshold (700 allocations) a tiny export spends about a tenth of its time
    # walking them for no garbage. Collections stay on, only rarer; the caller's thresholds come back
    # on return (tests run main in-process).
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], RARE_COLLECTIONS), *thresholds[1:])
    try:
        return _run(argv)
    finally:
        gc.set_threshold(*thresholds)


RARE_COLLECTIONS = 20_000  # allocations between young-generation collections during a command


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except QtraceError as exc:
        caller = user_location()
        if exc.location is not None and caller is not None and exc.location.file == caller.file:
            exc.location = None  # located at whoever called main (the `qtrace` script): no user line
        print(f"qtrace {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"qtrace {args.command}: error: {exc}", file=sys.stderr)
        return 2


def console_main() -> None:
    """The `qtrace` command: main(), then a quick exit. Everything a command writes is closed (and
    renamed into place) before main returns, so the interpreter's teardown, which frees every module
    and object one by one (about 70 ms after an export, a sixth of a tiny one), does nothing a user
    can observe. atexit handlers still run and the standard streams are flushed; an exception or
    SystemExit (--help, argparse errors) leaves the ordinary way."""
    status = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(status)


if __name__ == "__main__":
    console_main()
