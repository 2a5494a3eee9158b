"""4- and 8-bit bitsandbytes quantization through transformers' own `BitsAndBytesConfig`.

bitsandbytes quantizes while `from_pretrained` loads the weights, so `quantize_bnb` reloads an in-memory
model from a temporary safetensors copy. The result saves with `save_pretrained` and loads back with plain
`from_pretrained` (no hfcompress needed): transformers writes the bitsandbytes `quantization_config`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from ..core.config import CompressionConfig, deprecated_aliases

__all__ = ["BnbConfig", "load_bnb", "quantize_bnb", "quiet_bitsandbytes", "require_bitsandbytes"]

logger = logging.getLogger(__name__)

PIP_LINE = "pip install 'hfcompress[bnb]'   (or: pip install 'bitsandbytes>=0.45')"
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(f"bitsandbytes quantization needs the bitsandbytes package: {PIP_LINE}") from e


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
        default=None, metadata={"help": "Modules left unquantized (names or name suffixes). Default: lm_head."}
    )

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

    def to_transformers(self):
        """The equivalent `transformers.BitsAndBytesConfig`."""

        skip = self.modules_to_not_convert if self.modules_to_not_convert is not None else ["lm_head"]
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=COMPUTE_DTYPES[self.compute_dtype],
            llm_int8_skip_modules=skip,
        )


class _OncePerMessage(logging.Filter):
    """Let each distinct message template through once (bitsandbytes logs some on every matmul)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def quiet_bitsandbytes() -> None:
    """Show each bitsandbytes runtime warning once (LLM.int8 on CPU warns on every forward of every layer
    that its float32 inputs are cast to float16). Idempotent."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _OncePerMessage) for f in log.filters):
            log.addFilter(_OncePerMessage())


def load_bnb(model_path, config: BnbConfig, model_class=None, dtype: torch.dtype = torch.float32, **kwargs):
    """Load `model_path` quantized by bitsandbytes as `config` says."""
    require_bitsandbytes()
    quiet_bitsandbytes()
    model_class = model_class or AutoModelForCausalLM
    return model_class.from_pretrained(model_path, quantization_config=config.to_transformers(), dtype=dtype, **kwargs)


def quantize_bnb(model: nn.Module, config: BnbConfig) -> nn.Module:
    """A bitsandbytes-quantized copy of an in-memory transformers model (via a temporary safetensors copy)."""
    require_bitsandbytes()
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(f"the model is already quantized ({model.config.quantization_config.quant_method})")
    dtype = next(model.parameters()).dtype
    with tempfile.TemporaryDirectory(prefix="hfcompress-bnb-") as folder:
        model.save_pretrained(folder)
        quantized = load_bnb(folder, config, model_class=type(model), dtype=dtype)
    quantized.eval()
    return quantized
