"""Structured pruning as a registered technique: its config and the step that builds the importance data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..core.config import CalibrationArguments, CompressionConfig
from ..core.tasks import AUTO_CLASSES, Task

__all__ = ["StructuredPruningConfig", "importance_of"]


@dataclass
class StructuredPruningConfig(CalibrationArguments, CompressionConfig):
    """Remove the same fraction of attention heads (key/value groups under grouped-query attention) and of FFN
    neurons from every block, the least important first: first-order Taylor importance on `dataset`
    (language-modelling loss), or weight norms without data. Llama-style models then load with plain
    transformers; BERT-style models with removed heads after `import hfcompress`."""

    technique: ClassVar[str] = "structured"

    heads: float = field(default=0.0, metadata={"help": "Fraction of attention heads to remove."})
    ffn: float = field(default=0.0, metadata={"help": "Fraction of FFN neurons to remove."})
    task: Task | None = field(
        default=None,
        metadata={"help": "Which head to load MODEL with (default: the one its checkpoint was saved with)."},
    )

    def __post_init__(self):
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be a fraction in [0, 1), got {value!r}")
        if self.heads == 0 and self.ffn == 0:
            raise ValueError("nothing to prune: give `heads` and/or `ffn`")
        if self.task is not None and self.task not in AUTO_CLASSES:
            raise ValueError(f"`task` must be one of {', '.join(AUTO_CLASSES)} or None, got {self.task!r}")
        if self.dataset is not None and self.task not in (None, "causal-lm"):
            raise ValueError(
                "`dataset` gives Taylor importance from the language-modelling loss, so it needs task causal-lm; "
                "for a classifier, call hfcompress.prune_structured(model, batches=...) with labelled batches"
            )
        self.check_calibration()


def importance_of(config: StructuredPruningConfig) -> str:
    return "taylor" if config.dataset is not None else "magnitude"
