"""Model configurations: what a family reads from a Hugging Face `config.json`.

`DecoderConfig` holds every knob the shared blocks understand (sizes, RoPE, attention kind per
layer, scales and softcaps). A family reads its checkpoint's config through a `ConfigReader`, whose
errors name the file and the field, and may subclass `DecoderConfig` for knobs of its own. Configs
are frozen and hashable: a layer function receives its config as a static argument, so layers with
the same config share one traced body.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import qtrace

FULL, SLIDING, CHUNKED = "full_attention", "sliding_attention", "chunked_attention"
ATTENTION_KINDS = (FULL, SLIDING, CHUNKED)
ROPE_KINDS = ("default", "linear", "llama3", "yarn", "longrope")
ACTIVATION_NAMES = ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new")  # the MLP activations blocks/layers.py has


class ConfigError(qtrace.QtraceError, ValueError):
    """A checkpoint's config.json is unusable (names the file and the field)."""


def _frozen(value: Any) -> Any:
    """A hashable copy of a JSON value (lists become tuples, dicts sorted item tuples)."""
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


@dataclass(frozen=True)
class RopeSpec:
    """One rotary embedding: `kind` (default, linear, llama3, yarn, longrope), its base `theta`, the
    scaling parameters as sorted (key, value) pairs, the share of each head that rotates, and the
    pairing of the rotated dims (halves, as in Llama, or interleaved neighbours, as in GPT-J)."""

    theta: float = 10000.0
    kind: str = "default"
    scaling: tuple[tuple[str, Any], ...] = ()
    partial_rotary_factor: float = 1.0
    interleaved: bool = False

    def param(self, name: str, default: Any = None) -> Any:
        return dict(self.scaling).get(name, default)


@dataclass(frozen=True)
class DecoderConfig:
    """A decoder-only causal LM as the blocks see it. `layer_types[i]` is the attention of layer i
    (full, sliding over `sliding_window` positions, or chunked in `attention_chunk_size` blocks);
    `local_rope` is the RoPE of sliding layers when it differs from `rope` (Gemma 3)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    rope: RopeSpec | None = RopeSpec()
    local_rope: RopeSpec | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    attention_scale: float | None = None  # None: head_dim ** -0.5
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    hidden_act: str = "silu"
    qkv_shards: int = 1                           # a fused qkv_proj: blocks of heads (blocks/attention.py)
    qkv_order: str = "qkv"                        # the order of q, k and v inside each block
    clip_qkv: float | None = None                 # q, k, v clipped to [-clip_qkv, clip_qkv] (MPT)
    alibi_slopes: tuple[float, ...] | None = None  # per-head ALiBi slopes added to the scores (MPT)

    @property
    def query_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def scale(self) -> float:
        return self.head_dim ** -0.5 if self.attention_scale is None else self.attention_scale

    def layer_type(self, index: int) -> str:
        return self.layer_types[index] if self.layer_types else FULL

    def rope_for(self, layer_type: str) -> RopeSpec | None:
        return self.local_rope if layer_type == SLIDING and self.local_rope is not None else self.rope

    def rope_for_layer(self, index: int) -> RopeSpec | None:
        """The RoPE of layer `index` (None: the layer has no rotary embedding, e.g. Llama 4's NoPE
        layers, which a family states by overriding this)."""
        return self.rope_for(self.layer_type(index))


class ConfigReader:
    """Typed access to a config.json dict; every error names the file and the field."""

    def __init__(self, data: dict[str, Any], source: str = "config.json"):
        self.data = data
        self.source = source

    def error(self, field: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: field {field!r} {problem}")

    def has(self, field: str) -> bool:
        return self.data.get(field) is not None

    def _convert(self, field: str, value: Any, kind: Callable[[Any], Any]) -> Any:
        if kind is bool:
            if not isinstance(value, bool):
                raise self.error(field, f"must be true or false, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(field, f"must be a number, got {value!r}")
        if kind is int and float(value) != int(value):
            raise self.error(field, f"must be an integer, got {value!r}")
        converted = kind(value)
        if not math.isfinite(converted):
            raise self.error(field, f"must be finite, got {value!r}")
        return converted

    def require(self, field: str, kind: Callable[[Any], Any] = int, *, positive: bool = True) -> Any:
        if not self.has(field):
            raise ConfigError(f"{self.source}: missing field {field!r}")
        value = self._convert(field, self.data[field], kind)
        if positive and kind in (int, float) and value <= 0:
            raise self.error(field, f"must be positive, got {value!r}")
        return value

    def get(self, field: str, default: Any, kind: Callable[[Any], Any] = int, *, positive: bool = True) -> Any:
        return self.require(field, kind, positive=positive) if self.has(field) else default

    def first(self, fields: tuple[str, ...], kind: Callable[[Any], Any] = int, default: Any = None) -> Any:
        """The first present field among synonyms (e.g. n_embd / hidden_size)."""
        for field in fields:
            if self.has(field):
                return self.require(field, kind)
        if default is not None:
            return default
        raise ConfigError(f"{self.source}: missing field {fields[0]!r}")

    def choice(self, field: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.data.get(field, default)
        if value is None:
            value = default
        if value not in allowed:
            raise self.error(field, f"is {value!r}; qtrace supports {', '.join(map(repr, allowed))}")
        return value

    # -- shared readers ----------------------------------------------------------------------------
    def heads(self, heads_field: str = "num_attention_heads",
              kv_field: str = "num_key_value_heads") -> tuple[int, int, int]:
        """(heads, kv heads, head_dim), checked to divide."""
        heads = self.require(heads_field)
        kv_heads = self.get(kv_field, heads)
        if heads % kv_heads:
            raise self.error(kv_field, f"= {kv_heads} does not divide {heads_field} = {heads}")
        head_dim = self.get("head_dim", None)
        if head_dim is None:
            hidden = self.require("hidden_size")
            if hidden % heads:
                raise self.error("hidden_size", f"= {hidden} is not a multiple of {heads_field} = {heads}; "
                                                "give head_dim")
            head_dim = hidden // heads
        return heads, kv_heads, head_dim

    def rope(self, *, parameters: dict[str, Any] | None = None, field: str = "rope_parameters",
             theta_default: float = 10000.0, interleaved: bool = False) -> RopeSpec:
        """The RoPE of the config: transformers >= 5 writes `rope_parameters` (theta inside, perhaps
        partial_rotary_factor); older versions `rope_theta` and `rope_scaling` at the top level."""
        if parameters is None:
            parameters = self.data.get(field) or self.data.get("rope_scaling") or {}
            if not isinstance(parameters, dict):
                raise self.error(field, f"must be an object, got {parameters!r}")
        theta = parameters.get("rope_theta", self.data.get("rope_theta", theta_default))
        kind = parameters.get("rope_type", parameters.get("type", "default")) or "default"
        where = f"{field}.rope_type"
        if kind not in ROPE_KINDS:
            raise self.error(where, f"is {kind!r}; qtrace supports {', '.join(ROPE_KINDS)}")
        partial = parameters.get("partial_rotary_factor", self.data.get("partial_rotary_factor", 1.0))
        if not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            raise self.error("partial_rotary_factor", f"must be in (0, 1], got {partial!r}")
        scaling = {k: v for k, v in parameters.items()
                   if k not in ("rope_theta", "rope_type", "type", "partial_rotary_factor")}
        required = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                     "original_max_position_embeddings"),
                    "yarn": ("factor",), "longrope": ("long_factor", "short_factor")}.get(kind, ())
        for name in required:
            if scaling.get(name) is None:
                raise ConfigError(f"{self.source}: missing field {field}.{name!r} (rope_type {kind!r})")
        if kind in ("yarn", "longrope") and scaling.get("original_max_position_embeddings") is None:
            original = self.data.get("original_max_position_embeddings")
            if original is None:
                raise ConfigError(f"{self.source}: missing field {field}.'original_max_position_embeddings' "
                                  f"(rope_type {kind!r})")
            scaling["original_max_position_embeddings"] = original
        return RopeSpec(theta=float(theta), kind=kind, scaling=_frozen(scaling),
                        partial_rotary_factor=float(partial), interleaved=interleaved)

    def every_layer_window(self) -> dict[str, Any]:
        """DecoderConfig fields of a config whose `sliding_window` (null: none) applies to every layer
        (Mistral, Phi-3)."""
        window = self.get("sliding_window", None)
        layers = self.require("num_hidden_layers")
        return dict(sliding_window=window, layer_types=((SLIDING if window else FULL),) * layers)

    def opt_in_window(self) -> tuple[tuple[str, ...], int | None]:
        """(layer types, window) of a config whose sliding window is opt-in (Qwen2, Qwen3): no window
        unless `use_sliding_window`; then the layers `layer_types` marks, or from `max_window_layers` on."""
        layers = self.require("num_hidden_layers")
        window = self.get("sliding_window", None) if self.get("use_sliding_window", False, bool) else None
        if window is None:
            return (FULL,) * layers, None
        if self.has("layer_types"):
            return self.layer_types(layers), window
        first = self.get("max_window_layers", layers, int, positive=False)
        return tuple(SLIDING if i >= first else FULL for i in range(layers)), window

    def check_rope(self, spec: RopeSpec, head_dim: int, field: str = "rope_parameters") -> RopeSpec:
        """longrope's factor lists must have one entry per rotated frequency."""
        if spec.kind == "longrope":
            needed = int(head_dim * spec.partial_rotary_factor) // 2
            for name in ("short_factor", "long_factor"):
                factors = spec.param(name)
                if not isinstance(factors, tuple) or len(factors) != needed:
                    raise self.error(f"{field}.{name}", f"must list {needed} factors (head_dim {head_dim} x "
                                                        f"partial_rotary_factor {spec.partial_rotary_factor} / 2), "
                                                        f"got {factors!r}")
        return spec

    def layer_types(self, num_layers: int, default: str = FULL) -> tuple[str, ...]:
        types = self.data.get("layer_types")
        if types is None:
            return (default,) * num_layers
        if not isinstance(types, list) or len(types) != num_layers:
            raise self.error("layer_types", f"must list {num_layers} layers, got {types!r}")
        for t in types:
            if t not in ATTENTION_KINDS:
                raise self.error("layer_types", f"has {t!r}; qtrace supports {', '.join(ATTENTION_KINDS)}")
        return tuple(types)


def load_config_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def common_fields(reader: ConfigReader, architecture: str, **overrides: Any) -> dict[str, Any]:
    """The fields most Llama-shaped configs spell the same way, as DecoderConfig keywords."""
    heads, kv_heads, head_dim = reader.heads()
    layers = reader.require("num_hidden_layers")
    fields: dict[str, Any] = dict(
        architecture=architecture, vocab_size=reader.require("vocab_size"), hidden_size=reader.require("hidden_size"),
        intermediate_size=reader.require("intermediate_size"), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        norm_eps=reader.get("rms_norm_eps", 1e-6, float), rope=reader.check_rope(reader.rope(), head_dim),
        max_position_embeddings=reader.get("max_position_embeddings", 2048),
        tie_word_embeddings=reader.get("tie_word_embeddings", False, bool),
        attention_bias=reader.get("attention_bias", False, bool),
        hidden_act=reader.choice("hidden_act", "silu", ACTIVATION_NAMES),
    )
    fields.update(overrides)
    return fields


def gpt2_style_fields(reader: ConfigReader, architecture: str, *, default_act: str = "gelu_new",
                      rotary: bool = False, **overrides: Any) -> dict[str, Any]:
    """DecoderConfig keywords from the GPT-2 lineage's spellings (n_embd, n_head, n_layer, n_positions,
    n_inner, layer_norm_epsilon, activation_function, scale_attn_weights; GPT-2, GPTBigCode, GPT-J,
    CodeGen): multi-head attention (any `num_key_value_heads` is ignored, as transformers ignores it),
    unscaled scores without scale_attn_weights, and no RoPE, or with `rotary` GPT-J's: theta 10000 on
    the first `rotary_dim` dims of each head, rotated in interleaved pairs."""
    hidden = reader.first(("n_embd", "hidden_size"))
    heads = reader.first(("n_head", "num_attention_heads"))
    if hidden % heads:
        raise reader.error("n_embd", f"= {hidden} is not a multiple of n_head = {heads}")
    head_dim = hidden // heads
    rope = None
    if rotary:
        dim = reader.require("rotary_dim")  # transformers' null rotary_dim rotates hidden_size dims: unusable
        if dim > head_dim or dim % 2 or int(head_dim * (dim / head_dim)) != dim:
            raise reader.error("rotary_dim", f"= {dim} must be even and at most the head dim {head_dim}")
        rope = RopeSpec(theta=10000.0, partial_rotary_factor=dim / head_dim, interleaved=True)
    fields: dict[str, Any] = dict(
        architecture=architecture, vocab_size=reader.require("vocab_size"), hidden_size=hidden,
        intermediate_size=reader.get("n_inner", 4 * hidden),
        num_hidden_layers=reader.first(("n_layer", "num_hidden_layers")),
        num_attention_heads=heads, num_key_value_heads=heads, head_dim=head_dim,
        norm_eps=reader.get("layer_norm_epsilon", 1e-5, float), rope=rope,
        attention_scale=None if reader.get("scale_attn_weights", True, bool) else 1.0,
        max_position_embeddings=reader.first(("n_positions", "max_position_embeddings"), default=1024),
        hidden_act=reader.choice("activation_function", default_act, ACTIVATION_NAMES),
    )
    fields.update(overrides)
    return fields


def replace(cfg: DecoderConfig, **changes: Any) -> DecoderConfig:
    return dataclasses.replace(cfg, **changes)


__all__ = ["ConfigError", "ConfigReader", "DecoderConfig", "RopeSpec", "FULL", "SLIDING", "CHUNKED",
           "common_fields", "gpt2_style_fields", "load_config_json", "replace"]
