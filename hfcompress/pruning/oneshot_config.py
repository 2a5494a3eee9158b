"""Configuration of one-shot pruning (magnitude, Wanda, SparseGPT)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..core.config import (
    CalibrationArguments,
    CompressionConfig,
    check_hessian_dtype,
    deprecated_aliases,
    hessian_dtype_field,
    modules_to_not_convert_field,
)

__all__ = ["OneShotPruningConfig"]

FORMAT_VERSION = 1


@deprecated_aliases(blocksize="block_size")
@dataclass
class OneShotPruningConfig(CalibrationArguments, CompressionConfig):
    """Prune a trained model in one pass. `magnitude` needs no data; `wanda` and `sparsegpt` need
    calibration texts (`dataset`)."""

    technique: ClassVar[str] = "oneshot"

    method: Literal["magnitude", "wanda", "sparsegpt"] = field(
        default="sparsegpt",
        metadata={
            "help": "magnitude: smallest |W| per layer. wanda: smallest |W| * input norm per output row. "
            "sparsegpt: Hessian-based mask with weight updates that compensate the pruned weights."
        },
    )
    sparsity: float = field(default=0.5, metadata={"help": "Fraction of the weights pruned, in [0, 1)."})
    pattern: str | None = field(
        default=None,
        metadata={
            "help": "Semi-structured 'N:M' (e.g. '2:4': N of every M consecutive inputs kept) instead of unstructured."
        },
    )
    damp_percent: float = field(
        default=0.01, metadata={"help": "SparseGPT: dampening, fraction of the mean Hessian diagonal."}
    )
    block_size: int = field(default=128, metadata={"help": "SparseGPT: columns pruned together."})
    modules_to_not_convert: list[str] | None = modules_to_not_convert_field()
    hessian_dtype: Literal["float32", "float64"] = hessian_dtype_field()

    def __post_init__(self):
        if self.method not in ("magnitude", "wanda", "sparsegpt"):
            raise ValueError(f"`method` must be 'magnitude', 'wanda' or 'sparsegpt', got {self.method!r}")
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"`sparsity` must be in [0, 1), got {self.sparsity!r}")
        if self.pattern is not None:
            match = re.fullmatch(r"(\d+):(\d+)", str(self.pattern))
            if not match or not 0 < int(match[1]) < int(match[2]):
                raise ValueError(f"`pattern` must look like '2:4' (N:M with 0 < N < M), got {self.pattern!r}")
            _, m = self.nm
            if self.block_size % m:
                raise ValueError(f"`block_size` ({self.block_size}) must be a multiple of M ({m})")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"`block_size` must be a positive integer, got {self.block_size!r}")
        check_hessian_dtype(self.hessian_dtype)
        self.check_calibration()

    @property
    def nm(self) -> tuple[int, int]:
        if self.pattern is None:
            return (0, 0)
        n, m = (int(x) for x in self.pattern.split(":"))
        return n, m

    @property
    def effective_sparsity(self) -> float:
        n, m = self.nm
        return 1 - n / m if m else self.sparsity

    @classmethod
    def header(cls) -> dict[str, Any]:
        return {"pruning_method": "oneshot", "version": FORMAT_VERSION}
