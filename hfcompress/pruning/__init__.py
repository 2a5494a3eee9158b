"""Pruning: during training with `PruningCallback` (movement, magnitude), structured removal of heads and FFN
neurons, and one-shot pruning of trained models (magnitude, Wanda, SparseGPT)."""

from ..core.registry import register_technique
from . import rebuild  # noqa: F401  (registers how resized and bitmask-stored layers are rebuilt on load)

from .callback import PruningCallback
from .config import MagnitudePruningConfig, MovementPruningConfig, PruningConfig, pruning_config_from_dict
from .finalize import finalize_pruning
from .importance import prune_structured, taylor_importance
from .oneshot import OneShotPruningConfig, prune_oneshot
from .pruner import Pruner, make_masks_permanent, select_pruning_targets
from .schedule import cubic_sparsity
from .sparse import SparseLinear, compress_sparse, decompress_sparse

__all__ = [
    "MagnitudePruningConfig",
    "MovementPruningConfig",
    "OneShotPruningConfig",
    "Pruner",
    "PruningCallback",
    "PruningConfig",
    "SparseLinear",
    "compress_sparse",
    "decompress_sparse",
    "prune_oneshot",
    "prune_structured",
    "taylor_importance",
    "cubic_sparsity",
    "finalize_pruning",
    "make_masks_permanent",
    "pruning_config_from_dict",
    "select_pruning_targets",
]

register_technique(
    "oneshot", OneShotPruningConfig, prune_oneshot, kind="prune", record_kind="pruning", layer_types=(SparseLinear,),
    needs_data=lambda config: config.method != "magnitude", summary="Zero weights by magnitude, Wanda or SparseGPT.",
)  # fmt: skip
