"""Choosing one setting per layer under a global budget: a multiple-choice knapsack, solved exactly on a grid."""

from __future__ import annotations

import math

import torch

__all__ = ["allocate", "grid_bits_per_weight"]


def grid_bits_per_weight(
    bits: int, group_size: int, in_features: int, scale_bits: int = 16, sym: bool = False
) -> float:
    """Stored bits per weight of a `QuantLinear`: the codes, plus per group a scale and (asymmetric) a zero point."""
    group = in_features if group_size == -1 else group_size
    return bits + (scale_bits + (0 if sym else bits)) / group


def allocate(
    options: dict[str, list[tuple[float, float]]], budget: float, resolution: int = 4000
) -> dict[str, int] | None:
    """For each layer, the index of one of its `(cost, loss)` options so that the summed cost is at most `budget`
    and the summed loss is the least possible; None when even the cheapest choice everywhere exceeds the budget.

    Dynamic programming over the cost rounded up to `resolution` steps of the budget, so a returned allocation
    never exceeds the budget; it is optimal up to that rounding.
    """
    if budget <= 0:
        return None
    names = list(options)
    unit = budget / resolution
    INF = math.inf
    best = torch.full((resolution + 1,), INF, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for name in names:
        new = torch.full_like(best, INF)
        pick = torch.full((resolution + 1,), -1, dtype=torch.int64)
        for index, (cost, loss) in enumerate(options[name]):
            steps = math.ceil(cost / unit - 1e-9)
            if steps > resolution:
                continue
            candidate = torch.full_like(best, INF)
            candidate[steps:] = best[: resolution + 1 - steps] + loss
            better = candidate < new
            new = torch.where(better, candidate, new)
            pick = torch.where(better, torch.full_like(pick, index), pick)
        best = new
        picks.append(pick)
    if not torch.isfinite(best).any():
        return None
    state = int(torch.argmin(best))
    chosen = {}
    for name, pick in zip(reversed(names), reversed(picks), strict=True):
        index = int(pick[state])
        chosen[name] = index
        state -= math.ceil(options[name][index][0] / unit - 1e-9)
    return dict(reversed(list(chosen.items())))
