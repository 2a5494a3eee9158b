"""One-shot pruning of a trained model, no training: magnitude, Wanda or SparseGPT, unstructured or N:M.

Wanda and SparseGPT are calibrated block by block like GPTQ (the same capture, trace and Hessian code):
each block sees the outputs of the already pruned blocks before it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..checkpoint import update_manifest
from ..core.structure import candidate_linears, linear_weight, set_linear_weight
from ..core.walk import for_each_block_hessian, stacks_holding
from ..data import calibration_data
from .oneshot_config import OneShotPruningConfig
from .sparsegpt import magnitude_prune, sparsegpt_prune, wanda_prune

__all__ = ["OneShotPruningConfig", "prune_oneshot"]

logger = logging.getLogger(__name__)


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
    stacks = stacks_holding(model, targets)
    outside = [n for n in targets if not any(n.startswith(p + ".") for p, _ in stacks)]
    if outside:
        logger.warning(
            "%d layers outside the block stacks have no calibration data and stay dense: %s", len(outside), outside
        )
    batches = calibration_data(model, config, tokenizer)

    def prune(block, name, module, H):
        set_linear_weight(module, _prune_weight(linear_weight(module), H, config))

    for_each_block_hessian(model, None, batches, targets, prune, f"prune ({config.method})")
