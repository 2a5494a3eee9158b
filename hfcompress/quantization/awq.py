"""Activation-aware weight quantization (AWQ, Lin et al., 2023) as pure tensor functions: the per-input-channel
scales that protect the weights of salient channels before round-to-nearest.

A linear layer computing `x Wᵀ` computes the same with `W·diag(s)` on `x / s`; the `1/s` folds into whatever
produced `x` (a norm's weight, the rows of a previous linear). Quantizing `W·diag(s)` instead of `W` gives channels
with large activations (large `s`) finer steps. `s = a^α / w^(1-α)` (`a` each input channel's mean |x|
on the calibration data, `w` its mean normalized weight magnitude: "duo scaling"), normalized to a geometric mean of 1, with α
on a grid; the chosen `s` minimizes the output error of the quantized layers on the calibration data, here
measured exactly through the input Hessian `H = 2 XᵀX / n`: `tr(Δ H Δᵀ)` with `Δ = W - Q(W·diag(s))·diag(1/s)`
(not on a subset of tokens, as the reference implementation does). `s = 1` (no scaling) is always a candidate,
so the search never does worse than round-to-nearest on that objective. `best_scales` searches the same grid on
any objective: `awq_outputs` scores a group of linears by the output of the module holding them instead.
"""

from __future__ import annotations

import torch

from ..core.rowwise import rows_per_block
from .grid import rtn_quantize

__all__ = [
    "awq_clip",
    "awq_scales",
    "best_scales",
    "output_error_basis",
    "round_trip",
    "scale_candidates",
    "weight_magnitude",
]

# columns of the random sketch of H's square root that rank candidate scales on wide layers
SKETCH = 512


def output_error_basis(
    H: torch.Tensor, damp_percent: float = 0.01, generator=None, overwrite: bool = False
) -> torch.Tensor:
    """A matrix `B` [in, k] with `‖Δ B‖² ≈ tr(Δ H Δᵀ)` for any `Δ` [out, in]: the Cholesky factor of H (exact, k =
    in) up to `SKETCH` inputs, above that its product with a Gaussian sketch (unbiased, k = SKETCH), so each
    candidate costs out·in·k instead of out·in². With `overwrite`, a contiguous float32 `H` is damped and
    factorized in its own memory (its values are lost) instead of in a copy: an MLP's down projection's is 0.46 GB
    for 11008 inputs."""
    in_place = overwrite and H.dtype == torch.float32 and H.is_contiguous()
    # the copy is made without an identity the size of H
    damped = H if in_place else H.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    damped.diagonal().add_(damp_percent * damped.diagonal().mean().clamp(min=1e-8))
    # factorized in its own memory: LAPACK works on column-major matrices, so the (symmetric) damped matrix is
    # handed over as its transposed view, which it factorizes in place instead of through two more matrices
    L = damped.mT
    torch.linalg.cholesky_ex(L, check_errors=True, out=(L, torch.empty((), dtype=torch.int32, device=H.device)))
    L.tril_()
    if H.shape[0] <= SKETCH:
        return L
    sketch = torch.randn(H.shape[0], SKETCH, generator=generator, device=H.device) / SKETCH**0.5
    return L @ sketch


def awq_scales(
    weight: torch.Tensor,
    H: torch.Tensor | None,
    bits: int,
    group_size: int,
    sym: bool,
    n_grid: int = 20,
    duo_scaling: bool = True,
    scale_dtype: torch.dtype | None = None,
    basis: torch.Tensor | None = None,
    activation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float | None]:
    """The input-channel scales [in] of `weight` [out, in] (linears sharing one input, stacked) that minimize
    the output error of round-to-nearest on the grid (`bits`, `group_size`, `sym`), and the α that gave them
    (None: no scaling was best). `H` is the input Hessian; `basis` its `output_error_basis` if already made;
    `activation` each input channel's mean |x| (AWQ's statistic; without it, the RMS from H's diagonal). `H` is
    not read when both `basis` and `activation` are given (it may be None)."""
    # rows round independently: a block of them at a time, upcast on the fly, holds one block's float32
    # temporaries, not the weight's (an MLP's gate and up projections are 0.36 GB in float32 at hidden 4096)
    parts = weight.detach().split(rows_per_block(weight.shape[1]))
    basis = output_error_basis(H) if basis is None else basis
    if activation is None:
        activation = H.diagonal().float().clamp(min=0).sqrt()

    def error(s: torch.Tensor) -> float:
        total = 0.0
        for part in parts:
            part = part.float()
            total += float(((part - round_trip(part, s, bits, group_size, sym, scale_dtype)) @ basis).square().sum())
        return total

    return best_scales(activation, weight_magnitude(weight, group_size), n_grid, duo_scaling, error)


def best_scales(
    activation: torch.Tensor, magnitude: torch.Tensor, n_grid: int, duo_scaling: bool, error
) -> tuple[torch.Tensor, float | None]:
    """The scales among no scaling and `scale_candidates` with the least `error(s)` (a float), and their α
    (None: no scaling). Ties keep the earlier candidate, so no scaling wins unless something beats it."""
    best_s, best_alpha = torch.ones_like(activation, dtype=torch.float32), None
    best = error(best_s)
    for alpha, s in scale_candidates(activation, magnitude, n_grid, duo_scaling):
        loss = error(s)
        if loss < best:
            best, best_s, best_alpha = loss, s, alpha
    return best_s, best_alpha


def scale_candidates(activation: torch.Tensor, magnitude: torch.Tensor, n_grid: int, duo_scaling: bool):
    """AWQ's grid: (α, s) for α = 0, 1/n_grid, ..., with `s = a^α / w^(1-α)` (`a^α` without duo scaling),
    normalized to a geometric mean of 1 between its extremes; non-finite candidates are skipped."""
    activation = activation.float()
    for step in range(n_grid):
        alpha = step / n_grid
        s = activation.pow(alpha) / (magnitude.pow(1 - alpha) + 1e-4) if duo_scaling else activation.pow(alpha)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if bool(torch.isfinite(s).all()):
            yield alpha, s


def round_trip(
    weight: torch.Tensor, s: torch.Tensor, bits: int, group_size: int, sym: bool, scale_dtype=None
) -> torch.Tensor:
    """What `weight` [out, in] computes as, in float32, once scaled by `s` [in], rounded to the grid and scaled
    back: `Q(W·diag(s))·diag(1/s)`."""
    scaled = weight.float() * s
    return rtn_quantize(scaled, bits, group_size, sym, scale_dtype=scale_dtype).dequantize(torch.float32) / s


def weight_magnitude(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each input channel's mean over all rows of `|w| / max|w|` (the max over the channel's group in that row),
    AWQ's weight statistic for duo scaling, from blocks of rows (summed in float64)."""
    parts = weight.detach().split(rows_per_block(weight.shape[1]))
    group = weight.shape[1] if group_size == -1 else group_size
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for part in parts:
        normalized = part.float().abs().reshape(part.shape[0], -1, group)
        normalized /= normalized.amax(dim=2, keepdim=True).clamp(min=1e-12)
        total += normalized.reshape(part.shape).sum(dim=0, dtype=torch.float64)
    return (total / weight.shape[0]).float()


def awq_clip(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int,
    sym: bool,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    scale_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`weight` [out, in] with each group of each row clamped to `±r·max|w|`, `r` from 1 down to `1 - max_shrink`
    on `n_grid` steps, the `r` that minimizes the group's share of the output error after round-to-nearest
    (`δ H_gg δᵀ`, `H_gg` the group's diagonal block of the input Hessian), as AWQ's clipping search does on
    sampled tokens. Clamping trades the largest weights' error for finer steps everywhere else."""
    in_features = weight.shape[1]
    group = in_features if group_size == -1 else group_size
    blocks = H.reshape(in_features // group, group, in_features // group, group).diagonal(dim1=0, dim2=2)
    blocks = blocks.permute(2, 0, 1).float()  # [groups, g, g]: only these are cast (a float64 H is not copied)
    # rows are clipped independently: a block of them at a time holds one block's candidates, not the weight's
    parts = weight.detach().split(rows_per_block(in_features))
    clipped = [_clip_rows(p.float(), blocks, bits, group_size, sym, n_grid, max_shrink, scale_dtype) for p in parts]
    return torch.cat(clipped).to(weight.dtype)


def _clip_rows(W, blocks, bits, group_size, sym, n_grid, max_shrink, scale_dtype) -> torch.Tensor:
    """`awq_clip` of the float32 rows `W` given the Hessian's diagonal blocks [groups, g, g]."""
    grouped = W.reshape(W.shape[0], -1, blocks.shape[1])
    peak = grouped.abs().amax(dim=2, keepdim=True)
    best_w, best = grouped, None
    for step in range(n_grid):
        r = 1 - max_shrink * step / n_grid
        clamped = grouped.clamp(-r * peak, r * peak)
        quantized = rtn_quantize(clamped.reshape(W.shape), bits, group_size, sym, scale_dtype=scale_dtype)
        delta = grouped - quantized.dequantize(torch.float32).reshape(grouped.shape)
        error = torch.einsum("ogi,gij,ogj->og", delta, blocks, delta)
        if best is None:
            best = error
            continue
        better = (error < best).unsqueeze(-1)
        best_w = torch.where(better, clamped, best_w)
        best = torch.minimum(error, best)
    return best_w.reshape(W.shape)
