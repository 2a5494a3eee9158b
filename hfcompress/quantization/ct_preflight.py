"""What a model's structure alone shows that a compressed-tensors checkpoint of it cannot hold, refused before any
layer is quantized: read from its config and a skeleton on the meta device, so an hours-long run (streamed or in
memory) is not lost at the save. What only the quantized layers show (grids of fused siblings) is still checked
at the save (`export.check_compressed_tensors_compatible`)."""

from __future__ import annotations

import logging
import os

import transformers
from accelerate import init_empty_weights
from transformers import AutoConfig

from ..core.experts import expert_modules, unfuse_experts
from ..core.structure import candidate_linears
from ..core.tasks import AUTO_CLASSES, task_of
from .expert_layout import expert_checkpoint_names
from .export import UNLOADABLE

__all__ = ["check_model_for_format"]

logger = logging.getLogger(__name__)


def check_model_for_format(model: str | os.PathLike, config, format: str = "hfcompress") -> None:
    """Refuse, with the reason, a local `model` whose compressed-tensors checkpoint transformers could not load:
    a model type it fails on, linears of another class than `nn.Linear` (GPT-2's `Conv1D`), and experts to be
    quantized with no per-expert checkpoint layout (GPT-OSS; experts left plain are written as they are:
    `quantization.export`). Nothing for other formats, Hub ids, or models whose config transformers
    cannot build offline (their save checks them)."""
    path = os.fspath(model)
    if format != "compressed-tensors" or not os.path.isfile(os.path.join(path, "config.json")):
        return
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as error:  # remote code, unknown types: the save refuses what it cannot hold
        logger.debug("no structural check of %s: %s", path, error)
        return
    if model_config.model_type in UNLOADABLE:
        raise ValueError(
            f"transformers cannot load a compressed-tensors {model_config.model_type} checkpoint: "
            f"{UNLOADABLE[model_config.model_type]}. Save with --format hfcompress"
        )
    if getattr(model_config, "quantization_config", None) is not None:
        return  # compressed already: what reads it checks it
    try:  # the head the command loads: the config's, else the checkpoint's own
        task = getattr(config, "task", None) or task_of(model_config.model_type, model_config.architectures)
    except ValueError:  # a head no task loads: loading refuses it first
        return
    auto_class = getattr(transformers, AUTO_CLASSES[task])
    try:
        with init_empty_weights(include_buffers=False):
            skeleton = auto_class.from_config(model_config)
    except ValueError as error:  # no such head for this model type: what loads it refuses that first
        logger.debug("no structural check of %s: %s", path, error)
        return
    unfuse_experts(skeleton)
    linears = candidate_linears(skeleton, getattr(config, "modules_to_not_convert", None))
    classes = sorted({type(m).__name__ for m in linears.values()} - {"Linear"})
    if classes:
        raise ValueError(
            f"compressed-tensors targets layers of class Linear; {type(skeleton).__name__} would quantize {classes} "
            "layers (GPT-2's Conv1D stores its weight transposed; Falcon's FalconLinear is a class of its own). Save "
            "with --format hfcompress"
        )
    experts = expert_modules(skeleton)
    if any(name.rsplit(".", 2)[0] in experts for name in linears):  # experts quantized (`<experts>.gate_up_proj.3`)
        expert_checkpoint_names(skeleton)  # raises where the checkpoint keeps the experts fused
