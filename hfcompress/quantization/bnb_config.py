"""Configuration of bitsandbytes quantization (LLM.int8, NF4, FP4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..core.config import CompressionConfig, allow_partial_field, deprecated_aliases

__all__ = ["BnbConfig"]

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@deprecated_aliases(skip_modules="modules_to_not_convert")
@dataclass
class BnbConfig(CompressionConfig):
    """bitsandbytes weight quantization: 8-bit (LLM.int8) or 4-bit (NF4 or FP4, optionally with double
    quantization of the block scales), computing in `compute_dtype`."""

    bits: Literal[4, 8] = field(default=4, metadata={"help": "4 (NF4/FP4) or 8 (LLM.int8)."})
    quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})
    double_quant: bool = field(
        default=False, metadata={"help": "4-bit: quantize the block scales too (~0.4 bits/weight less)."}
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "4-bit: dtype of the matmuls."}
    )
    modules_to_not_convert: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules left unquantized (names or name suffixes). Default: the output embedding (lm_head) "
            "and the task head (a classifier's score or classifier, qa_outputs)."
        },
    )

    allow_partial: bool = allow_partial_field()

    technique: ClassVar[str] = "bnb"
    method: ClassVar[str] = "bnb"

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"`bits` must be 4 or 8 for bitsandbytes, got {self.bits!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"`quant_type` must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"`compute_dtype` must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.bits == 8 and (self.double_quant or self.quant_type != "nf4"):
            raise ValueError("`double_quant` and `quant_type` apply to 4-bit only; 8-bit is LLM.int8")

    @classmethod
    def header(cls) -> dict[str, Any]:
        return {"method": cls.method}

    @property
    def description(self) -> str:
        """`int8`, `nf4`, `fp4+double-quant`, ..."""
        return "int8" if self.bits == 8 else self.quant_type + ("+double-quant" if self.double_quant else "")

    def to_transformers(self, kept_by_default: list[str] | None = None):
        """The equivalent `transformers.BitsAndBytesConfig`; `kept_by_default`: the modules left unquantized when
        `modules_to_not_convert` is None (`bnb.kept_by_default`; None: lm_head)."""
        import torch
        from transformers import BitsAndBytesConfig

        skip = self.modules_to_not_convert
        if skip is None:
            skip = kept_by_default if kept_by_default is not None else ["lm_head"]
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, self.compute_dtype),
            llm_int8_skip_modules=skip,
        )
