"""Weight quantization: GPTQ and round-to-nearest onto uniform grids, k-means and vector codebooks, and
bitsandbytes NF4/FP4/int8, each registered as a technique of kind `quantize`."""

from ..checkpoint import HfcompressHfQuantizer, HfcompressQuantizationConfig, register  # noqa: F401  (checkpoint registers)
from ..core.registry import StepOption, always, register_technique
from . import rebuild  # noqa: F401  (registers how quantized and codebook layers are rebuilt on load)
from .api import quantize, quantize_uniform
from .bnb import BnbConfig, quantize_bnb
from .codebook_api import quantize_codebook
from .codebook_config import KMeansConfig, VQConfig
from .codebook_linear import CodebookLinear
from .config import GPTQConfig, RTNConfig
from .modules import QuantLinear
from .save import FORMATS, check_format, write_quantized
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

FORMAT_HELP = (
    "Checkpoint format. hfcompress: loads with from_pretrained after `import hfcompress`. compressed-tensors: loads "
    "in plain transformers with the compressed-tensors package (symmetric grids; act-order only with static groups)."
)
_UNIFORM = dict(
    layer_types=(QuantLinear, SparseQuantLinear),
    step_options={"format": StepOption(FORMATS, FORMAT_HELP)},
    check=check_format,
    save=write_quantized,
)
register_technique(
    "gptq", GPTQConfig, quantize_uniform, calibrated=always, summary="GPTQ with calibration data.", **_UNIFORM
)
register_technique("rtn", RTNConfig, quantize_uniform, summary="Round-to-nearest, no data.", **_UNIFORM)
register_technique(
    "bnb", BnbConfig, lambda model, config, tokenizer=None: quantize_bnb(model, config),
    describe=lambda config: f"bitsandbytes-{config.description}", in_place=False, cast=False,
    summary="bitsandbytes 4-bit (NF4/FP4) or 8-bit; loads with plain transformers.",
)  # fmt: skip
_CODEBOOK = dict(layer_types=(CodebookLinear,), calibrated=lambda config: config.dataset is not None)
register_technique(
    "kmeans",
    KMeansConfig,
    quantize_codebook,
    summary="Non-uniform levels per channel by weighted k-means.",
    **_CODEBOOK,
)
register_technique("vq", VQConfig, quantize_codebook, summary="Vector quantization of runs of weights.", **_CODEBOOK)
