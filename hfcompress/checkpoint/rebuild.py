"""The rebuild registry: how each kind of compressed layer is rebuilt when a checkpoint loads.

A technique registers one `Rebuilder` per manifest section it writes (`register_rebuilder`); the loader runs
them in their `order` on the model transformers built from its config, before the weights load, so every
layer has the shape and buffers of what the checkpoint holds. The loader names no technique. Registering imports
no torch: a rebuilder is usually a `lazy` reference, imported when a checkpoint needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..core.registry import lazy, load_plugins

__all__ = [
    "Rebuilder",
    "ordinary_weights",
    "rebuilder_for",
    "rebuilders",
    "register_dequantizer",
    "register_rebuilder",
]


@dataclass(frozen=True)
class Rebuilder:
    """`rebuild(model, manifest)` replaces the layers recorded in manifest section `section`. Rebuilders run by
    increasing `order` (a factorized layer exists before its factors are quantized). `trainable`: whether the
    rebuilt layers take gradients (ordinary weights) or not (packed codes, bitmasks). `finish(model, manifest)`,
    if given, runs after the weights loaded (to convert an older layout into the current one)."""

    section: str
    rebuild: Callable
    order: int
    trainable: bool = False
    finish: Callable | None = None


_REBUILDERS: dict[str, Rebuilder] = {}
_DEQUANTIZERS: list[Callable] = []


def register_rebuilder(
    section: str, rebuild: Callable, order: int, trainable: bool = False, finish: Callable | None = None
) -> Rebuilder:
    """Register how the layers of manifest section `section` are rebuilt on load. Registering a section twice
    with another function is an error (two techniques claiming one name)."""
    rebuilder = Rebuilder(section, rebuild, order, trainable, finish)
    existing = _REBUILDERS.get(section)
    if existing is not None and existing.rebuild is not rebuild and existing.rebuild != rebuild:
        raise ValueError(f"manifest section {section!r} already has a rebuilder ({existing.rebuild!r})")
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


def ordinary_weights(sections: list[str]) -> bool:
    """Whether the layers of these manifest sections all hold ordinary weights (their rebuilders are `trainable`:
    factorized, resized, experts held as linears): they take gradients, and compressing again reads them as any
    linear."""
    return all(rebuilder_for(section).trainable for section in sections)


def register_dequantizer(dequantize: Callable) -> None:
    """`dequantize(model, dtype)` turns a technique's layers back into dense ones (`model.dequantize()`)."""
    if dequantize not in _DEQUANTIZERS:
        _DEQUANTIZERS.append(dequantize)


def dequantizers() -> list[Callable]:
    return list(_DEQUANTIZERS)


# fused mixture-of-experts modules held as one linear per expert: rebuilt first, so their experts' layers exist
register_rebuilder("experts", lazy("hfcompress.core.experts:rebuild_experts"), order=0, trainable=True)
