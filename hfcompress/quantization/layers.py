"""The module that stores a quantized weight: a `QuantLinear`, or a `SparseQuantLinear` for a pruned layer."""

from __future__ import annotations

from .modules import QuantLinear
from .plan import LayerPlan
from .sparse_quant import SparseQuantLinear

__all__ = ["quantized_layer"]


def quantized_layer(quantized, plan: LayerPlan, sym: bool, act_order: bool, bias, scale_dtype) -> QuantLinear:
    """The module that stores `quantized`: a `QuantLinear`, or a `SparseQuantLinear` for a pruned layer."""
    if plan.mask is not None:
        return SparseQuantLinear.from_quantized_sparse(
            quantized, plan.mask, plan.group_size, sym, act_order, bias, scale_dtype
        )
    return QuantLinear.from_quantized(quantized, plan.group_size, sym, act_order, bias, scale_dtype)
