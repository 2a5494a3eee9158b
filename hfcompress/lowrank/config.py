"""Configuration of low-rank factorization."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..core.config import (
    CalibrationArguments,
    CompressionConfig,
    check_hessian_dtype,
    hessian_dtype_field,
    modules_to_not_convert_field,
)

__all__ = ["LowRankConfig"]

METHODS = ("svd", "asvd", "whiten")


@dataclass
class LowRankConfig(CalibrationArguments, CompressionConfig):
    """Factorize linear layers into two thin ones (`FactorizedLinear`), by truncated SVD of the weight, of
    the activation-scaled weight (ASVD) or of the whitened weight (SVD-LLM).

    Give exactly one target: `param_ratio` (keep this fraction of the targeted layers' parameters, ranks
    allocated per layer), `rank` (the same rank everywhere) or `energy` (per layer, the smallest rank keeping
    this fraction of the squared singular values). A layer is factorized only when its factors hold fewer
    parameters than its dense weight.
    """

    technique: ClassVar[str] = "lowrank"

    method: Literal["svd", "asvd", "whiten"] = field(
        default="whiten",
        metadata={
            "help": "svd: plain truncated SVD (no data). asvd: SVD of the weight scaled by input activation "
            "magnitudes. whiten: SVD of the weight times the Cholesky factor of the input Gram matrix, so "
            "truncation minimizes the output error on calibration data."
        },
    )
    param_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction of the targeted linear layers' parameters to keep, in (0, 1]."},
    )
    rank: int | None = field(default=None, metadata={"help": "One rank for every targeted layer."})
    energy: float | None = field(
        default=None,
        metadata={"help": "Per layer, keep this fraction of the squared singular values, in (0, 1]."},
    )
    allocation: Literal["sensitivity", "uniform"] = field(
        default="sensitivity",
        metadata={
            "help": "With param_ratio: 'sensitivity' measures how much each layer's truncation raises the "
            "calibration loss and spends the budget where it costs least; 'uniform' gives every layer the same ratio."
        },
    )
    probe_ratios: list[float] = field(
        default_factory=lambda: [0.3, 0.6, 0.9],
        metadata={
            "help": "Sensitivity allocation: parameter ratios at which each layer's loss increase is measured; "
            "between and beyond them it is predicted from the layer's singular values."
        },
    )
    sensitivity_samples: int = field(
        default=4,
        metadata={"help": "Calibration windows used to measure each layer's sensitivity."},
    )
    sensitivity_cache: str | None = field(
        default=None,
        metadata={
            "help": "JSON file for the sensitivity measurements: read when it holds this model's layers measured "
            "with the same method, probes and samples, written otherwise (so several budgets measure once)."
        },
    )
    sequential: bool = field(
        default=True,
        metadata={"help": "Whiten each block with inputs from the already factorized blocks before it."},
    )
    alpha: float = field(default=0.5, metadata={"help": "ASVD: exponent of the activation scale."})
    damp_percent: float = field(
        default=0.01,
        metadata={"help": "Whitening: diagonal added to a singular Gram matrix, as a fraction of its mean."},
    )
    modules_to_not_convert: list[str] | None = modules_to_not_convert_field()
    hessian_dtype: Literal["float32", "float64"] = hessian_dtype_field()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(METHODS)}, got {self.method!r}")
        targets = [name for name in ("param_ratio", "rank", "energy") if getattr(self, name) is not None]
        if len(targets) != 1:
            raise ValueError(f"give exactly one of `param_ratio`, `rank`, `energy`; got {targets or 'none'}")
        if self.param_ratio is not None and not (0 < self.param_ratio <= 1):
            raise ValueError(f"`param_ratio` must be in (0, 1], got {self.param_ratio!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"`rank` must be a positive integer, got {self.rank!r}")
        if self.energy is not None and not (0 < self.energy <= 1):
            raise ValueError(f"`energy` must be in (0, 1], got {self.energy!r}")
        if self.allocation not in ("sensitivity", "uniform"):
            raise ValueError(f"`allocation` must be 'sensitivity' or 'uniform', got {self.allocation!r}")
        if not self.probe_ratios or any(not (0 < r < 1) for r in self.probe_ratios):
            raise ValueError(f"`probe_ratios` must be a non-empty list of ratios in (0, 1), got {self.probe_ratios!r}")
        self.probe_ratios = sorted(set(self.probe_ratios))
        value = self.sensitivity_samples
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`sensitivity_samples` must be a positive integer, got {value!r}")
        self.check_calibration()
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"`alpha` must be a non-negative number, got {self.alpha!r}")
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"`damp_percent` must be in [0, 1), got {self.damp_percent!r}")
        check_hessian_dtype(self.hessian_dtype)

    def streaming_obstacle(self) -> str | None:
        if self.param_ratio is not None and self.allocation == "sensitivity":
            return (
                "--offload disk cannot allocate ranks by sensitivity (--allocation sensitivity, the default with "
                "--param-ratio): its probes run the whole model after each truncated layer; use --allocation "
                "uniform, --rank or --energy, or load the model whole"
            )
        return None

    @property
    def needs_data(self) -> bool:
        return self.method != "svd" or (self.param_ratio is not None and self.allocation == "sensitivity")
