"""hfcompress: model compression that plugs into transformers, Trainer and the Hub.

Importing the package registers the `hfcompress` quantization method with transformers, so
`AutoModel*.from_pretrained` loads hfcompress checkpoints (quantized, factorized, sparse, resized), and registers
the built-in techniques. It imports no torch: every public name below is imported on first use, so the command
line answers `--help` and argument errors at once.
"""

__version__ = "0.1.0"

from . import (  # noqa: F401  (register the built-in techniques; no torch)
    backends,
    lowrank,
    pruning,
    quantization,
)
from ._lazy import lazy_namespace
from .checkpoint.registration import register_when_imported

register_when_imported()

_EXPORTS = {
    "BnbConfig": ".quantization",
    "CalibrationArguments": ".core.config",
    "CompressionConfig": ".core.config",
    "ConvDecompositionConfig": ".lowrank",
    "DistillationConfig": ".distillation",
    "DistillationTrainer": ".distillation",
    "FactorizedLinear": ".lowrank",
    "AWQConfig": ".quantization",
    "GPTQConfig": ".quantization",
    "KMeansConfig": ".quantization",
    "LowRankConfig": ".lowrank",
    "MagnitudePruningConfig": ".pruning",
    "MovementPruningConfig": ".pruning",
    "OutputOptions": ".steps",
    "OneShotPruningConfig": ".pruning",
    "PruningCallback": ".pruning",
    "QuantLinear": ".quantization",
    "RTNConfig": ".quantization",
    "Recipe": ".recipes",
    "StepOption": ".core.registry",
    "StructuredPruningConfig": ".pruning",
    "VQConfig": ".quantization",
    "W8A8Config": ".quantization",
    "compress": ".core.registry",
    "compress_folder": ".steps",
    "compress_sparse": ".pruning",
    "decompose_convolutions": ".lowrank",
    "evaluate": ".evaluation",
    "evaluate_streamed": ".evaluation",
    "factorize": ".lowrank",
    "finalize_pruning": ".pruning",
    "generate_card": ".hub",
    "lazy": ".core.registry",
    "load_compressed_tensors": ".quantization",
    "make_student": ".distillation",
    "merge_lora": ".lowrank",
    "perplexity": ".evaluation",
    "prune_oneshot": ".pruning",
    "prune_structured": ".pruning",
    "push_to_hub": ".hub",
    "quantize": ".quantization",
    "register_rebuilder": ".checkpoint",
    "register_technique": ".core.registry",
    "run_recipe": ".recipes",
    "save_quantized": ".quantization",
    "streamed_perplexity": ".evaluation",
    "techniques": ".core.registry",
    "update_manifest": ".checkpoint",
    "use_decode_loop": ".quantization",
    "verify_folder": ".steps",
}
__all__ = ["__version__", *sorted(_EXPORTS)]
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
