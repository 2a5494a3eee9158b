"""One-shot pruning of a trained model, no training: magnitude, Wanda or SparseGPT, unstructured or N:M.

Wanda and SparseGPT are calibrated block by block like GPTQ (the same capture, trace and Hessian code):
each block sees the outputs of the already pruned blocks before it.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..checkpoint import update_manifest
from ..core.structure import candidate_linears, linear_weight, set_linear_weight
from ..core.walk import calibrate_blocks, stacks_holding
from ..data import calibration_data
from .oneshot_config import OneShotPruningConfig
from .sparsegpt import magnitude_prune, sparsegpt_factor, sparsegpt_prune, sparsegpt_prune_factored, wanda_prune

__all__ = ["OneShotPruningConfig", "group_pruner", "prune_oneshot", "prune_weight", "pruning_targets"]

logger = logging.getLogger(__name__)


def prune_weight(W: torch.Tensor, H: torch.Tensor | None, config: OneShotPruningConfig) -> torch.Tensor:
    """`W` pruned as `config` says (`H`: its input Hessian, None for magnitude)."""
    n, m = config.nm
    if config.method == "magnitude":
        return magnitude_prune(W, config.sparsity, n, m)
    if config.method == "wanda":
        return wanda_prune(W, H, config.sparsity, n, m)
    return sparsegpt_prune(W, H, config.sparsity, n, m, config.block_size, config.damp_percent)


def group_pruner(modules: dict[str, nn.Module], config: OneShotPruningConfig):
    """A block solver (`core.walk.calibrate_blocks`) pruning `modules` (by name in the block) as `config` says.
    Layers that read the same input share its Hessian: SparseGPT factors it once for all of them, in the
    Hessian's own memory (the walk hands each group's Hessian over, never to use it again); Wanda reads only its
    diagonal (walk with `diagonal`)."""

    def solve(names: list[str], H: torch.Tensor) -> dict:
        if config.method == "sparsegpt":
            n, m = config.nm
            Hinv, dead = sparsegpt_factor(H, config.damp_percent, overwrite=True)
            prune = functools.partial(
                sparsegpt_prune_factored, Hinv=Hinv, dead=dead, sparsity=config.sparsity, n=n, m=m,
                block_size=config.block_size,
            )  # fmt: skip
        else:
            prune = functools.partial(prune_weight, H=H, config=config)
        for name in names:
            set_linear_weight(modules[name], prune(linear_weight(modules[name])))
        return {}

    return solve


@torch.no_grad()
def prune_oneshot(model: nn.Module, config: OneShotPruningConfig, tokenizer=None) -> nn.Module:
    """Prune `model`'s linear layers in place as `config` says; returns it. Pruned weights are exact zeros
    (save with `save_sparse` for a checkpoint that shows the saving)."""
    targets = pruning_targets(model, config)
    if config.method == "magnitude":
        for module in tqdm(targets.values(), desc="prune (magnitude)"):
            set_linear_weight(module, prune_weight(linear_weight(module), None, config))
    else:
        _prune_calibrated(model, targets, config, tokenizer)
    update_manifest(model, "oneshot", pruning=config.to_dict())
    return model


def pruning_targets(model: nn.Module, config: OneShotPruningConfig) -> dict[str, nn.Module]:
    """The linear layers `config` prunes, by full name; refuses a model with none, or with layers an N:M pattern
    cannot divide."""
    targets = candidate_linears(model, config.modules_to_not_convert)
    if not targets:
        raise ValueError(f"{type(model).__name__} has no linear layers to prune")
    _, m = config.nm
    if m:
        bad = [name for name, t in targets.items() if linear_weight(t).shape[1] % m]
        if bad:
            raise ValueError(f"{config.pattern} pruning needs in_features divisible by {m}; these are not: {bad}")
    return targets


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
    for _, stack in stacks:
        walk = calibrate_blocks(
            model, stack, batches, targets, lambda block, prefix, modules: group_pruner(modules, config),
            true_sequential=False, desc=f"prune ({config.method})", diagonal=config.method == "wanda",
            hessian_dtype=getattr(torch, config.hessian_dtype),
        )  # fmt: skip
        for _ in walk:
            pass
