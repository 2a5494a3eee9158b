"""`evaluate`: the figures a compressed model is judged by, in one dictionary."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig

from ..data import load_texts, resolve_seq_len, tokenize_windows
from .footprint import bits_per_weight, model_bits_per_parameter, weights_size_bytes
from .latency import forward_latency
from .perplexity import perplexity

__all__ = ["evaluate"]

logger = logging.getLogger(__name__)


def evaluate(
    model,
    tokenizer,
    dataset,
    seq_len: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
    latency_runs: int = 5,
    model_folder: str | os.PathLike | None = None,
) -> dict:
    """Perplexity on `dataset` (non-overlapping `seq_len` windows, the first `max_windows`), bits per weight of
    the quantized layers, weight bytes on disk (when `model_folder` is given) and forward latency of one window.
    `seq_len` None is the default window: 512 tokens, or the model's positions if it has fewer."""
    seq_len = resolve_seq_len(model, seq_len)
    dtype_bits = _checkpoint_bits(model_folder)
    windows = tokenize_windows(tokenizer, load_texts(dataset), seq_len)
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"`max_windows` must be positive, got {max_windows}")
        windows = windows[:max_windows]
    model.eval()
    result = {
        "perplexity": perplexity(model, windows, batch_size=batch_size),
        "size_bytes": weights_size_bytes(model_folder) if model_folder is not None else None,
        "bits_per_weight": bits_per_weight(model, dtype_bits),
        "model_bits_per_parameter": model_bits_per_parameter(model, dtype_bits),
        "num_windows": len(windows),
        "seq_len": seq_len,
    }
    if latency_runs > 0:
        result["latency_s"] = forward_latency(model, windows[:1], runs=latency_runs)
    return result


def _checkpoint_bits(folder) -> int | None:
    """Bits of the dtype a model folder stores its floating weights in (None without a folder): the figures count
    what is stored, not the dtype the model was loaded in."""
    if folder is None:
        return None
    dtype = getattr(AutoConfig.from_pretrained(folder), "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return torch.finfo(dtype).bits if isinstance(dtype, torch.dtype) else None
