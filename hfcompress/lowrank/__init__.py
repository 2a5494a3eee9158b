"""Low-rank factorization: SVD (plain, activation-aware, whitened) of linear layers into factor pairs,
Tucker-2 and separable convolutions, and peft LoRA adapters merged into factorized weights (the technique is
registered in `techniques.py`). Names are imported on first use."""

from .._lazy import lazy_namespace
from . import techniques  # noqa: F401  (registers the technique and its rebuilders; imports no torch)

_EXPORTS = {
    "ConvDecompositionConfig": ".conv",
    "FactorizedLinear": ".modules",
    "LowRankConfig": ".config",
    "SeparableConv2d": ".conv",
    "Tucker2Conv2d": ".conv",
    "decompose_convolutions": ".conv",
    "factorize": ".factorization",
    "merge_lora": ".lora",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
