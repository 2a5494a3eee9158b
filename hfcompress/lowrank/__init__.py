from .config import LowRankConfig
from .factorization import factorize
from .lora import merge_lora
from .modules import FactorizedLinear

__all__ = ["FactorizedLinear", "LowRankConfig", "factorize", "merge_lora"]
