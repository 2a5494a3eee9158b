from .api import quantize
from .bnb import BnbConfig
from .codebook_config import KMeansConfig, VQConfig
from .codebook_linear import CodebookLinear
from .config import GPTQConfig, HfcompressQuantizationConfig, RTNConfig
from .hf_quantizer import HfcompressHfQuantizer, register
from .modules import QuantLinear

__all__ = ["quantize", "BnbConfig", "CodebookLinear", "KMeansConfig", "VQConfig", "GPTQConfig", "RTNConfig", "HfcompressQuantizationConfig", "HfcompressHfQuantizer", "QuantLinear"]

register()
