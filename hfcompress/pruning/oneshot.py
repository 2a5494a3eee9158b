"""One-shot pruning of a trained model, no training: magnitude, Wanda or SparseGPT, unstructured or N:M.

Wanda and SparseGPT are calibrated block by block like GPTQ (the same capture, trace and Hessian code):
each block sees the outputs of the already pruned blocks before it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..checkpoint import update_manifest
from ..core.calibration import for_each_block_hessian
from ..core.config import CalibrationArguments, CompressionConfig, deprecated_aliases
from ..core.structure import candidate_linears, find_layer_stack, linear_weight, set_linear_weight
from ..data import calibration_batches, calibration_windows
from .sparsegpt import magnitude_prune, sparsegpt_prune, wanda_prune

__all__ = ["OneShotPruningConfig", "prune_oneshot"]

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


@deprecated_aliases(blocksize="block_size")
@dataclass
class OneShotPruningConfig(CalibrationArguments, CompressionConfig):
    """Prune a trained model in one pass. `magnitude` needs no data; `wanda` and `sparsegpt` need
    calibration texts (`dataset`)."""

    technique: ClassVar[str] = "oneshot"

    method: Literal["magnitude", "wanda", "sparsegpt"] = field(
        default="sparsegpt",
        metadata={
            "help": "magnitude: smallest |W| per layer. wanda: smallest |W| * input norm per output row. "
            "sparsegpt: Hessian-based mask with weight updates that compensate the pruned weights."
        },
    )
    sparsity: float = field(default=0.5, metadata={"help": "Fraction of the weights pruned, in [0, 1)."})
    pattern: str | None = field(
        default=None,
        metadata={
            "help": "Semi-structured 'N:M' (e.g. '2:4': N of every M consecutive inputs kept) instead of unstructured."
        },
    )
    damp_percent: float = field(
        default=0.01, metadata={"help": "SparseGPT: dampening, fraction of the mean Hessian diagonal."}
    )
    block_size: int = field(default=128, metadata={"help": "SparseGPT: columns pruned together."})
    modules_to_not_convert: list[str] | None = field(
        default=None,
        metadata={"help": "Linear layers left dense (names, suffixes or 're:' regexes). Default: lm_head."},
    )

    def __post_init__(self):
        if self.method not in ("magnitude", "wanda", "sparsegpt"):
            raise ValueError(f"`method` must be 'magnitude', 'wanda' or 'sparsegpt', got {self.method!r}")
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {self.sparsity!r}")
        if self.pattern is not None:
            match = re.fullmatch(r"(\d+):(\d+)", str(self.pattern))
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise ValueError(f"`pattern` must look like '2:4' (N:M with 0 < N < M), got {self.pattern!r}")
            _, m = self.nm
            if self.block_size % m:
                raise ValueError(f"`block_size` ({self.block_size}) must be a multiple of M ({m})")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"`block_size` must be a positive integer, got {self.block_size!r}")
        self.check_calibration()

    @property
    def nm(self) -> tuple[int, int]:
        if self.pattern is None:
            return (0, 0)
        n, m = (int(x) for x in self.pattern.split(":"))
        return n, m

    @property
    def effective_sparsity(self) -> float:
        n, m = self.nm
        return 1 - n / m if m else self.sparsity

    @classmethod
    def header(cls) -> dict[str, Any]:
        return {"pruning_method": "oneshot", "version": FORMAT_VERSION}


def _prune_weight(W: torch.Tensor, H: torch.Tensor | None, config: OneShotPruningConfig) -> torch.Tensor:
    n, m = config.nm
    if config.method == "magnitude":
        return magnitude_prune(W, config.sparsity, n, m)
    if config.method == "wanda":
        return wanda_prune(W, H, config.sparsity, n, m)
    return sparsegpt_prune(W, H, config.sparsity, n, m, config.block_size, config.damp_percent)


@torch.no_grad()
def prune_oneshot(model: nn.Module, config: OneShotPruningConfig, tokenizer=None) -> nn.Module:
    """Prune `model`'s linear layers in place as `config` says; returns it. Pruned weights are exact zeros
    (save with `save_sparse` for a checkpoint that shows the saving)."""
    targets = candidate_linears(model, config.modules_to_not_convert)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no linear layers to prune")
    _, m = config.nm
    if m:
        bad = [name for name, t in targets.items() if linear_weight(t).shape[1] % m]
        if bad:
            raise ValueError(f"{config.pattern} pruning needs in_features divisible by {m}; these are not: {bad}")
    if config.method == "magnitude":
        for module in tqdm(targets.values(), desc="prune (magnitude)"):
            set_linear_weight(module, _prune_weight(linear_weight(module), None, config))
    else:
        _prune_calibrated(model, targets, config, tokenizer)
    update_manifest(model, "oneshot", pruning=config.to_dict())
    return model


def _prune_calibrated(model: nn.Module, targets: dict[str, nn.Module], config: OneShotPruningConfig, tokenizer):
    if config.dataset is None:
        raise ValueError(f"method {config.method!r} needs calibration data: pass `dataset=` (texts or a text file)")
    prefix_of_stack, blocks = find_layer_stack(model)
    outside = [n for n in targets if not n.startswith(prefix_of_stack + ".")]
    if outside:
        logger.warning(
            "%d layers outside the block stack have no calibration data and stay dense: %s", len(outside), outside
        )
    windows = calibration_windows(model, config.dataset, config.seq_len, tokenizer)
    batches = calibration_batches(windows, config.num_samples, config.batch_size)

    def prune(block, name, module, H):
        set_linear_weight(module, _prune_weight(linear_weight(module), H, config))

    for_each_block_hessian(model, blocks, batches, targets, prune, f"prune ({config.method})")
