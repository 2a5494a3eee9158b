"""Forward latency, as the median of repeated timed runs after warm-up."""

from __future__ import annotations

import statistics
import time

import torch

__all__ = ["forward_latency"]


@torch.no_grad()
def forward_latency(model, input_ids: torch.Tensor, runs: int = 5, warmup: int = 1) -> float:
    """Median seconds of one forward pass over `input_ids` [batch, seq_len]."""
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    timings = []
    for i in range(warmup + runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            timings.append(time.perf_counter() - start)
    return statistics.median(timings)
