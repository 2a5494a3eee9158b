"""Choosing each layer's rank under a global parameter budget: pure functions on per-layer error curves."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .svd import max_saving_rank, rank_for_ratio

__all__ = ["ErrorCurve", "allocate_ranks", "uniform_ranks"]


@dataclass
class ErrorCurve:
    """A layer's predicted loss increase at every rank: `weight * tail[r]`, where `tail[r]` is the squared
    norm of the singular values a rank-r truncation drops and `weight` the measured loss increase per unit of
    it (the layer's sensitivity). Ranks below `min_rank` (the smallest one measured) are not offered: the
    prediction is not trusted beyond what was measured."""

    out_features: int
    in_features: int
    tail: torch.Tensor
    weight: float = 1.0
    measured: dict[int, float] = field(default_factory=dict)
    min_rank: int = 1

    @classmethod
    def from_singular_values(
        cls, S: torch.Tensor, out_features: int, in_features: int, weight: float = 1.0
    ) -> ErrorCurve:
        squares = S.double().square().flip(0).cumsum(0).flip(0)
        tail = torch.cat([squares, squares.new_zeros(1)])  # tail[r] = sum of S[r:]**2
        return cls(out_features, in_features, tail, weight)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    def choose(self, price: float) -> int | None:
        """The rank minimizing loss + price * parameters; None when the dense layer is cheaper."""
        limit = min(max_saving_rank(self.out_features, self.in_features), len(self.tail) - 1)
        if limit < self.min_rank:
            return None
        ranks = torch.arange(self.min_rank, limit + 1, dtype=torch.float64)
        cost = self.weight * self.tail[self.min_rank : limit + 1] + price * ranks * (
            self.out_features + self.in_features
        )
        best = int(torch.argmin(cost))
        if price * self.dense_params <= float(cost[best]):
            return None
        return best + self.min_rank

    def params(self, rank: int | None) -> int:
        return self.dense_params if rank is None else rank * (self.out_features + self.in_features)


def _total(curves: dict[str, ErrorCurve], ranks: dict[str, int | None]) -> int:
    return sum(curve.params(ranks[name]) for name, curve in curves.items())


def allocate_ranks(curves: dict[str, ErrorCurve], budget: float, iterations: int = 60) -> dict[str, int | None]:
    """Ranks (None: stay dense) with at most `budget` parameters in total that minimize the summed predicted
    loss increase, by bisection on the price of a parameter (a Lagrange multiplier). Each curve is convex in
    the rank (singular values are sorted), so every price gives the best allocation for its parameter count.
    """
    if not curves:
        return {}
    floor = sum(
        curve.params(curve.min_rank)
        if max_saving_rank(curve.out_features, curve.in_features) >= curve.min_rank
        else curve.dense_params
        for curve in curves.values()
    )
    if budget < floor:
        raise ValueError(f"a budget of {int(budget)} parameters is below {floor}, what the smallest allowed ranks need")

    def at(price: float) -> dict[str, int | None]:
        return {name: curve.choose(price) for name, curve in curves.items()}

    if _total(curves, at(0.0)) <= budget:
        return at(0.0)
    low = 0.0
    high = max(float(curve.weight * curve.tail[0]) for curve in curves.values()) or 1.0
    while _total(curves, at(high)) > budget:
        low, high = high, high * 4
    for _ in range(iterations):
        middle = (low + high) / 2
        if _total(curves, at(middle)) > budget:
            low = middle
        else:
            high = middle
    return _spend_leftover(curves, at(high), budget)


def _spend_leftover(
    curves: dict[str, ErrorCurve], ranks: dict[str, int | None], budget: float
) -> dict[str, int | None]:
    """Raise ranks one at a time where the next singular value buys the most loss per parameter, while the
    budget allows (the bisection stops at a price, which can leave a little of the budget unused)."""
    ranks = dict(ranks)
    left = budget - _total(curves, ranks)
    while True:
        best, best_gain = None, 0.0
        for name, curve in curves.items():
            rank = ranks[name]
            if rank is None or rank >= min(
                max_saving_rank(curve.out_features, curve.in_features),
                len(curve.tail) - 1,
            ):
                continue
            step = curve.out_features + curve.in_features
            if step > left:
                continue
            gain = curve.weight * float(curve.tail[rank] - curve.tail[rank + 1]) / step
            if gain > best_gain:
                best, best_gain = name, gain
        if best is None:
            return ranks
        ranks[best] += 1
        left -= curves[best].out_features + curves[best].in_features


def uniform_ranks(shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int | None]:
    """The same parameter ratio for every layer ([out, in] shapes); None where factors would not be smaller."""
    ranks = {}
    for name, (out_features, in_features) in shapes.items():
        rank = rank_for_ratio(out_features, in_features, ratio)
        ranks[name] = rank if rank <= max_saving_rank(out_features, in_features) else None
    return ranks
