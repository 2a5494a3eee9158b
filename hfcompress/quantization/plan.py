"""What each targeted layer gets: its bits and group size (mixed precision, factors) and the mask of a pruned weight."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..core.structure import is_excluded, linear_weight
from ..lowrank.modules import FactorizedLinear

__all__ = ["SPARSE_MIN_ZEROS", "LayerPlan", "group_for", "plan_layers", "sparsity_mask", "split_layer_bits"]

logger = logging.getLogger(__name__)

# below this fraction of zeros a bitmask costs more than it saves (1 bit per weight against `bits` per zero)
SPARSE_MIN_ZEROS = 0.25


@dataclass
class LayerPlan:
    bits: int
    group_size: int
    mask: torch.Tensor | None = None  # True where a pruned layer keeps its weight


def group_for(in_features: int, group_size: int) -> int:
    """The group size a layer with `in_features` inputs is quantized with: `group_size`, or one group per row (-1)
    where it does not divide them (`plan_layers` lets that through for a factorized layer's `up` factor only)."""
    return group_size if group_size == -1 or in_features % group_size == 0 else -1


def split_layer_bits(layer_bits: dict[str, int]) -> tuple[int, dict[str, int]]:
    """Widths per layer as a config states them: the most common width (the smallest among equally common ones)
    as `bits`, the layers of other widths as `layer_bits` overrides."""
    widths = list(layer_bits.values())
    default = max(sorted(set(widths)), key=widths.count)
    return default, {n: b for n, b in layer_bits.items() if b != default}


def sparsity_mask(weight: torch.Tensor) -> torch.Tensor | None:
    """True where a pruned weight is kept, for a weight with at least `SPARSE_MIN_ZEROS` exact zeros; else None."""
    zeros = weight.numel() - int(torch.count_nonzero(weight))
    return weight != 0 if zeros >= SPARSE_MIN_ZEROS * weight.numel() else None


def plan_layers(model: nn.Module, targets: dict[str, nn.Module], config) -> dict[str, LayerPlan]:
    """The plan of every target under `config` (`RTNConfig` or `GPTQConfig`), checked before any work starts.

    Bits come from the first `layer_bits` pattern matching the layer's name, else `bits`. A group size that does
    not divide a layer's inputs is an error, except for the `up` factor of a factorized layer, whose inputs are
    the rank: it falls back to one group per row. With `keep_sparsity`, a layer with at least 25% exact zeros is
    quantized with its zeros kept and stored as bitmask + codes (a weight still on the meta device, streamed
    from disk, gets its mask when it is loaded: `sparsity_mask`).
    """

    layer_bits = config.layer_bits or {}
    unmatched = [p for p in layer_bits if not any(is_excluded(name, [p]) for name in targets)]
    if unmatched:
        raise ValueError(f"`layer_bits` patterns {unmatched} match none of the {len(targets)} layers to quantize")
    plans, per_row = {}, []
    for name, module in targets.items():
        bits = next((b for p, b in layer_bits.items() if is_excluded(name, [p])), config.bits)
        weight = linear_weight(module)
        in_features = weight.shape[1]
        group_size = group_for(in_features, config.group_size)
        if group_size != config.group_size:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not (isinstance(parent, FactorizedLinear) and child == "up"):
                raise ValueError(
                    f"`group_size` {config.group_size} does not divide the {in_features} input features of "
                    f"{name!r}; use a divisor of every layer's input size, or -1 for per-channel"
                )
            per_row.append(name)
        mask = sparsity_mask(weight) if config.keep_sparsity and not weight.is_meta else None
        plans[name] = LayerPlan(bits, group_size, mask)
    if per_row:
        logger.info(
            "%d factor layers have a rank that group size %d does not divide; they use one group per row",
            len(per_row),
            config.group_size,
        )
    sparse = sum(p.mask is not None for p in plans.values())
    if sparse:
        logger.info("%d pruned layers keep their zeros (stored as bitmask + codes)", sparse)
    return plans
