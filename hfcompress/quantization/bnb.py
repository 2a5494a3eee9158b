"""4- and 8-bit bitsandbytes quantization through transformers' own `BitsAndBytesConfig`.

bitsandbytes quantizes while `from_pretrained` loads the weights, so `quantize_bnb` reloads an in-memory
model from a temporary safetensors copy. The result saves with `save_pretrained` and loads back with plain
`from_pretrained` (no hfcompress needed): transformers writes the bitsandbytes `quantization_config`.
"""

from __future__ import annotations

import logging
import tempfile

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..core.structure import task_head
from .bnb_config import BnbConfig

__all__ = ["BnbConfig", "apply_bnb", "load_bnb", "quantize_bnb", "quiet_bitsandbytes", "require_bitsandbytes"]

logger = logging.getLogger(__name__)

PIP_LINE = "pip install 'hfcompress[bnb]'   (or: pip install 'bitsandbytes>=0.45')"


def require_bitsandbytes() -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ImportError(f"bitsandbytes quantization needs the bitsandbytes package: {PIP_LINE}") from e


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


def kept_by_default(model_path, model_class) -> list[str]:
    """The layers `model_class` built from `model_path`'s config keeps in full precision by default: its output
    embedding and its task head (`core.structure.task_head`; transformers' own default keeps the module of the
    last parameter, which is `classifier.bias` and so nothing for a classifier with a bias)."""
    build = getattr(model_class, "from_config", None) or model_class._from_config
    with init_empty_weights(include_buffers=False):
        skeleton = build(AutoConfig.from_pretrained(model_path))
    output = skeleton.get_output_embeddings()
    outputs = [name for name, module in skeleton.named_modules() if output is not None and module is output]
    return list(dict.fromkeys(outputs + task_head(skeleton)))  # a causal LM's lm_head is both


def load_bnb(model_path, config: BnbConfig, model_class=None, dtype: torch.dtype = torch.float32, **kwargs):
    """Load `model_path` quantized by bitsandbytes as `config` says."""
    require_bitsandbytes()
    quiet_bitsandbytes()
    model_class = model_class or AutoModelForCausalLM
    kept = kept_by_default(model_path, model_class) if config.modules_to_not_convert is None else None
    quantization_config = config.to_transformers(kept)
    return model_class.from_pretrained(model_path, quantization_config=quantization_config, dtype=dtype, **kwargs)


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


def apply_bnb(model: nn.Module, config: BnbConfig, tokenizer=None) -> nn.Module:
    """The technique's step: `quantize_bnb`, which needs no tokenizer."""
    return quantize_bnb(model, config)
