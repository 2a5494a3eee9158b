"""Masks as pure tensor functions: importance at a block granularity, then the blocks to keep.

A granularity is a block shape `(rows, columns)` of the weight matrix: `(1, 1)` for single weights,
`(1, in_features)` for whole rows (output neurons), `(out_features, 1)` for whole columns (input features),
or something like `(32, 32)`. Scores live on the grid of blocks; masks are expanded back to the weight.
"""

from __future__ import annotations

import torch

__all__ = [
    "block_grid",
    "block_reduce",
    "expand_blocks",
    "global_threshold",
    "keep_count",
    "n_m_mask",
    "topk_mask",
]


def block_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """The shape of the block grid; a block must tile the matrix exactly."""
    (rows, cols), (bh, bw) = shape, block
    if bh < 1 or bw < 1 or rows % bh or cols % bw:
        raise ValueError(f"block {bh}x{bw} does not divide a {rows}x{cols} weight matrix")
    return rows // bh, cols // bw


def block_reduce(values: torch.Tensor, block: tuple[int, int], reduce: str = "sum") -> torch.Tensor:
    """Reduce a matrix to its block grid by `sum`, `mean` or `norm` (L2) over each block."""
    gh, gw = block_grid(tuple(values.shape), block)
    if block == (1, 1):
        return values.abs().clone() if reduce == "norm" else values.clone()
    tiles = values.reshape(gh, block[0], gw, block[1])
    if reduce == "sum":
        return tiles.sum(dim=(1, 3))
    if reduce == "mean":
        return tiles.mean(dim=(1, 3))
    if reduce == "norm":
        return tiles.float().pow(2).sum(dim=(1, 3)).sqrt()
    raise ValueError(f"reduce must be 'sum', 'mean' or 'norm', got {reduce!r}")


def expand_blocks(grid: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Blow a block grid up to the weight's shape (each value repeated over its block)."""
    if block == (1, 1):
        return grid
    return grid.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)


def keep_count(numel: int, sparsity: float) -> int:
    """How many of `numel` entries survive at `sparsity` (rounded, never all pruned)."""
    return max(1, round(numel * (1.0 - sparsity)))


def topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A boolean mask keeping the highest `1 - sparsity` fraction of `scores` (ties broken by position)."""
    keep = keep_count(scores.numel(), sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[torch.topk(scores.flatten().float(), keep, sorted=False).indices] = True
    return mask.view_as(scores)


def global_threshold(scores: list[torch.Tensor], sparsity: float) -> torch.Tensor:
    """The score below which entries are pruned so that `sparsity` of all `scores` together go."""
    flat = torch.cat([s.detach().flatten().float() for s in scores])
    keep = keep_count(flat.numel(), sparsity)
    return torch.topk(flat, keep, sorted=False).values.min()


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Semi-structured N:M: in every run of `m` consecutive inputs of a row, keep the `n` best."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{n}:{m} sparsity needs in_features divisible by {m}, got {cols}")
    groups = scores.float().reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return mask.reshape(rows, cols)
