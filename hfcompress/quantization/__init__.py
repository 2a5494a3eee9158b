from .api import quantize
from .bnb import BnbConfig
from .config import GPTQConfig, HfcompressQuantizationConfig, RTNConfig
from .hf_quantizer import HfcompressHfQuantizer, register
from .modules import QuantLinear

__all__ = ["quantize", "BnbConfig", "GPTQConfig", "RTNConfig", "HfcompressQuantizationConfig", "HfcompressHfQuantizer", "QuantLinear"]

register()
