"""The mask a pruned linear layer applies to its weight, as a `torch.nn.utils.parametrize` parametrization.

Registered on `layer.weight`, it makes `layer.weight` read `original * mask` in every forward (training,
evaluation, generation) without changing the layer's class, so peft, accelerate and DDP see an ordinary
`nn.Linear`. The dense weight stays in `layer.parametrizations.weight.original`; the mask and, for movement
pruning, the importance scores are saved in Trainer checkpoints with the rest of the model.
"""

from __future__ import annotations

import torch
from torch import nn

from .masks import block_grid, expand_blocks

__all__ = ["PruningMask"]


class PruningMask(nn.Module):
    """`weight -> weight * mask`, the mask given per block. With `scores`, the forward pass also carries the
    straight-through estimator: the scores get the gradient `dL/dW' * W` (summed over each block), as if the
    binary mask were the scores themselves."""

    def __init__(self, shape: tuple[int, int], block: tuple[int, int], scores: bool = False, score_init: float = 0.0):
        super().__init__()
        self.block = tuple(block)
        grid = block_grid(tuple(shape), self.block)
        self.register_buffer("mask", torch.ones(grid, dtype=torch.uint8))
        if scores:
            self.scores = nn.Parameter(torch.full(grid, float(score_init)))
        else:
            self.scores = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(weight.dtype)
        if self.scores is not None:
            scores = self.scores.to(weight.dtype)
            mask = mask + (scores - scores.detach())
        return weight * expand_blocks(mask, self.block)

    def extra_repr(self) -> str:
        return f"block={self.block}, scores={self.scores is not None}"
