"""hfcompress: model compression that plugs into transformers, Trainer and the Hub.

Importing the package registers the `hfcompress` quantization method with transformers, so
`AutoModel*.from_pretrained` loads hfcompress checkpoints.
"""

__version__ = "0.1.0"

from .quantization import GPTQConfig, QuantLinear, RTNConfig, quantize  # noqa: E402

__all__ = ["quantize", "GPTQConfig", "RTNConfig", "QuantLinear", "__version__"]
