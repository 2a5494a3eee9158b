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
