"""Configs of non-uniform quantization: scalar k-means per channel and vector quantization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..core.config import (
    CalibrationArguments,
    CompressionConfig,
    allow_partial_field,
    check_hessian_dtype,
    hessian_dtype_field,
    modules_to_not_convert_field,
)

__all__ = ["KMeansConfig", "VQConfig"]


@dataclass
class _CodebookConfig(CalibrationArguments, CompressionConfig):
    iters: int = field(default=25, metadata={"help": "Lloyd iterations of k-means."})
    modules_to_not_convert: list[str] | None = modules_to_not_convert_field()
    allow_partial: bool = allow_partial_field()
    hessian_dtype: Literal["float32", "float64"] = hessian_dtype_field()

    @classmethod
    def header(cls) -> dict[str, Any]:
        return {"method": cls.method}

    def _check_common(self) -> None:
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"`iters` must be a positive integer, got {self.iters!r}")
        check_hessian_dtype(self.hessian_dtype)
        self.check_calibration()


@dataclass
class KMeansConfig(_CodebookConfig):
    """Scalar non-uniform quantization (SqueezeLLM-style): each output channel gets its own 2^bits levels,
    fitted by k-means weighted by input sensitivity (the Hessian diagonal from calibration data, or uniform)."""

    bits: int = field(default=3, metadata={"help": "Bits per weight: 2, 3 or 4 (2^bits levels per channel)."})

    technique: ClassVar[str] = "kmeans"
    method: ClassVar[str] = "kmeans"

    def __post_init__(self):
        if self.bits not in (2, 3, 4):
            raise ValueError(f"`bits` must be 2, 3 or 4 for k-means, got {self.bits!r}")
        self._check_common()


@dataclass
class VQConfig(_CodebookConfig):
    """Vector quantization: runs of `dim` consecutive weights of a row are replaced by the nearest of
    2^(bits*dim) centroids, one codebook per layer (or per group of rows), fitted by weighted k-means."""

    bits: int = field(default=2, metadata={"help": "Bits per weight (index bits = bits * dim, at most 8)."})
    dim: int = field(default=2, metadata={"help": "Vector length: 2 or 4 consecutive weights."})
    groups: int = field(default=1, metadata={"help": "Codebooks per layer (each for a block of rows)."})

    technique: ClassVar[str] = "vq"
    method: ClassVar[str] = "vq"

    def __post_init__(self):
        if self.dim not in (2, 4):
            raise ValueError(f"`dim` must be 2 or 4, got {self.dim!r}")
        if not isinstance(self.bits, int) or self.bits < 1 or self.bits * self.dim > 8:
            raise ValueError(f"`bits` * `dim` must be at most 8 (index bits), got bits={self.bits!r}, dim={self.dim}")
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"`groups` must be a positive integer, got {self.groups!r}")
        self._check_common()
