"""Configuration of pruning during training (movement and gradual magnitude pruning)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..core.config import CompressionConfig

__all__ = ["MagnitudePruningConfig", "MovementPruningConfig", "PruningConfig", "pruning_config_from_dict"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_GRANULARITY = re.compile(r"^(weight|row|column|(\d+)x(\d+))$")


@dataclass
class PruningConfig(CompressionConfig):
    """What every training-time pruning method shares: the target, the schedule, the granularity, the ranking."""

    final_sparsity: float = field(
        default=0.9, metadata={"help": "Fraction of the targeted weights pruned at the end, in [0, 1)."}
    )
    initial_sparsity: float = field(
        default=0.0, metadata={"help": "Sparsity held during warm-up, where the cubic schedule starts, in [0, 1)."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Optimizer steps before pruning starts."})
    cooldown_steps: int = field(
        default=0, metadata={"help": "Optimizer steps at the end trained at the final sparsity, masks still updated."}
    )
    total_steps: int | None = field(
        default=None, metadata={"help": "Length of the schedule in optimizer steps; default: the Trainer's max_steps."}
    )
    granularity: str = field(
        default="weight",
        metadata={
            "help": "What is kept or pruned together: 'weight' (single weights), 'row' (an output neuron's "
            "weights), 'column' (an input feature's weights), or a block 'HxW' such as '32x32'."
        },
    )
    ranking: Literal["local", "global"] | None = field(
        default=None,
        metadata={
            "help": "'local': every matrix reaches the sparsity; 'global': one threshold over all targets, so "
            "sparsity varies by layer. Default: global for soft movement, local otherwise."
        },
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Linear layers to prune: exact names, dotted suffixes or 're:<regex>'. Default: every linear "
            "layer inside the transformer blocks (not embeddings, pooler, classifier or lm_head)."
        },
    )
    update_every: int = field(default=1, metadata={"help": "Recompute the masks every this many optimizer steps."})

    technique: ClassVar[str] = "base"
    pruning_method: ClassVar[str] = "base"  # the key records and Trainer checkpoints name it by

    def __post_init__(self):
        for name in ("final_sparsity", "initial_sparsity"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value!r}")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"`initial_sparsity` ({self.initial_sparsity}) must not exceed `final_sparsity` ({self.final_sparsity})"
            )
        for name in ("warmup_steps", "cooldown_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {getattr(self, name)!r}")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            raise ValueError(f"`total_steps` must be a positive integer or None, got {self.total_steps!r}")
        if not isinstance(self.update_every, int) or self.update_every < 1:
            raise ValueError(f"`update_every` must be a positive integer, got {self.update_every!r}")
        if not isinstance(self.granularity, str) or not _GRANULARITY.match(self.granularity):
            raise ValueError(
                f"`granularity` must be 'weight', 'row', 'column' or a block like '32x32', got {self.granularity!r}"
            )
        if self.ranking not in (None, "local", "global"):
            raise ValueError(f"`ranking` must be 'local' or 'global', got {self.ranking!r}")
        if self.target_modules is not None and (
            isinstance(self.target_modules, str) or not all(isinstance(p, str) for p in self.target_modules)
        ):
            raise ValueError(f"`target_modules` must be a list of strings, got {self.target_modules!r}")

    @property
    def effective_ranking(self) -> str:
        return self.ranking or "local"

    def block_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The block of a weight matrix of `shape` that is kept or pruned as one."""
        rows, cols = shape
        if self.granularity == "weight":
            return (1, 1)
        if self.granularity == "row":
            return (1, cols)
        if self.granularity == "column":
            return (rows, 1)
        height, width = (int(x) for x in self.granularity.split("x"))
        return (height, width)

    @classmethod
    def header(cls) -> dict[str, Any]:
        return {"pruning_method": cls.pruning_method, "version": FORMAT_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        return pruning_config_from_dict(data, expected=cls)


@dataclass
class MovementPruningConfig(PruningConfig):
    """Movement pruning (Sanh et al. 2020): importance scores learned with the straight-through estimator.

    `method="topk"` (hard movement) keeps the blocks with the highest scores. `method="threshold"` (alias
    `"sigmoid"`, soft movement) keeps the blocks whose sigmoid(score) clears a threshold, pushes all scores
    down with an L1 penalty on sigmoid(score) weighted by `regularization`, and ranks globally by default, so
    layers that matter keep more weights. Unlike the paper, where the threshold is fixed and the reached
    sparsity follows from the penalty, the threshold here is set at every update to reach the scheduled
    sparsity, so the two variants can be compared at the same budget.
    """

    method: Literal["topk", "threshold", "sigmoid"] = field(
        default="topk", metadata={"help": "'topk' (hard movement) or 'threshold'/'sigmoid' (soft movement)."}
    )
    regularization: float = field(
        default=1.0,
        metadata={
            "help": "Soft movement: weight of the L1 penalty on sigmoid(scores), ramped up with the schedule, "
            "relative to the mean score gradient."
        },
    )
    score_init: float = field(default=0.0, metadata={"help": "Initial value of every importance score."})

    technique: ClassVar[str] = "movement"
    pruning_method: ClassVar[str] = "movement"

    def __post_init__(self):
        super().__post_init__()
        if self.method not in ("topk", "threshold", "sigmoid"):
            raise ValueError(f"`method` must be 'topk', 'threshold' or 'sigmoid', got {self.method!r}")
        if not isinstance(self.regularization, (int, float)) or self.regularization < 0:
            raise ValueError(f"`regularization` must be >= 0, got {self.regularization!r}")

    @property
    def soft(self) -> bool:
        return self.method in ("threshold", "sigmoid")

    @property
    def effective_ranking(self) -> str:
        return self.ranking or ("global" if self.soft else "local")


@dataclass
class MagnitudePruningConfig(PruningConfig):
    """Gradual magnitude pruning (Zhu & Gupta 2017): keep the largest weights (L2 norm of each block)."""

    technique: ClassVar[str] = "magnitude"
    pruning_method: ClassVar[str] = "magnitude"


_CONFIGS = {"movement": MovementPruningConfig, "magnitude": MagnitudePruningConfig}


def pruning_config_from_dict(data: dict[str, Any], expected: type | None = None) -> PruningConfig:
    """Rebuild a config from `to_dict()` output; unknown keys (from a newer version) are dropped with a warning."""
    data = dict(data)
    method = data.pop("pruning_method", None)
    data.pop("version", None)
    if method not in _CONFIGS:
        raise ValueError(f"`pruning_method` must be one of {sorted(_CONFIGS)}, got {method!r}")
    cls = _CONFIGS[method]
    if expected not in (None, PruningConfig) and cls is not expected:
        raise ValueError(f"expected a {expected.__name__} dict, got pruning_method {method!r}")
    return super(PruningConfig, cls).from_dict(data)  # the base: known fields, unknown keys warned and dropped
