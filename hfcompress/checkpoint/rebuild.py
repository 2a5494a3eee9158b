"""The rebuild registry: how each kind of compressed layer is rebuilt when a checkpoint loads.

A technique registers one `Rebuilder` per manifest section it writes (`register_rebuilder`); the loader runs
them in their `order` on the model transformers built from its config, before the weights load, so every
layer has the shape and buffers of what the checkpoint holds. The loader names no technique.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from ..core.registry import load_plugins
from ..core.structure import LINEAR_TYPES

__all__ = [
    "Rebuilder",
    "linear_to_replace",
    "rebuilder_for",
    "rebuilders",
    "register_dequantizer",
    "register_rebuilder",
]


@dataclass(frozen=True)
class Rebuilder:
    """`rebuild(model, manifest)` replaces the layers recorded in manifest section `section`. Rebuilders run by
    increasing `order` (a factorized layer exists before its factors are quantized). `trainable`: whether the
    rebuilt layers take gradients (ordinary weights) or not (packed codes, bitmasks)."""

    section: str
    rebuild: Callable
    order: int
    trainable: bool = False


_REBUILDERS: dict[str, Rebuilder] = {}
_DEQUANTIZERS: list[Callable] = []


def register_rebuilder(section: str, rebuild: Callable, order: int, trainable: bool = False) -> Rebuilder:
    """Register how the layers of manifest section `section` are rebuilt on load. Registering a section twice
    with another function is an error (two techniques claiming one name)."""
    rebuilder = Rebuilder(section, rebuild, order, trainable)
    existing = _REBUILDERS.get(section)
    if existing is not None and existing.rebuild is not rebuild:
        raise ValueError(f"manifest section {section!r} already has a rebuilder ({existing.rebuild.__qualname__})")
    _REBUILDERS[section] = rebuilder
    return rebuilder


def rebuilders() -> list[Rebuilder]:
    return sorted(_REBUILDERS.values(), key=lambda r: r.order)


def rebuilder_for(section: str) -> Rebuilder:
    if section not in _REBUILDERS:
        load_plugins()  # an installed package may register it
    if section not in _REBUILDERS:
        raise ValueError(
            f"the checkpoint holds layers of kind {section!r}, which no imported module knows how to rebuild "
            f"(known: {', '.join(sorted(_REBUILDERS))}); install or import the package that registers it"
        )
    return _REBUILDERS[section]


def register_dequantizer(dequantize: Callable) -> None:
    """`dequantize(model, dtype)` turns a technique's layers back into dense ones (`model.dequantize()`)."""
    if dequantize not in _DEQUANTIZERS:
        _DEQUANTIZERS.append(dequantize)


def dequantizers() -> list[Callable]:
    return list(_DEQUANTIZERS)


def linear_to_replace(model: nn.Module, name: str, verb: str) -> nn.Module:
    """The linear layer `name` that the checkpoint replaces, or an error saying what the checkpoint expected."""
    try:
        module = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"the checkpoint {verb} {name!r}, which {type(model).__name__} does not have") from e
    if not isinstance(module, LINEAR_TYPES):
        raise ValueError(f"the checkpoint {verb} {name!r}, a {type(module).__name__}, not a linear layer")
    return module
