"""`evaluate`: the figures a compressed model is judged by, in one dictionary."""

from __future__ import annotations

import logging
import os

import torch
from transformers import AutoConfig

from ..core.streaming import ShardedCheckpoint
from ..data import load_texts, resolve_seq_len, tokenize_windows
from .footprint import bits_per_weight, model_bits_per_parameter, weights_size_bytes
from .latency import forward_latency
from .perplexity import perplexity
from .streamed import streamed_perplexity
from .tasks import evaluate_tasks

__all__ = ["evaluate", "evaluate_streamed"]

logger = logging.getLogger(__name__)


def evaluate(
    model,
    tokenizer,
    dataset=None,
    seq_len: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
    latency_runs: int = 5,
    model_folder: str | os.PathLike | None = None,
    tasks: str | list[str] | None = None,
    tasks_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    quiet: bool = False,
) -> dict:
    """The figures a compressed model is judged by: bits per weight of the compressed layers and of the whole
    model, weight bytes on disk (when `model_folder` is given); with `dataset`, perplexity on it
    (non-overlapping `seq_len` windows, the first `max_windows`; `seq_len` None is 512 tokens or the model's
    positions if fewer) and the forward latency of one window; with `tasks`, lm-evaluation-harness tasks
    (`evaluation.tasks.evaluate_tasks`: `tasks_dir`, `limit`, `num_fewshot`) under `"tasks"`."""
    if dataset is None and tasks is None:
        raise ValueError("nothing to evaluate: give `dataset` (perplexity) and/or `tasks` (lm-eval tasks)")
    dtype_bits = _checkpoint_bits(model_folder)
    model.eval()
    result = {
        "size_bytes": weights_size_bytes(model_folder) if model_folder is not None else None,
        "bits_per_weight": bits_per_weight(model, dtype_bits),
        "model_bits_per_parameter": model_bits_per_parameter(model, dtype_bits),
    }
    if dataset is not None:
        windows = _windows(model, tokenizer, dataset, seq_len, max_windows)
        seq_len = windows.shape[1]
        result = {"perplexity": perplexity(model, windows, batch_size=batch_size), **result}
        result.update(num_windows=len(windows), seq_len=seq_len)
        if latency_runs > 0:
            result["latency_s"] = forward_latency(model, windows[:1], runs=latency_runs)
    if tasks is not None:
        result["tasks"] = evaluate_tasks(
            model, tokenizer, tasks, tasks_dir=tasks_dir, limit=limit, num_fewshot=num_fewshot, quiet=quiet
        )
    return result


def evaluate_streamed(
    model_folder: str | os.PathLike,
    tokenizer,
    dataset,
    seq_len: int | None = None,
    max_windows: int | None = None,
    batch_size: int = 4,
    scratch: str | os.PathLike | None = None,
) -> dict:
    """`evaluate`'s figures for the causal LM in `model_folder` without ever holding it whole: the perplexity
    streamed one block at a time from its safetensors weights (`streamed_perplexity`, block inputs in a
    temporary folder inside `scratch`), the bits counted on its skeleton (no weights read), the size of its
    files. No latency (a model read from disk block by block has none worth reporting) and no lm-eval tasks."""
    checkpoint = ShardedCheckpoint(model_folder)
    skeleton = checkpoint.skeleton("causal-lm", checkpoint.stored_dtype(), compressed=True)
    dtype_bits = _checkpoint_bits(model_folder)
    windows = _windows(skeleton, tokenizer, dataset, seq_len, max_windows)
    return {
        "perplexity": streamed_perplexity(model_folder, windows, batch_size=batch_size, folder=scratch),
        "size_bytes": weights_size_bytes(model_folder),
        "bits_per_weight": bits_per_weight(skeleton, dtype_bits),
        "model_bits_per_parameter": model_bits_per_parameter(skeleton, dtype_bits),
        "num_windows": len(windows),
        "seq_len": windows.shape[1],
        "offload": "disk",
    }


def _windows(model, tokenizer, dataset, seq_len: int | None, max_windows: int | None) -> torch.Tensor:
    """The non-overlapping windows of `dataset` to score (`seq_len` None: see `resolve_seq_len`), the first
    `max_windows`."""
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"`max_windows` must be positive, got {max_windows}")
    windows = tokenize_windows(tokenizer, load_texts(dataset), resolve_seq_len(model, seq_len))
    return windows[:max_windows] if max_windows is not None else windows


def _checkpoint_bits(folder) -> int | None:
    """Bits of the dtype a model folder stores its floating weights in (None without a folder): the figures count
    what is stored, not the dtype the model was loaded in."""
    if folder is None:
        return None
    dtype = getattr(AutoConfig.from_pretrained(folder), "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    return torch.finfo(dtype).bits if isinstance(dtype, torch.dtype) else None
