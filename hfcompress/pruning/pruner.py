"""Masks on a live model: attach them to the target layers, recompute them for a sparsity, make them permanent.

The callback only decides *when* (the schedule); this module decides *what*, from the layers' weights or
learned scores, with the pure functions of `masks.py`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..core.structure import find_layer_stack, find_linears, is_excluded
from .config import MovementPruningConfig, PruningConfig
from .masks import block_reduce, global_threshold, topk_mask
from .modules import PruningMask

__all__ = ["Pruner", "make_masks_permanent", "select_pruning_targets"]

logger = logging.getLogger(__name__)

CONFIG_ATTRIBUTE = "hfcompress_pruning_config"


def select_pruning_targets(model: nn.Module, patterns: list[str] | None) -> dict[str, nn.Linear]:
    """The linear layers matched by `patterns`; by default every linear layer inside the transformer blocks."""
    if patterns is None:
        prefix, _ = find_layer_stack(model)
        targets = {name: module for name, module in find_linears(model).items() if name.startswith(prefix + ".")}
    else:
        targets = {name: module for name, module in find_linears(model).items() if is_excluded(name, patterns)}
        if not targets:
            raise ValueError(f"`target_modules` {patterns} match no linear layer of {type(model).__name__}")
    targets = {name: module for name, module in targets.items() if isinstance(module, nn.Linear)}
    if not targets:
        raise ValueError(f"{type(model).__name__} has no linear layers to prune")
    return targets


def _mask_of(module: nn.Module) -> PruningMask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, PruningMask):
            return p
    return None


class Pruner:
    """The pruning state of one model: its targets, each with its `PruningMask`."""

    def __init__(self, model: nn.Module, config: PruningConfig, masks: dict[str, tuple[nn.Linear, PruningMask]]):
        self.model = model
        self.config = config
        self.masks = masks

    @classmethod
    def attach(cls, model: nn.Module, config: PruningConfig) -> Pruner:
        """Register masks (and scores for movement pruning) on the target layers, all kept at first.
        Attaching again with the same config reuses the masks; with another config it is an error."""
        existing = getattr(model, CONFIG_ATTRIBUTE, None)
        if existing is not None:
            if existing.to_dict() != config.to_dict():
                raise ValueError(
                    f"the model already carries pruning masks for {existing}; call finalize_pruning(model) before "
                    f"pruning it with {config}"
                )
            return cls.from_model(model)
        targets = select_pruning_targets(model, config.target_modules)
        scores = isinstance(config, MovementPruningConfig)
        init = config.score_init if scores else 0.0
        masks = {}
        for name, layer in targets.items():
            weight = layer.weight
            mask = PruningMask(tuple(weight.shape), config.block_shape(tuple(weight.shape)), scores, init)
            mask.to(weight.device)
            parametrize.register_parametrization(layer, "weight", mask, unsafe=True)
            masks[name] = (layer, mask)
        setattr(model, CONFIG_ATTRIBUTE, config)
        logger.info("pruning %d linear layers with %s", len(masks), type(config).__name__)
        return cls(model, config, masks)

    @classmethod
    def from_model(cls, model: nn.Module) -> Pruner | None:
        config = getattr(model, CONFIG_ATTRIBUTE, None)
        if config is None:
            return None
        masks = {
            name: (module, mask) for name, module in model.named_modules() if (mask := _mask_of(module)) is not None
        }
        return cls(model, config, masks)

    def importance(self, layer: nn.Linear, mask: PruningMask) -> torch.Tensor:
        if mask.scores is not None:
            return mask.scores.detach()  # sigmoid is monotonic: soft movement ranks by the scores too
        original = layer.parametrizations.weight.original.detach()
        return block_reduce(original.float(), mask.block, "norm")

    @torch.no_grad()
    def update(self, sparsity: float) -> None:
        """Recompute every mask so that `sparsity` of the targeted weights (per layer or overall) are pruned."""
        importance = {name: self.importance(layer, mask) for name, (layer, mask) in self.masks.items()}
        if self.config.effective_ranking == "global":
            # Blocks of different sizes compete per weight: a block's score is compared as it is.
            threshold = global_threshold(list(importance.values()), sparsity) if sparsity > 0 else None
            for name, (_, mask) in self.masks.items():
                keep = torch.ones_like(mask.mask) if threshold is None else importance[name] >= threshold
                mask.mask.copy_(keep)
        else:
            for name, (_, mask) in self.masks.items():
                keep = topk_mask(importance[name], sparsity) if sparsity > 0 else torch.ones_like(mask.mask)
                mask.mask.copy_(keep)

    @torch.no_grad()
    def add_score_penalty(self, strength: float) -> None:
        """Soft movement: add the gradient of `strength * mean(sigmoid(scores))`, scaled to the mean absolute
        score gradient so that `strength` means the same whatever the loss scale."""
        grads = [mask.scores.grad for _, mask in self.masks.values() if mask.scores is not None]
        if strength <= 0 or not grads or any(g is None for g in grads):
            return
        scale = torch.stack([g.abs().mean() for g in grads]).mean()
        for _, mask in self.masks.values():
            s = torch.sigmoid(mask.scores.detach())
            mask.scores.grad.add_(strength * scale * s * (1 - s) / 0.25)

    @torch.no_grad()
    def sparsity(self) -> float:
        """The fraction of the targeted weights that the current masks prune."""
        pruned = total = 0
        for _layer, mask in self.masks.values():
            per_block = mask.block[0] * mask.block[1]
            pruned += int((mask.mask == 0).sum()) * per_block
            total += mask.mask.numel() * per_block
        return pruned / max(total, 1)


def make_masks_permanent(model: nn.Module) -> dict[str, float]:
    """Write `weight * mask` into every masked layer's weight and drop masks and scores; returns each layer's
    sparsity."""
    pruner = Pruner.from_model(model)
    if pruner is None:
        raise ValueError(f"{type(model).__name__} carries no pruning masks (was a PruningCallback attached?)")
    sparsities = {}
    for name, (layer, mask) in pruner.masks.items():
        if mask.scores is not None:
            mask.scores = None  # the straight-through term is zero, but no graph should reach the baked weight
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        sparsities[name] = float((layer.weight == 0).float().mean())
    delattr(model, CONFIG_ATTRIBUTE)
    return sparsities
