"""The architecture registry: a Hugging Face `architectures` name -> how to read its config, its
weight map and its layer function (plus embedding / final-norm / head hooks where a family differs).

Families live in `qtrace.examples.families`, one module each, and register themselves when that
package is imported; adding an architecture is adding a module there (and its reference fixture).
Checkpoint loading, `qtrace export` and `qtrace generate` find architectures only through here.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import ConfigError, ConfigReader, DecoderConfig
from .weights import WeightMap


@dataclass(frozen=True, eq=False)  # identity: one object per registered name
class Architecture:
    name: str                                              # as in config.json "architectures"
    read_config: Callable[[ConfigReader], DecoderConfig]   # raises ConfigError naming the field
    weights: Callable[[DecoderConfig], WeightMap]
    layer: Callable[..., Any]                              # @qtrace.function decoder layer
    embed: Callable[..., Any] | None = None                # (params, input_ids, position_ids, cfg) -> h
    final_norm: Callable[..., Any] | None = None           # (h, params, cfg) -> h
    head: Callable[..., Any] | None = None                 # (h_last, params, cfg) -> logits
    layer_config: Callable[..., Any] | None = None         # (cfg, layer index) -> that layer's cfg
    notes: str = ""                                        # one line for `qtrace export --list-architectures`
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Architecture] = {}
_loaded = False


def register(*architectures: Architecture) -> None:
    for arch in architectures:
        if arch.name in _REGISTRY and _REGISTRY[arch.name] is not arch:
            raise ValueError(f"architecture {arch.name} is registered twice")
        _REGISTRY[arch.name] = arch


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    from . import families

    for module in sorted(m.name for m in pkgutil.iter_modules(families.__path__)):
        importlib.import_module(f"{families.__name__}.{module}")
    _loaded = True


def _find(name: Any) -> Architecture | None:
    """The architecture registered under `name`, importing first only the family modules whose source
    spells the name out (a fresh `qtrace export` imports one family, not the whole zoo), then, if
    that did not register it, every family. None for a name that is not a string."""
    if not isinstance(name, str):
        return None
    if name not in _REGISTRY and not _loaded:
        from . import families

        for module in sorted(m.name for m in pkgutil.iter_modules(families.__path__)):
            try:
                with open(os.path.join(families.__path__[0], module + ".py"), encoding="utf-8") as f:
                    names_it = f'"{name}"' in f.read()
            except OSError:  # not a plain file (a zipped install): the full load below finds it
                continue
            if names_it:
                importlib.import_module(f"{families.__name__}.{module}")
    if name not in _REGISTRY:
        _load_families()
    return _REGISTRY.get(name)


def architectures() -> dict[str, Architecture]:
    """Every registered architecture, by name (sorted)."""
    _load_families()
    return dict(sorted(_REGISTRY.items()))


def get_architecture(name: str) -> Architecture:
    arch = _find(name)
    if arch is None:
        raise ConfigError(f"unsupported architecture {name!r}; qtrace supports {', '.join(architectures())}")
    return arch


def architecture_of(config: dict[str, Any], source: str = "config.json") -> Architecture:
    """The registered architecture a config.json names in "architectures"."""
    names = config.get("architectures") or []
    if not isinstance(names, list):
        raise ConfigError(f"{source}: field 'architectures' must be a list, got {names!r}")
    for name in names:
        arch = _find(name)
        if arch is not None:
            return arch
    what = names or config.get("model_type") or "none given"
    raise ConfigError(f"{source}: unsupported architecture {what!r}; qtrace supports {', '.join(architectures())}")


def read_config(config: dict[str, Any], source: str = "config.json") -> tuple[Architecture, DecoderConfig]:
    arch = architecture_of(config, source)
    return arch, arch.read_config(ConfigReader(config, source))
