"""`CompensatedLinear`: a quantized linear layer plus a low-rank correction of its quantization error."""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.structure import linear_weight, set_submodule
from .compensation import allocate_compensation, compensation_budget
from .grid import SCALE_TORCH_DTYPES

__all__ = [
    "CompensatedLinear",
    "attach_corrections",
    "budget_params",
    "compensation_plan",
    "corrected_ranks",
    "max_ranks",
]

logger = logging.getLogger(__name__)


class _Factor(nn.Linear):
    """A factor of the correction: a plain linear whose weight keeps its storage dtype when the model is cast."""

    KEEPS_DTYPE = True


class CompensatedLinear(nn.Module):
    """`base(x) + up(down(x))`: `base` the quantized layer (a `QuantLinear`, a plain `nn.Linear` while the
    checkpoint loads), `down` [rank, in] and `up` [out, rank] the correction, stored in a low-precision float
    dtype (float16 by default) and computed in the input's dtype.

    `weight` is an empty placeholder, as in `FactorizedLinear`: transformers without hfcompress then fails on a
    shape mismatch instead of loading the layer as random weights."""

    STORED_MODULES = ("base", "down", "up")  # what holds its weight, for bits per weight (evaluation/footprint.py)

    def __init__(self, base: nn.Module, rank: int, dtype: torch.dtype = torch.float16):
        super().__init__()
        if isinstance(base, Conv1D):  # GPT-2's layer, the base while a checkpoint loads, names its sizes otherwise
            self.out_features, self.in_features = linear_weight(base).shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        if not 0 < rank <= min(self.in_features, self.out_features):
            raise ValueError(
                f"`rank` must be in [1, {min(self.in_features, self.out_features)}] for a "
                f"{self.out_features}x{self.in_features} layer, got {rank}"
            )
        device = next(iter(base.buffers()), next(iter(base.parameters()), None)).device
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device))
        self.rank = rank
        self.base = base
        self.down = _Factor(self.in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = _Factor(rank, self.out_features, bias=False, dtype=dtype, device=device)
        self.down.weight.requires_grad_(False)
        self.up.weight.requires_grad_(False)

    @classmethod
    def from_factors(cls, base: nn.Module, up: torch.Tensor, down: torch.Tensor, dtype=torch.float16):
        layer = cls(base, up.shape[1], dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
        return layer

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        correction = F.linear(F.linear(x, self.down.weight.to(x.dtype)), self.up.weight.to(x.dtype))
        return self.base(x) + correction

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def budget_params(config, shapes: dict[str, tuple[int, int]], dtype: torch.dtype) -> int:
    """The parameters `config`'s correction may hold: `compensation_bits` per quantized weight in `dtype`, or a
    rank of `lowrank_compensation` per layer."""
    if config.compensation_bits is not None:
        weights = sum(o * i for o, i in shapes.values())
        return int(config.compensation_bits * weights / (torch.finfo(dtype).bits))
    return compensation_budget(shapes, config.lowrank_compensation)


def compensation_plan(config, targets: dict[str, nn.Module]) -> tuple[dict | None, dict[str, int] | None, int]:
    """(errors to fill, each layer's largest rank, the budget in parameters) of a GPTQ run over `targets` with
    low-rank compensation; (None, None, 0) without."""
    if not config.compensates:
        return None, None, 0
    shapes = {name: tuple(linear_weight(m).shape) for name, m in targets.items()}
    budget = budget_params(config, shapes, SCALE_TORCH_DTYPES[config.scale_dtype])
    return {}, max_ranks(shapes, budget), budget


def max_ranks(shapes: dict[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """The largest rank each layer's measured error is kept to: four times its even share of `budget`, and at
    most half its smaller side."""
    total = sum(o + i for o, i in shapes.values()) or 1
    share = budget / total  # the mean rank the budget buys
    return {name: max(1, min(min(o, i) // 2, math.ceil(4 * share))) for name, (o, i) in shapes.items()}


def attach_corrections(model: nn.Module, errors: dict, budget: int, dtype: torch.dtype) -> dict[str, int]:
    """Allocate `budget` parameters over the measured `errors` and wrap each quantized layer that gets a rank in
    a `CompensatedLinear`; returns {layer: rank} for the layers that got one."""
    shapes = {name: (f.up.shape[0], f.down.shape[1]) for name, f in errors.items()}
    ranks = corrected_ranks({name: f.kept for name, f in errors.items()}, shapes, budget)
    for name, rank in ranks.items():
        up, down = errors[name].factors(rank)
        set_submodule(model, name, CompensatedLinear.from_factors(model.get_submodule(name), up, down, dtype))
    return ranks


def corrected_ranks(kept: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: int) -> dict[str, int]:
    """{layer: rank} of the layers that get a correction when `budget` parameters are allocated by the singular
    values `kept` of each layer's error (`compensation.allocate_compensation`), logged."""
    ranks = {name: rank for name, rank in allocate_compensation(kept, shapes, budget).items() if rank}
    spent = sum(rank * sum(shapes[name]) for name, rank in ranks.items())
    logger.info(
        "low-rank compensation: %d of %d layers corrected, ranks %s-%s, %d parameters of a budget of %d",
        len(ranks), len(kept), min(ranks.values(), default=0), max(ranks.values(), default=0), spent, budget,
    )  # fmt: skip
    return ranks
