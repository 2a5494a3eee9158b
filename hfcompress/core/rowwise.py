"""A linear's output computed a block of its weight's rows at a time, so that a weight made on the fly (upcast
from bfloat16, or dequantized from codes) never exists whole in float32: a 4096 x 11008 layer's float32 weight is
180 MB, a block of its rows 16 MB. Each output column reads only its own weight row, and the BLAS reduces over
the inputs in the same order whichever columns it is asked for, so the output is the one-matmul output (the
tests compare them bit for bit; blocks are at least `MIN_ROWS` rows, below which BLAS libraries switch to
matrix-vector kernels that sum differently).

    y = linear_by_rows(x, lambda start, stop: weight[start:stop].float(), weight.shape[0], bias)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["MIN_ROWS", "conv1d_by_rows", "linear_by_rows", "rows_per_block"]

ELEMENTS = 1 << 22  # weights made at a time: 16 MiB in float32
MIN_ROWS = 256

Rows = Callable[[int, int], torch.Tensor]  # (start, stop) -> rows start:stop of the [out, in] weight


def rows_per_block(in_features: int, elements: int | None = None) -> int:
    """How many weight rows one block holds: `elements` weights (default `ELEMENTS`), at least `MIN_ROWS`."""
    return max(MIN_ROWS, (ELEMENTS if elements is None else elements) // max(in_features, 1))


def linear_by_rows(
    input: torch.Tensor, weight_rows: Rows, out_features: int, bias: torch.Tensor | None = None, rows: int = 0
) -> torch.Tensor:
    """`F.linear(input, W, bias)` with W's rows made by `weight_rows(start, stop)`, `rows` (default: from
    `rows_per_block`) at a time."""
    rows = rows or rows_per_block(input.shape[-1])

    def part(start: int, stop: int) -> torch.Tensor:
        return F.linear(input, weight_rows(start, stop), None if bias is None else bias[start:stop])

    return _by_rows(part, out_features, rows)


def conv1d_by_rows(
    input: torch.Tensor, weight_rows: Rows, out_features: int, bias: torch.Tensor, rows: int = 0
) -> torch.Tensor:
    """What transformers' `Conv1D` computes (`addmm` with its [in, out] weight) with the [out, in] weight's rows
    made by `weight_rows(start, stop)`, a block at a time."""
    flat = input.reshape(-1, input.shape[-1])
    rows = rows or rows_per_block(input.shape[-1])

    def part(start: int, stop: int) -> torch.Tensor:
        return torch.addmm(bias[start:stop], flat, weight_rows(start, stop).t().contiguous())

    return _by_rows(part, out_features, rows).view(*input.shape[:-1], out_features)


def _by_rows(part: Callable[[int, int], torch.Tensor], out_features: int, rows: int) -> torch.Tensor:
    first = part(0, min(rows, out_features))
    if first.shape[-1] == out_features:
        return first
    out = first.new_empty(*first.shape[:-1], out_features)
    out[..., :rows] = first
    del first
    for start in range(rows, out_features, rows):
        stop = min(start + rows, out_features)
        out[..., start:stop] = part(start, stop)
    return out
