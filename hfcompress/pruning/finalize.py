"""`finalize_pruning`: end a pruning run with an ordinary transformers model."""

from __future__ import annotations

import logging

from torch import nn

from .pruner import make_masks_permanent
from .structured import remove_dead_structure

__all__ = ["finalize_pruning"]

logger = logging.getLogger(__name__)


def finalize_pruning(model: nn.Module, remove_structure: bool = True) -> nn.Module:
    """Make the masks permanent (pruned weights become zeros, masks and scores go) and, with
    `remove_structure`, physically remove what is entirely pruned: FFN neurons and attention heads whose
    weights are all zero, so the model gets smaller and faster. Returns the model, changed in place."""
    sparsities = make_masks_permanent(model)
    total = sum(sparsities.values()) / max(len(sparsities), 1)
    logger.info("pruning made permanent on %d layers (mean sparsity %.2f%%)", len(sparsities), 100 * total)
    if remove_structure:
        remove_dead_structure(model)
    return model
