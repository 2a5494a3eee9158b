"""How much room a model's weights take: on disk, and per weight in the quantized layers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..core.registry import stored_tensors
from ..core.structure import LINEAR_TYPES, linear_weight

__all__ = ["bits_per_weight", "is_bitsandbytes_linear", "weights_size_bytes"]

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


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight of the compressed layers (quantized, codebook, bitmask-sparse: the tensors each
    declares in `STORED_TENSORS`) over the number of weights they stand for. For a model with no quantized layer, the bits of its linear weights (lm_head
    excluded when it is the output embedding)."""
    stored_bits, weights = 0, 0
    for module in model.modules():
        if is_bitsandbytes_linear(module):  # packed weight plus its serialized quantization state
            stored_bits += sum(t.numel() * t.element_size() * 8 for k, t in module.state_dict().items() if k != "bias")
            weights += module.in_features * module.out_features
            continue
        tensors = stored_tensors(module)  # what a registered compressed layer stores for its weight
        if tensors:
            stored_bits += sum(t.numel() * t.element_size() * 8 for t in tensors if t is not None)
            weights += module.in_features * module.out_features
    if weights:
        return stored_bits / weights
    output_embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, LINEAR_TYPES) and module is not output_embeddings:
            w = linear_weight(module)
            stored_bits += w.numel() * w.element_size() * 8
            weights += w.numel()
    return stored_bits / weights if weights else float("nan")
