"""Weight quantization: GPTQ and round-to-nearest onto uniform grids, k-means and vector codebooks, and
bitsandbytes NF4/FP4/int8, each registered as a technique of kind `quantize`."""

from ..checkpoint import HfcompressHfQuantizer, HfcompressQuantizationConfig, register
from ..core.registry import register_technique
from . import rebuild  # noqa: F401  (registers how quantized and codebook layers are rebuilt on load)
from .api import quantize, quantize_uniform
from .bnb import BnbConfig, quantize_bnb
from .codebook_api import quantize_codebook
from .codebook_config import KMeansConfig, VQConfig
from .codebook_linear import CodebookLinear
from .config import GPTQConfig, RTNConfig
from .modules import QuantLinear
from .sparse_quant import SparseQuantLinear

__all__ = [
    "BnbConfig",
    "CodebookLinear",
    "GPTQConfig",
    "HfcompressHfQuantizer",
    "HfcompressQuantizationConfig",
    "KMeansConfig",
    "QuantLinear",
    "RTNConfig",
    "SparseQuantLinear",
    "VQConfig",
    "quantize",
]

_UNIFORM = dict(layer_types=(QuantLinear, SparseQuantLinear), formats=("hfcompress", "compressed-tensors"))
register_technique("gptq", GPTQConfig, quantize_uniform, needs_data=lambda config: True, summary="GPTQ with calibration data.", **_UNIFORM)
register_technique("rtn", RTNConfig, quantize_uniform, summary="Round-to-nearest, no data.", **_UNIFORM)
register_technique(
    "bnb", BnbConfig, lambda model, config, tokenizer=None: quantize_bnb(model, config), in_place=False,
    summary="bitsandbytes 4-bit (NF4/FP4) or 8-bit; loads with plain transformers.",
)  # fmt: skip
register_technique(
    "kmeans", KMeansConfig, quantize_codebook, layer_types=(CodebookLinear,),
    summary="Non-uniform levels per channel by weighted k-means.",
)  # fmt: skip
register_technique(
    "vq", VQConfig, quantize_codebook, layer_types=(CodebookLinear,), summary="Vector quantization of runs of weights."
)
register()
