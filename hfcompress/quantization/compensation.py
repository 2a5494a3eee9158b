"""Low-rank compensation of quantization error as pure tensor functions (EoRA, Liu et al., 2024; SVDQuant's and
NNCF's LoRA correction in spirit): after a layer `W` is quantized to `Q`, a rank-r `up @ down` approximates the
error `E = W - Q` where it matters, on the calibration inputs.

Whitened by the input Gram matrix `H = XᵀX` (Cholesky `L Lᵀ`), the SVD of `E L` gives the rank-r correction
that minimizes the output error `‖(E - up·down) Xᵀ‖` (`lowrank.svd.decompose(..., "whiten")`), and its dropped
singular values are that error exactly, so the ranks of all layers are allocated under one parameter budget by
the error each added rank removes per parameter it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lowrank.svd import decompose

__all__ = ["ErrorFactors", "allocate_compensation", "compensation_budget", "error_factors"]


@dataclass
class ErrorFactors:
    """The whitened SVD of one layer's quantization error, cut to the largest rank it may get: `S` (every
    singular value, for the error each rank removes), `up` [out, k] and `down` [k, in] for k ≤ `len(S)`."""

    S: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.up[:, :rank], self.down[:rank]

    @property
    def kept(self) -> torch.Tensor:
        """The singular values of the components kept: what each rank the layer may get removes."""
        return self.S[: self.up.shape[1]]


def error_factors(error: torch.Tensor, gram: torch.Tensor, max_rank: int, damp_percent: float = 0.01) -> ErrorFactors:
    """`ErrorFactors` of `error` [out, in] whitened by `gram` [in, in], keeping at most `max_rank` components."""
    decomposition = decompose(error, "whiten", gram=gram, damp_percent=damp_percent, max_rank=max_rank)
    rank = max(1, min(max_rank, len(decomposition.S)))
    up, down = decomposition.factors(rank, torch.float32)
    return ErrorFactors(decomposition.S.float(), up, down)


def compensation_budget(shapes: dict[str, tuple[int, int]], rank: int) -> int:
    """The parameters a rank-`rank` correction of every layer would hold: the budget `allocate_compensation`
    spreads over them."""
    return sum(rank * (out_features + in_features) for out_features, in_features in shapes.values())


def allocate_compensation(
    singular_values: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int
) -> dict[str, int]:
    """Each layer's rank (0: no correction) so the corrections hold at most `budget` parameters and remove the
    most output error, given the singular values of the components each layer may get (`ErrorFactors.kept`):
    ranks are taken greedily by error removed per parameter (`S[r]² / (out + in)`), which is optimal up to the
    last rank since each layer's gains only shrink as its rank grows."""
    gains, owners, costs = [], [], []
    names = list(singular_values)
    for index, name in enumerate(names):
        out_features, in_features = shapes[name]
        available = len(singular_values[name])
        cost = out_features + in_features
        gains.append(singular_values[name].double().square() / cost)
        owners.append(torch.full((available,), index))
        costs.append(cost)
    ranks = dict.fromkeys(names, 0)
    if not names:
        return ranks
    order = torch.argsort(torch.cat(gains), descending=True, stable=True)
    owner = torch.cat(owners)[order].tolist()
    spent = 0
    for index in owner:
        cost = costs[index]
        if spent + cost > budget:
            if spent + min(costs) > budget:
                break
            continue
        name = names[index]
        ranks[name] += 1
        spent += cost
    return ranks
