"""Saving a quantized model as a complete folder, in hfcompress's own format or as compressed-tensors."""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch.nn as nn

from ..core.experts import held_experts
from ..io import atomic_output_dir, check_output_dir, copy_model_extras
from .config import FORMATS
from .export import (
    ASYMMETRIC_UNEVEN,
    check_compressed_tensors_compatible,
    compressed_tensors_config,
    compressed_tensors_state_dict,
)

__all__ = ["FORMATS", "check_format", "save_quantized", "write_quantized"]

logger = logging.getLogger(__name__)


def save_quantized(
    model: nn.Module,
    output: str | os.PathLike,
    format: Literal["hfcompress", "compressed-tensors"] = "hfcompress",
    tokenizer=None,
    source: str | os.PathLike | None = None,
    overwrite: bool = False,
    on_staging=None,
) -> None:
    """Write `model` to `output` with its tokenizer (saved, or copied from the local folder `source`).

    `output` is refused if it exists and is not empty, unless `overwrite`; it is written to a temporary
    folder first, so an error or an interruption leaves it as it was. `on_staging(folder)` runs on that
    temporary folder once the model is in it (to add a compression record and a card).
    """
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "compressed-tensors":
        check_compressed_tensors_compatible(model)
    check_output_dir(output, overwrite, inputs=[source])
    with atomic_output_dir(output, overwrite) as staging:
        write_quantized(model, staging, format)
        if source is not None and os.path.isdir(source):
            copy_model_extras(source, staging)
        elif tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if on_staging is not None:
            on_staging(staging)
    logger.info("saved %s checkpoint to %s", format, output)


def write_quantized(model: nn.Module, folder, format: str = "hfcompress") -> None:
    """Write the weights and config of a quantized `model` into `folder` in `format`."""
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {', '.join(FORMATS)}, got {format!r}")
    if format == "hfcompress":
        model.save_pretrained(folder)
    else:
        check_compressed_tensors_compatible(model)
        _save_compressed_tensors(model, folder)


def check_format(config, format: str = "hfcompress") -> None:
    """Refuse, before any work, a format the config cannot be saved in."""
    if format not in FORMATS:
        raise ValueError(f"`format` must be one of {', '.join(FORMATS)}, got {format!r}")
    if format != "compressed-tensors":
        return
    # what the config alone shows compressed-tensors cannot hold, refused before hours of streaming
    if not getattr(config, "sym", True):
        bits = {getattr(config, "bits", 4), *(getattr(config, "layer_bits", None) or {}).values()}
        uneven = sorted(b for b in bits if 32 % b)
        if uneven:
            raise ValueError(
                f"format compressed-tensors with an asymmetric {'/'.join(map(str, uneven))}-bit grid: {ASYMMETRIC_UNEVEN}"
            )
    if getattr(config, "act_order", False) and not getattr(config, "static_groups", False):
        raise ValueError(
            "format compressed-tensors cannot store act-order with dynamic groups (a per-column g_idx): add "
            "--static-groups, or save with --format hfcompress"
        )
    if getattr(config, "compensates", False):
        raise ValueError(
            "format compressed-tensors cannot express a low-rank correction of the quantization error "
            "(--lowrank-compensation, --compensation-bits): save with --format hfcompress"
        )


def _save_compressed_tensors(model: nn.Module, folder) -> None:
    state_dict = compressed_tensors_state_dict(model)
    config = model.config
    own_config, quantizer = config.quantization_config, model.hf_quantizer
    config.quantization_config = compressed_tensors_config(model)
    model.hf_quantizer = None
    # held experts keep their own names in hfcompress checkpoints (`core.experts.keep_checkpoint_names`); here they
    # are per-expert already, and the rest gets the names transformers itself saves (Mixtral's `block_sparse_moe`)
    conversions = model.__dict__.get("_weight_conversions")
    if conversions == [] and held_experts(model):
        model._weight_conversions = None
    try:
        model.save_pretrained(folder, state_dict=state_dict)
    finally:
        config.quantization_config, model.hf_quantizer = own_config, quantizer
        if conversions is not None:
            model._weight_conversions = conversions
