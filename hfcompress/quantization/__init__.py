"""Weight quantization: GPTQ and round-to-nearest onto uniform grids, k-means and vector codebooks, and
bitsandbytes NF4/FP4/int8, AWQ and W8A8 (SmoothQuant), each registered as a technique of kind `quantize` (`techniques.py`). Names are
imported on first use."""

from .._lazy import lazy_namespace
from . import techniques  # noqa: F401  (registers the techniques and their rebuilders; imports no torch)

_EXPORTS = {
    "BnbConfig": ".bnb_config",
    "CodebookLinear": ".codebook_linear",
    "AWQConfig": ".config",
    "GPTQConfig": ".config",
    "Int8Linear": ".int8_linear",
    "HfcompressHfQuantizer": "..checkpoint.hf_quantizer",
    "HfcompressQuantizationConfig": "..checkpoint.manifest",
    "KMeansConfig": ".codebook_config",
    "DecodeLinear": ".decode_linear",
    "QuantLinear": ".modules",
    "RTNConfig": ".config",
    "SparseQuantLinear": ".sparse_quant",
    "VQConfig": ".codebook_config",
    "W8A8Config": ".config",
    "load_compressed_tensors": ".ct_import",
    "quantize": ".api",
    "save_quantized": ".save",
    "use_decode_loop": ".decode_linear",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
