"""Low-rank factorization as the registry and the loader see it. Imports no torch: the code that factorizes
and rebuilds is named by `lazy` references and imported when a command or a load needs it."""

from ..checkpoint.rebuild import register_rebuilder
from ..core.registry import lazy, register_technique
from .config import LowRankConfig

__all__ = []

register_technique(
    "lowrank", LowRankConfig, lazy("hfcompress.lowrank.factorization:factorize"), kind="factorize",
    command=("factorize",), record_kind="factorization", calibrated=lambda config: config.needs_data,
    record=lazy("hfcompress.lowrank.factorization:factorization_record"), expert_linears=True,
    stream=lazy("hfcompress.lowrank.streaming:factorize_streaming"),
    summary="Replace linear layers by low-rank factor pairs and save.",
)  # fmt: skip

register_rebuilder("convolutions", lazy("hfcompress.lowrank.rebuild:rebuild_convolutions"), order=10, trainable=True)
register_rebuilder("lowrank", lazy("hfcompress.lowrank.rebuild:rebuild_factorized"), order=30, trainable=True)
