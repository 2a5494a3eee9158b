"""How much room a model's weights take: on disk, per weight of the compressed layers, and per parameter of
the whole model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..core.registry import compressed_layer_types, stored_tensors
from ..core.structure import LINEAR_TYPES, linear_weight

__all__ = [
    "bits_per_weight",
    "is_bitsandbytes_linear",
    "layer_bits",
    "model_bits_per_parameter",
    "weights_size_bytes",
]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_size_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files of a model folder (tokenizer and configs not counted). Only the folder's own
    files: subfolders (a recipe's `steps/`, a search's candidates) hold other models."""
    return sum(f.stat().st_size for f in weight_files(folder))


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a model folder (its own, not those of subfolders), by name."""
    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"sha256", "bytes"} of a file, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(16 << 20):
            digest.update(piece)
    return {"sha256": digest.hexdigest(), "bytes": os.path.getsize(path)}


def is_bitsandbytes_linear(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and hasattr(module, "in_features")


def _tensor_bits(tensor, dtype_bits: int | None) -> int:
    bits = tensor.element_size() * 8
    if dtype_bits is not None and tensor.is_floating_point():
        bits = min(bits, dtype_bits)  # saved in the checkpoint's dtype, whatever it is computed in
    return tensor.numel() * bits


def _holds_weights(module: nn.Module) -> bool:
    """A layer that stands for a dense linear weight: a registered compressed layer, a bitsandbytes layer, one
    that declares `STORED_MODULES` (a factorized layer: its factors), or a linear another library quantized in
    place (`_quantized_in_place`)."""
    return (
        isinstance(module, compressed_layer_types())
        or is_bitsandbytes_linear(module)
        or hasattr(type(module), "STORED_MODULES")
        or _quantized_in_place(module)
    )


def _quantized_in_place(module: nn.Module) -> bool:
    """A linear that compressed-tensors quantized in place as transformers loads it: packed codes and no `weight`
    (`weight_packed`), or an integer `weight` beside its `weight_scale` (W8A8's int-quantized)."""
    return isinstance(module, nn.Linear) and (not hasattr(module, "weight") or hasattr(module, "weight_scale"))


def layer_bits(module: nn.Module, dtype_bits: int | None = None) -> int:
    """Stored bits of what holds `module`'s weight, its bias excluded: a compressed layer's `STORED_TENSORS`
    (codes, scales, zero points, bitmasks, codebooks), a bitsandbytes layer's packed weight and quantization
    state, a factorized layer's factors (each counted by this same rule), a plain linear's weight. Floating
    tensors count at most `dtype_bits` (the dtype the checkpoint is saved in) when given."""
    if is_bitsandbytes_linear(module):
        return sum(_tensor_bits(t, None) for k, t in module.state_dict().items() if k != "bias")
    if isinstance(module, compressed_layer_types()):
        return sum(_tensor_bits(t, dtype_bits) for t in stored_tensors(module) if t is not None)
    if hasattr(type(module), "STORED_MODULES"):
        return sum(layer_bits(module.get_submodule(name), dtype_bits) for name in type(module).STORED_MODULES)
    if _quantized_in_place(module):  # codes and scales (compressed-tensors' weight_packed or int8 weight)
        return sum(_tensor_bits(t, dtype_bits) for k, t in module.state_dict().items() if k != "bias")
    return _tensor_bits(linear_weight(module), dtype_bits)


def bits_per_weight(model: nn.Module, dtype_bits: int | None = None) -> float:
    """The one definition hfcompress reports (evaluate, records, cards, search): stored bits of the compressed
    layers (`layer_bits`: codes, scales, zero points, bitmasks, codebooks, factors; biases excluded) over the
    weights of the dense layers they stand for. A model with no compressed layer: the bits of its linear weights
    (lm_head excluded when it is the output embedding). `model_bits_per_parameter` is the whole-model figure."""
    stored_bits, weights, inside = 0, 0, ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue  # the factors of a factorized layer count with it
        if _holds_weights(module):
            stored_bits += layer_bits(module, dtype_bits)
            weights += module.in_features * module.out_features
            inside = name + "."
    if weights:
        return stored_bits / weights
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, LINEAR_TYPES) and module is not output_embeddings:
            stored_bits += layer_bits(module, dtype_bits)
            weights += linear_weight(module).numel()
    return stored_bits / weights if weights else float("nan")


def model_bits_per_parameter(model: nn.Module, dtype_bits: int | None = None) -> float:
    """The whole-model figure: stored bits of every tensor of the model (embeddings, norms, biases included; a
    tied weight once) over the parameters of the model it stands for (each compressed layer counted at its dense
    size)."""
    stored_bits, parameters, seen, inside = 0, 0, set(), ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        if _holds_weights(module):
            inside = name + "."
            state = module.state_dict(keep_vars=True)
            tensors = [t for t in state.values() if id(t) not in seen]
            biases = sum(t.numel() for k, t in state.items() if k.rsplit(".", 1)[-1] == "bias")
            parameters += module.in_features * module.out_features + biases
        else:
            saved_buffers = [
                b for n, b in module._buffers.items() if b is not None and n not in module._non_persistent_buffers_set
            ]
            tensors = [t for t in [*module.parameters(recurse=False), *saved_buffers] if id(t) not in seen]
            parameters += sum(p.numel() for p in module.parameters(recurse=False) if id(p) not in seen)
        seen.update(id(t) for t in tensors)
        stored_bits += sum(_tensor_bits(t, None if is_bitsandbytes_linear(module) else dtype_bits) for t in tensors)
    return stored_bits / parameters if parameters else float("nan")
