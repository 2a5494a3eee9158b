"""Loading that cannot be silently wrong: the compressed layers a manifest rebuilds must find exactly their tensors,
with the shapes and dtypes they expect, in the checkpoint's files, and their scales and codebooks must be finite.

`check_tensors` runs before the weights load (on the checkpoint files' headers only), `check_finite` after;
`from_pretrained` runs both through the `HfQuantizer`; `steps.verify_folder` (`hfcompress verify`) adds the checks
of a whole folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core.linalg import all_finite
from ..core.registry import compressed_layer_types
from ..core.stored_layout import SavedNames

__all__ = ["CheckpointError", "check_finite", "check_tensors", "checkpoint_tensors"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint whose weights disagree with its manifest, or hold non-finite values."""


def checkpoint_tensors(files) -> dict[str, tuple[tuple[int, ...], torch.dtype | None, str]]:
    """{tensor name: (shape, dtype, file name)} from the headers of the safetensors `files` (nothing is read
    beyond the headers). A file that is not valid safetensors is an error naming it."""
    found = {}
    for file in files:
        if not str(file).endswith(".safetensors"):
            continue
        try:
            with safe_open(os.fspath(file), framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    found[name] = (tuple(piece.get_shape()), _DTYPES.get(piece.get_dtype()), Path(file).name)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise CheckpointError(
                f"{os.fspath(file)} is not a readable safetensors file ({e}); download it again"
            ) from e
    return found


def check_tensors(model: nn.Module, files) -> int:
    """Check that every compressed layer of `model` (rebuilt from the manifest, weights not loaded yet) finds each
    of its tensors in `files` with its shape and dtype, and that the files hold no tensor of such a layer that it
    does not have (a manifest edited by hand: `sym`, `act_order`, bits or group size changed). A layer's tensors
    are looked for under its own name and under the one `save_pretrained` writes (LLaVA's `language_model.model.`:
    `core.stored_layout.SavedNames`). Returns the number of layers checked; layers whose names the files do not
    use at all are skipped (another naming)."""
    tensors = checkpoint_tensors(files)
    if not tensors:
        return 0
    prefixes = _prefixes(model, tensors)
    renamed = SavedNames.of(model)
    # each key under every module name it lies in: a layer's keys are found at once, not by scanning every key
    # for each of a mixture of experts' tens of thousands of layers
    under: dict[str, list[str]] = {}
    for key in tensors:
        parts = key.split(".")
        for end in range(1, len(parts)):
            under.setdefault(".".join(parts[:end]), []).append(key)
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, compressed_layer_types()):
            continue
        names = dict.fromkeys([name, name if renamed is None else renamed.saved_module(name)])
        stored_as = next((f"{p}{n}" for n in names for p in prefixes if f"{p}{n}" in under), None)
        if stored_as is None:
            continue
        expected = {key: (tuple(t.shape), t.dtype) for key, t in module.state_dict().items()}
        stored = {key[len(stored_as) + 1 :]: tensors[key] for key in under[stored_as]}
        # floating-point tensors of a layer that does not keep its dtype are cast on loading like any weight
        _compare(
            name, type(module).__name__, expected, stored, exact_floats=getattr(type(module), "KEEPS_DTYPE", False)
        )
        checked += 1
    return checked


def _prefixes(model: nn.Module, tensors: dict) -> list[str]:
    base = getattr(model, "base_model_prefix", "")
    return ["", f"{base}."] if base else [""]


def _compare(name: str, kind: str, expected: dict, stored: dict, exact_floats: bool = True) -> None:
    missing = sorted(set(expected) - set(stored))
    if missing:
        raise CheckpointError(
            f"layer {name!r} ({kind}) needs tensor(s) {missing}, which the checkpoint does not hold: the weight files "
            "are incomplete or do not belong to this config"
        )
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(
            f"the checkpoint holds {extra} for layer {name!r} ({kind}), which its manifest says it has not: the "
            "quantization_config (sym, act_order, bits, group size) does not match the weights"
        )
    for key, (shape, dtype) in expected.items():
        found_shape, found_dtype, file = stored[key]
        # a compressed layer's bias is a plain weight, cast on loading (`core.structure.cast_unquantized`)
        if (
            (not exact_floats or key == "bias")
            and found_dtype is not None
            and found_dtype.is_floating_point
            and dtype.is_floating_point
        ):
            found_dtype = dtype
        if found_shape != shape or (found_dtype is not None and found_dtype != dtype):
            raise CheckpointError(
                f"{name}.{key} ({kind}) is {list(found_shape)} {found_dtype} in {file}, the manifest expects {list(shape)} "
                f"{dtype}: the quantization_config (bits, group size) does not match the weights"
            )


def check_finite(model: nn.Module) -> int:
    """Fail on a compressed layer whose floating-point stored tensors (scales, codebooks, values) hold NaN or inf;
    returns the number of layers checked."""
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, compressed_layer_types()):
            continue
        for key in type(module).STORED_TENSORS:
            tensor = getattr(module, key, None)
            if tensor is not None and tensor.is_floating_point() and not all_finite(tensor):
                bad = int((~torch.isfinite(tensor)).sum())
                raise CheckpointError(f"{name}.{key} holds {bad} NaN or infinite value(s): the checkpoint is corrupt")
        checked += 1
    return checked
