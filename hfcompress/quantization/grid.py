"""Uniform integer grids: scales, zero points, codes. Pure tensor functions.

A grid of `bits` bits has codes ``0 .. 2**bits - 1``. A weight ``w`` maps to
``code = clamp(round(w / scale) + zero, 0, maxq)`` and back to ``(code - zero) * scale``.
Symmetric grids fix ``zero = 2**(bits - 1)`` so they are the signed grid ``[-2**(b-1), 2**(b-1) - 1]``
shifted by a constant, which is what compressed-tensors stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.packing import SUPPORTED_BITS

__all__ = [
    "SCALE_TORCH_DTYPES",
    "SUPPORTED_BITS",
    "QuantizedWeight",
    "dequantize_codes",
    "grid_params",
    "quantize_to_codes",
    "rtn_quantize",
]

# the storage dtype of the scales, by the name configs and manifests use
SCALE_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantizedWeight:
    """A weight on a grid: integer codes in the original column order plus per-group parameters.

    `codes` is [out, in] (uint8), `scales` and `zeros` are [out, n_groups] (float32; zeros hold integers),
    `g_idx` maps each input column to its group ([in], int32).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def dequantize(
        self, dtype: torch.dtype = torch.float32, rows: int = 256, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """The weight the codes stand for (its rows `start:stop`, all by default), made `rows` rows at a time so
        that the float codes and the group parameters spread over the columns are temporaries of a few rows
        (whole, they were three more copies of the float32 weight); groups of consecutive columns (no act-order)
        broadcast instead of being gathered."""
        in_features = self.codes.shape[1]
        stop = self.codes.shape[0] if stop is None else stop
        n_groups = self.scales.shape[1]
        consecutive = in_features % n_groups == 0 and torch.equal(
            self.g_idx.long(), torch.arange(in_features, device=self.g_idx.device) // (in_features // n_groups)
        )
        g = self.g_idx.long()
        weight = torch.empty(stop - start, in_features, dtype=dtype, device=self.codes.device)
        for first in range(start, stop, rows):
            part, into = slice(first, min(first + rows, stop)), slice(first - start, first - start + rows)
            if consecutive:
                codes = self.codes[part].reshape(-1, n_groups, in_features // n_groups)
                values = dequantize_codes(codes, self.scales[part, :, None], self.zeros[part, :, None])
                weight[into] = values.reshape(-1, in_features)
            else:
                weight[into] = dequantize_codes(
                    self.codes[part], self.scales[part].index_select(1, g), self.zeros[part].index_select(1, g)
                )
        return weight


def grid_params(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    clip_search: bool = False,
    scale_dtype: torch.dtype | None = None,
    column_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of `w` ([rows, cols]) so that the row's range fits the grid.

    With `clip_search`, each row's range is also shrunk by factors down to 0.8 and the factor with the
    smallest rounding error is kept: the sum of |w - q(w)|^2.4 (as in the reference GPTQ), or with
    `column_weights` ([cols]) the squared errors weighted per column (GPTQ passes what each column's error
    costs in its loss). With `scale_dtype`
    the scales are the values that dtype stores (returned in float32), so codes are chosen, and GPTQ's errors
    measured, against the scale the checkpoint will hold.
    """
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if not clip_search:
        return _params_for_range(xmin, xmax, bits, sym, scale_dtype)
    best_scale, best_zero = _params_for_range(xmin, xmax, bits, sym, scale_dtype)
    best_err = _rounding_error(w, best_scale, best_zero, bits, column_weights)
    for shrink in (0.98, 0.96, 0.94, 0.92, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8):
        scale, zero = _params_for_range(xmin * shrink, xmax * shrink, bits, sym, scale_dtype)
        err = _rounding_error(w, scale, zero, bits, column_weights)
        better = err < best_err
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_err = torch.minimum(err, best_err)
    return best_scale, best_zero


def _rounding_error(w, scale, zero, bits, column_weights=None) -> torch.Tensor:
    q = dequantize_codes(quantize_to_codes(w, scale[:, None], zero[:, None], bits), scale[:, None], zero[:, None])
    if column_weights is None:
        return (w - q).abs().pow(2.4).sum(dim=1)
    return (w - q).square() @ column_weights.float()


def _params_for_range(xmin, xmax, bits: int, sym: bool, scale_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = 2**bits - 1
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if scale_dtype is not None:
        stored = scale.to(scale_dtype).float()
        scale = torch.where(stored > 0, stored, scale)  # below the dtype's range: left as it was
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale)
    return scale, zero


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of `w` on the grid; `scale` and `zero` broadcast against `w`."""
    codes = torch.div(w, scale)  # one temporary, the rest in place: this runs on whole weights
    return codes.round_().add_(zero).clamp_(0, 2**bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (codes.float() - zero) * scale


def rtn_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    clip_search: bool = False,
    mask: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Round-to-nearest on groups of `group_size` consecutive input columns (-1: one group per row).
    `mask` (True where kept): pruned weights get the zero point's code, so they stay exactly 0. `scale_dtype`:
    see `grid_params`."""
    if mask is not None:
        weight = weight * mask
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    w = weight.float().reshape(out_features, in_features // group, group)
    scale, zero = grid_params(w.reshape(-1, group), bits, sym, clip_search, scale_dtype)
    scale = scale.reshape(out_features, -1)
    zero = zero.reshape(out_features, -1)
    codes = quantize_to_codes(w, scale.unsqueeze(-1), zero.unsqueeze(-1), bits).reshape(out_features, in_features)
    if mask is not None:
        codes = torch.where(mask.bool(), codes, zero.repeat_interleave(group, dim=1))
    g_idx = torch.arange(in_features, dtype=torch.int32) // group
    return QuantizedWeight(codes.to(torch.uint8), scale, zero, g_idx, bits)
