"""hfcompress: model compression that plugs into transformers, Trainer and the Hub.

Importing the package registers the `hfcompress` quantization method with transformers, so
`AutoModel*.from_pretrained` loads hfcompress checkpoints (quantized, factorized, sparse, resized).
"""

__version__ = "0.1.0"

from . import backends  # noqa: F401  (first: quiets optional backends before anything imports them)
from .checkpoint import register_rebuilder, update_manifest
from .core.config import CalibrationArguments, CompressionConfig
from .core.registry import StepOption, compress, register_technique, techniques
from .distillation import DistillationConfig, DistillationTrainer, make_student
from .hub import generate_card, push_to_hub
from .lowrank import (
    ConvDecompositionConfig,
    FactorizedLinear,
    LowRankConfig,
    decompose_convolutions,
    factorize,
    merge_lora,
)
from .pruning import (
    MagnitudePruningConfig,
    MovementPruningConfig,
    OneShotPruningConfig,
    PruningCallback,
    StructuredPruningConfig,
    compress_sparse,
    finalize_pruning,
    prune_oneshot,
    prune_structured,
)
from .quantization import BnbConfig, GPTQConfig, KMeansConfig, QuantLinear, RTNConfig, VQConfig, quantize

__all__ = [
    "BnbConfig",
    "CalibrationArguments",
    "CompressionConfig",
    "ConvDecompositionConfig",
    "DistillationConfig",
    "DistillationTrainer",
    "FactorizedLinear",
    "GPTQConfig",
    "KMeansConfig",
    "LowRankConfig",
    "MagnitudePruningConfig",
    "MovementPruningConfig",
    "OneShotPruningConfig",
    "PruningCallback",
    "QuantLinear",
    "RTNConfig",
    "StepOption",
    "StructuredPruningConfig",
    "VQConfig",
    "__version__",
    "compress",
    "compress_sparse",
    "decompose_convolutions",
    "factorize",
    "finalize_pruning",
    "generate_card",
    "make_student",
    "merge_lora",
    "prune_oneshot",
    "prune_structured",
    "push_to_hub",
    "quantize",
    "register_rebuilder",
    "register_technique",
    "techniques",
    "update_manifest",
]
