from .api import quantize
from .config import GPTQConfig, HfcompressQuantizationConfig, RTNConfig
from .hf_quantizer import HfcompressHfQuantizer, register
from .modules import QuantLinear

__all__ = ["quantize", "GPTQConfig", "RTNConfig", "HfcompressQuantizationConfig", "HfcompressHfQuantizer", "QuantLinear"]

register()
