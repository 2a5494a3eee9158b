"""The pruning techniques as the registry and the loader see them. Imports no torch: the code that prunes,
stores and rebuilds is named by `lazy` references and imported when a command or a load needs it."""

from ..checkpoint.rebuild import register_rebuilder
from ..core.registry import StepOption, lazy, register_technique
from .oneshot_config import OneShotPruningConfig
from .structured_config import StructuredPruningConfig, importance_of

__all__ = []

STORAGE_HELP = (
    "bitmask: sparse layers saved as a bitmask plus their non-zeros (a smaller checkpoint; loads after `import "
    "hfcompress`). dense: ordinary weights with zeros (loads anywhere)."
)
register_technique(
    "oneshot", OneShotPruningConfig, lazy("hfcompress.pruning.oneshot:prune_oneshot"), kind="prune",
    record_kind="pruning", layer_types=(lazy("hfcompress.pruning.sparse:SparseLinear"),),
    calibrated=lambda config: config.method != "magnitude",
    step_options={"storage": StepOption(("bitmask", "dense"), STORAGE_HELP, between_steps="dense")},
    before_save=lazy("hfcompress.pruning.sparse:store_sparse"), expert_linears=True,
    stream=lazy("hfcompress.pruning.streaming:prune_streaming"),
    summary="Zero weights by magnitude, Wanda or SparseGPT, no training.",
)  # fmt: skip
register_technique(
    "structured", StructuredPruningConfig, lazy("hfcompress.pruning.importance:apply_structured_pruning"),
    kind="prune", record_kind="structured-pruning", describe=importance_of,
    record=lazy("hfcompress.pruning.importance:structured_record"), calibrated=lambda config: config.dataset is not None,
    check_model=lazy("hfcompress.pruning.importance:check_task"),
    summary="Remove attention heads and FFN neurons for real (smaller layers, config updated).",
)  # fmt: skip

register_rebuilder("resized", lazy("hfcompress.pruning.rebuild:rebuild_resized"), order=20, trainable=True)
register_rebuilder(
    "sparse", lazy("hfcompress.pruning.rebuild:rebuild_sparse"), order=40,
    finish=lazy("hfcompress.pruning.rebuild:convert_legacy_sparse"),
)  # fmt: skip
