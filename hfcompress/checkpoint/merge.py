"""One way for every technique to record what it changed in a model's manifest."""

from __future__ import annotations

from dataclasses import fields

from torch import nn

from ..core.experts import held_experts, keep_checkpoint_names
from .hf_quantizer import attach_config
from .manifest import LEGACY_ATTRIBUTES, PLAIN_ATTRIBUTE, HfcompressQuantizationConfig, manifest_of

__all__ = ["update_manifest"]

_FIELDS = {f.name for f in fields(HfcompressQuantizationConfig)}


def update_manifest(model: nn.Module, default_method: str = "none", **changes) -> HfcompressQuantizationConfig:
    """Merge `changes` into `model`'s manifest (a new one, named `default_method`, if it has none) and attach it,
    so `save_pretrained` writes it and `from_pretrained` rebuilds the layers.

    Layer records (`lowrank`, `sparse`, `codebooks`, ... and each technique's entry in `layers`) are merged name
    by name, so what earlier steps recorded stays; `modules` gains the new names; other fields are replaced.
    `experts` always lists the mixture-of-experts layers the model holds as one compressed linear per expert
    (`core.experts`). The manifest goes where loading needs it: `quantization_config` once some layer must be rebuilt (and stays
    there), `config.hfcompress` while plain transformers loads the model as it is. A model quantized by another
    method is refused.
    """
    unknown = sorted(set(changes) - _FIELDS)
    if unknown:
        raise TypeError(f"the manifest has no fields {unknown}; it has {', '.join(sorted(_FIELDS))}")
    manifest = manifest_of(model)
    if manifest is None:
        manifest = HfcompressQuantizationConfig(method=default_method)
    for key, value in changes.items():
        current = getattr(manifest, key)
        if key == "layers":
            value = {kind: {**current.get(kind, {}), **records} for kind, records in {**current, **value}.items()}
        elif key == "modules":
            value = list(dict.fromkeys([*current, *value]))
        elif isinstance(current, dict) and key not in ("recipe", "lowrank_recipe"):
            value = {**current, **value}
        setattr(manifest, key, value)
    held = held_experts(model)  # always the model's current state: experts fused again drop out
    if held or manifest.experts:
        manifest.experts = held
        keep_checkpoint_names(model)
    _store(model, manifest)
    return manifest


def _store(model: nn.Module, manifest: HfcompressQuantizationConfig) -> None:
    config = model.config
    for name in LEGACY_ATTRIBUTES:  # moved into the manifest
        if hasattr(config, name):
            delattr(config, name)
    if manifest.needs_hfcompress() or getattr(config, "quantization_config", None) is manifest:
        if hasattr(config, PLAIN_ATTRIBUTE):
            delattr(config, PLAIN_ATTRIBUTE)
        attach_config(model, manifest)
    else:
        setattr(config, PLAIN_ATTRIBUTE, manifest.to_plain_dict())
