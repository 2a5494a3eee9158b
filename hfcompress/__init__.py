"""hfcompress: model compression that plugs into transformers, Trainer and the Hub.

Importing the package registers the `hfcompress` quantization method with transformers, so
`AutoModel*.from_pretrained` loads hfcompress checkpoints (quantized, factorized, sparse, resized).
"""

__version__ = "0.1.0"

from .checkpoint import register_rebuilder, update_manifest
from .core.config import CalibrationArguments, CompressionConfig
from .core.registry import StepOption, compress, register_technique, techniques
from .lowrank import (
    ConvDecompositionConfig,
    FactorizedLinear,
    LowRankConfig,
    decompose_convolutions,
    factorize,
    merge_lora,
)
from .distillation import DistillationConfig, DistillationTrainer, make_student
from .hub import generate_card, push_to_hub
from .pruning import (
    MagnitudePruningConfig,
    MovementPruningConfig,
    OneShotPruningConfig,
    PruningCallback,
    compress_sparse,
    finalize_pruning,
    prune_oneshot,
    StructuredPruningConfig,
    prune_structured,
)
from .quantization import BnbConfig, GPTQConfig, KMeansConfig, QuantLinear, RTNConfig, VQConfig, quantize

__all__ = [
    "CalibrationArguments",
    "CompressionConfig",
    "StepOption",
    "StructuredPruningConfig",
    "compress",
    "register_rebuilder",
    "register_technique",
    "techniques",
    "update_manifest",
    "BnbConfig",
    "generate_card",
    "push_to_hub",
    "ConvDecompositionConfig",
    "decompose_convolutions",
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
    "VQConfig",
    "__version__",
    "compress_sparse",
    "factorize",
    "finalize_pruning",
    "make_student",
    "merge_lora",
    "prune_oneshot",
    "prune_structured",
    "quantize",
]
