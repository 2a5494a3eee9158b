"""Pruning: during training with `PruningCallback` (movement, magnitude), structured removal of heads and FFN
neurons, and one-shot pruning of trained models (magnitude, Wanda, SparseGPT); the techniques are registered in
`techniques.py`. Names are imported on first use."""

from .._lazy import lazy_namespace
from . import techniques  # noqa: F401  (registers the techniques and their rebuilders; imports no torch)

_EXPORTS = {
    "MagnitudePruningConfig": ".config",
    "MovementPruningConfig": ".config",
    "OneShotPruningConfig": ".oneshot_config",
    "Pruner": ".pruner",
    "PruningCallback": ".callback",
    "PruningConfig": ".config",
    "SparseLinear": ".sparse",
    "StructuredPruningConfig": ".structured_config",
    "compress_sparse": ".sparse",
    "cubic_sparsity": ".schedule",
    "decompress_sparse": ".sparse",
    "finalize_pruning": ".finalize",
    "make_masks_permanent": ".pruner",
    "prune_oneshot": ".oneshot",
    "prune_structured": ".importance",
    "pruning_config_from_dict": ".config",
    "select_pruning_targets": ".pruner",
    "taylor_importance": ".importance",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)
