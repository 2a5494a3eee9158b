"""Low-rank factorization: SVD (plain, activation-aware, whitened) of linear layers into factor pairs,
Tucker-2 and separable convolutions, and peft LoRA adapters merged into factorized weights."""

from ..checkpoint import manifest_of
from ..core.registry import register_technique
from . import rebuild  # noqa: F401  (registers how factorized layers and convolutions are rebuilt on load)
from .config import LowRankConfig
from .conv import ConvDecompositionConfig, SeparableConv2d, Tucker2Conv2d, decompose_convolutions
from .factorization import factorize
from .lora import merge_lora
from .modules import FactorizedLinear

__all__ = [
    "ConvDecompositionConfig",
    "FactorizedLinear",
    "LowRankConfig",
    "SeparableConv2d",
    "Tucker2Conv2d",
    "decompose_convolutions",
    "factorize",
    "merge_lora",
]

register_technique(
    "lowrank", LowRankConfig, factorize, kind="factorize", command=("factorize",), record_kind="factorization",
    calibrated=lambda config: config.needs_data,
    record=lambda model, config: {"ranks": dict(manifest_of(model).lowrank)},
    summary="Replace linear layers by low-rank factor pairs and save.",
)  # fmt: skip
