"""The technique registry: each technique registers itself once, at import, and everything that dispatches on a
technique (`quantize`, `compress`, the commands, recipes, the footprint and the compression record) asks here.

    register_technique(
        "gptq", GPTQConfig, quantize_uniform, kind="quantize", layer_types=(QuantLinear, SparseQuantLinear)
    )

A compressed layer class declares what it stores (`STORED_TENSORS`, the tensors that hold its weight, and
`KEEPS_DTYPE`, whether its floating-point buffers keep their own dtype when the model is cast), so the
footprint and the dtype handling need no list of classes either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "Technique",
    "compressed_layer_types",
    "get_technique",
    "register_technique",
    "stored_tensors",
    "technique_for",
    "techniques",
]


@dataclass(frozen=True)
class Technique:
    """A compression technique as the rest of hfcompress sees it.

    `name`: the method name on the command line (`hfcompress <kind> <name>`) and in a recipe step
    (`- <kind>: {method: <name>}`). `config_class`: its config dataclass. `apply(model, config, tokenizer)`
    compresses `model` in place and returns it (with `in_place=False`, returns a new model: bitsandbytes
    quantizes while loading). `kind`: the command group and recipe step it belongs to (`quantize`, `prune`,
    `factorize`, ...). `record_kind`: the step's kind in the compression record. `layer_types`: the module classes
    it puts into a model. `formats`: the checkpoint formats it can be saved in (the first is the default).
    `needs_data(config)`: whether that config needs calibration data. `summary`: one line for `--help`.
    """

    name: str
    config_class: type
    apply: Callable[..., nn.Module]
    kind: str = "quantize"
    record_kind: str = "quantization"
    layer_types: tuple[type, ...] = ()
    formats: tuple[str, ...] = ("hfcompress",)
    needs_data: Callable[[Any], bool] = lambda config: False
    in_place: bool = True
    summary: str = ""

    @property
    def command(self) -> tuple[str, str]:
        return (self.kind, self.name)


_TECHNIQUES: dict[tuple[str, str], Technique] = {}
_LAYER_TYPES: dict[type, None] = {}


def register_technique(
    name: str, config_class: type, apply: Callable[..., nn.Module], kind: str = "quantize", **options
) -> Technique:
    """Register technique `name` of `kind` (see `Technique` for `options`). Its config class must be a
    dataclass; its layer types must declare `STORED_TENSORS`. Registering the same name twice with another config
    class is an error; registering it again with the same one replaces it (reloading a module)."""
    if not dataclasses.is_dataclass(config_class):
        raise TypeError(f"the config class of technique {name!r} must be a dataclass, got {config_class!r}")
    for layer_type in options.get("layer_types", ()):
        if not hasattr(layer_type, "STORED_TENSORS"):
            raise TypeError(
                f"layer type {layer_type.__name__} of technique {name!r} must declare STORED_TENSORS, the names of "
                "the tensors that hold its weight"
            )
    existing = _TECHNIQUES.get((kind, name))
    if existing is not None and existing.config_class.__qualname__ != config_class.__qualname__:
        raise ValueError(f"technique {kind} {name!r} is already registered with {existing.config_class.__name__}")
    technique = Technique(name, config_class, apply, kind, **options)
    _TECHNIQUES[(kind, name)] = technique
    for layer_type in technique.layer_types:
        _LAYER_TYPES[layer_type] = None
    return technique


def techniques(kind: str | None = None) -> list[Technique]:
    """The registered techniques (of one `kind`), in registration order."""
    return [t for t in _TECHNIQUES.values() if kind is None or t.kind == kind]


def get_technique(kind: str, name: str) -> Technique:
    """Technique `name` of `kind`, or an error listing the known ones."""
    if (kind, name) not in _TECHNIQUES:
        known = ", ".join(t.name for t in techniques(kind)) or "none"
        raise ValueError(f"unknown {kind} method {name!r}; expected one of {known}")
    return _TECHNIQUES[(kind, name)]


def technique_for(config: Any, kind: str | None = None) -> Technique:
    """The technique whose config class `config` is (the most specific registered class wins: a `GPTQConfig`
    is GPTQ, though it extends `RTNConfig`)."""
    for cls in type(config).__mro__:
        for technique in techniques(kind):
            if technique.config_class is cls:
                return technique
    known = ", ".join(t.config_class.__name__ for t in techniques(kind))
    what = f"{kind} config" if kind else "hfcompress config"
    raise TypeError(f"`config` must be an {what} ({known}), got {type(config).__name__}")


def compressed_layer_types() -> tuple[type, ...]:
    """Every module class a registered technique puts into a model."""
    return tuple(_LAYER_TYPES)


def stored_tensors(module: nn.Module) -> list:
    """The tensors that hold the weight of a compressed layer (None where a buffer is absent), or [] for a
    module no technique registered."""
    if not isinstance(module, compressed_layer_types()):
        return []
    return [getattr(module, name, None) for name in type(module).STORED_TENSORS]
