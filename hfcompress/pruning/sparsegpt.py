"""SparseGPT (Frantar & Alistarh 2023) and Wanda (Sun et al. 2023) as pure tensor functions.

Notation as in the reference GPTQ/SparseGPT code: `W` [rows, columns], `H` = 2 X^T X / n the input Hessian,
`Hinv` the upper Cholesky factor of its inverse, `Err` the scaled errors propagated to later columns.
"""

from __future__ import annotations

import torch

from ..core.hessian import hessian_diagonal, inverse_cholesky
from .masks import n_m_mask

__all__ = ["magnitude_prune", "sparsegpt_factor", "sparsegpt_prune", "sparsegpt_prune_factored", "wanda_prune"]


# columns of the later weights updated at once after each block of columns (a 4096-row layer's temporary: 32 MB)
_UPDATE_COLUMNS = 2048


def _check(sparsity: float, n: int, m: int) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1), got {sparsity}")
    if (n or m) and not 0 < n < m:
        raise ValueError(f"an N:M pattern needs 0 < N < M, got {n}:{m}")


def _lowest(metric: torch.Tensor, sparsity: float, dim: int | None) -> torch.Tensor:
    """True where `metric` is among the lowest `sparsity` fraction (of the whole matrix, or along `dim`)."""
    if dim is None:
        k = int(metric.numel() * sparsity)
        mask = torch.zeros(metric.numel(), dtype=torch.bool, device=metric.device)
        if k:
            mask[torch.topk(metric.flatten(), k, largest=False).indices] = True
        return mask.view_as(metric)
    k = int(metric.shape[dim] * sparsity)
    mask = torch.zeros_like(metric, dtype=torch.bool)
    if k:
        mask.scatter_(dim, torch.topk(metric, k, dim=dim, largest=False).indices, True)
    return mask


def magnitude_prune(W: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """Zero the smallest weights of the layer (or the N:M smallest of every M inputs). Returns a new W."""
    _check(sparsity, n, m)
    metric = W.abs().float()
    pruned = ~n_m_mask(metric, n, m) if m else _lowest(metric, sparsity, None)
    return W.masked_fill(pruned, 0)


def wanda_prune(W: torch.Tensor, H: torch.Tensor, sparsity: float, n: int = 0, m: int = 0) -> torch.Tensor:
    """Wanda: the metric |W_ij| * ||X_j||_2 (the input norms from the Hessian's diagonal; `H` the Hessian or that
    diagonal alone), compared within each output row (or N:M group). No weight update. Returns a new W."""
    _check(sparsity, n, m)
    metric = W.abs().float() * hessian_diagonal(H).float().clamp(min=0).sqrt()[None, :]
    pruned = ~n_m_mask(metric, n, m) if m else _lowest(metric, sparsity, 1)
    return W.masked_fill(pruned, 0)


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp_percent: float = 0.01,
) -> torch.Tensor:
    """SparseGPT: prune column block by column block, choosing each block's mask by w^2 / [Hinv]_jj^2 and
    updating the not-yet-pruned weights to compensate (the optimal brain surgeon update along the Cholesky
    factor). Unstructured masks reach `sparsity` per block of columns; N:M masks are chosen every M columns.
    Returns the pruned (and updated) W in its dtype; `H` is read, never changed."""
    _check(sparsity, n, m)
    return sparsegpt_prune_factored(W, *sparsegpt_factor(H, damp_percent), sparsity, n, m, block_size)


def sparsegpt_factor(
    H: torch.Tensor, damp_percent: float = 0.01, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """What SparseGPT needs of the Hessian, once for every layer that reads the same input: `Hinv`, the upper
    Cholesky factor of the dampened H⁻¹, and `dead`, the inputs that are always zero. With `overwrite`, `Hinv`
    takes H's own memory (H is lost: for a wide layer, hundreds of MB saved)."""
    dead = torch.diag(H) == 0
    return inverse_cholesky(H.detach().float(), damp_percent, fix_dead=True, overwrite=overwrite), dead


def sparsegpt_prune_factored(
    W: torch.Tensor,
    Hinv: torch.Tensor,
    dead: torch.Tensor,
    sparsity: float,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
) -> torch.Tensor:
    """`sparsegpt_prune` from `sparsegpt_factor`'s `Hinv` and `dead` (read, never changed)."""
    _check(sparsity, n, m)
    if m and block_size % m:
        raise ValueError(f"`block_size` ({block_size}) must be a multiple of M ({m})")
    dtype = W.dtype
    W = W.detach().clone().float()
    columns = W.shape[1]
    W[:, dead] = 0

    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if m:
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        else:
            pruned = _lowest(W1.pow(2) / d.pow(2)[None, :], sparsity, None)
        for i in range(i2 - i1):
            if m and i % m == 0:
                metric = W1[:, i : i + m].pow(2) / d[i : i + m].pow(2)[None, :]
                pruned[:, i : i + m] = ~n_m_mask(metric, n, m)
            w = W1[:, i]
            q = w.masked_fill(pruned[:, i], 0)
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        for j1 in range(i2, columns, _UPDATE_COLUMNS):  # the later columns' update without a W-sized temporary
            j2 = min(j1 + _UPDATE_COLUMNS, columns)
            W[:, j1:j2] -= Err1 @ Hinv[i1:i2, j1:j2]
    return W.to(dtype)
