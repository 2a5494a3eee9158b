"""Perplexity of a causal LM over non-overlapping windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.utils.logging import tqdm

from ..core.precision import maths_for

__all__ = ["perplexity"]

# the float32 logits one forward pass may hold: a batch of long windows over a large vocabulary is scored in
# smaller batches (4 windows of 2048 tokens over Llama 3's 128,256 tokens would be 4.2 GB)
LOGITS_BYTES = 1 << 30


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp of the mean next-token negative log-likelihood over every predicted token of `windows` [n, seq_len].

    Each window is scored on its own (no context carried over), predicting tokens 2..seq_len. Weights held in
    bfloat16 or float16 compute in float32 (`core.precision`): the figure is that of the weights, not of
    low-precision arithmetic. Batches are cut below `batch_size` windows where their float32 logits would
    exceed `LOGITS_BYTES` (one window at least): the same figure, in less memory.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"`windows` must be [n_windows, seq_len >= 2], got {tuple(windows.shape)}")
    vocab_size = getattr(model.config.get_text_config(), "vocab_size", None)
    if vocab_size:
        batch_size = max(1, min(batch_size, LOGITS_BYTES // (4 * windows.shape[1] * vocab_size)))
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with maths_for(model):
        for batch in tqdm(windows.split(batch_size), desc="perplexity"):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)
