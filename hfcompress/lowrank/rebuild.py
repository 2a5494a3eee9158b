"""How factorized linears and decomposed convolutions are rebuilt when a checkpoint loads
(registered in `techniques.py`)."""

from __future__ import annotations

from ..core.structure import linear_to_replace, linear_weight, set_submodule
from .conv import rebuild_convolution
from .modules import FactorizedLinear

__all__ = ["rebuild_convolutions", "rebuild_factorized"]


def rebuild_convolutions(model, manifest) -> None:
    for name, record in manifest.convolutions.items():
        rebuild_convolution(model, name, record)


def rebuild_factorized(model, manifest) -> None:
    for name, rank in manifest.lowrank.items():
        module = linear_to_replace(model, name, "factorizes")
        out_features, in_features = linear_weight(module).shape
        factorized = FactorizedLinear(
            in_features, out_features, rank, bias=module.bias is not None,
            dtype=module.weight.dtype, device=module.weight.device,
        )  # fmt: skip
        set_submodule(model, name, factorized)
