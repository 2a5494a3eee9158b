"""Pruning: during training with `PruningCallback` (movement, magnitude), structured removal of heads and FFN
neurons, and one-shot pruning of trained models (magnitude, Wanda, SparseGPT)."""

from ..core.registry import StepOption, register_technique
from . import rebuild  # noqa: F401  (registers how resized and bitmask-stored layers are rebuilt on load)
from .callback import PruningCallback
from .config import MagnitudePruningConfig, MovementPruningConfig, PruningConfig, pruning_config_from_dict
from .finalize import finalize_pruning
from .importance import prune_structured, taylor_importance
from .oneshot import OneShotPruningConfig, prune_oneshot
from .pruner import Pruner, make_masks_permanent, select_pruning_targets
from .schedule import cubic_sparsity
from .sparse import SparseLinear, compress_sparse, decompress_sparse, store_sparse
from .structured_config import StructuredPruningConfig, apply_structured_pruning, importance_of, structured_record

__all__ = [
    "MagnitudePruningConfig",
    "MovementPruningConfig",
    "OneShotPruningConfig",
    "Pruner",
    "PruningCallback",
    "PruningConfig",
    "SparseLinear",
    "StructuredPruningConfig",
    "compress_sparse",
    "cubic_sparsity",
    "decompress_sparse",
    "finalize_pruning",
    "make_masks_permanent",
    "prune_oneshot",
    "prune_structured",
    "pruning_config_from_dict",
    "select_pruning_targets",
    "taylor_importance",
]

STORAGE_HELP = (
    "bitmask: sparse layers saved as a bitmask plus their non-zeros (a smaller checkpoint; loads after `import "
    "hfcompress`). dense: ordinary weights with zeros (loads anywhere)."
)
register_technique(
    "oneshot", OneShotPruningConfig, prune_oneshot, kind="prune", record_kind="pruning", layer_types=(SparseLinear,),
    calibrated=lambda config: config.method != "magnitude", step_options={"storage": StepOption(("bitmask", "dense"), STORAGE_HELP, between_steps="dense")},
    before_save=store_sparse, summary="Zero weights by magnitude, Wanda or SparseGPT, no training.",
)  # fmt: skip
register_technique(
    "structured", StructuredPruningConfig, apply_structured_pruning, kind="prune", record_kind="structured-pruning",
    describe=importance_of, record=structured_record, calibrated=lambda config: config.dataset is not None,
    summary="Remove attention heads and FFN neurons for real (smaller layers, config updated).",
)  # fmt: skip
