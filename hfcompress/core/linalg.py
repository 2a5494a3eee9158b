"""Dense linear algebra in place, for square matrices too big to copy (the Hessian of an 11008-wide layer is
485 MB in float32): each function works a block of rows at a time and needs only a block's worth of extra
memory. Pure tensor functions; every one returns the matrix it changed.
"""

from __future__ import annotations

import torch

__all__ = ["all_finite", "invert_lower_", "permute_symmetric_", "reverse_", "transpose_"]

_ROWS = 512


def all_finite(X: torch.Tensor, elements: int = 1 << 22) -> bool:
    """Whether `X` holds no NaN or infinity, checked `elements` at a time: `torch.isfinite` on the whole of it
    makes temporaries about twice its size (1.7 times 485 MB for that Hessian, the peak of the whole solve)."""
    flat = X.reshape(-1) if X.is_contiguous() else X.flatten()
    return all(bool(torch.isfinite(flat[i : i + elements]).all()) for i in range(0, flat.numel(), elements))


def permute_symmetric_(X: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """`X[order][:, order]` in place: rows moved along the permutation's cycles, one row's copy at a time, then
    the columns of a block of rows at a time."""
    n = X.shape[0]
    order_list = order.tolist()
    if sorted(order_list) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n})")
    visited = [False] * n
    for start in range(n):
        if visited[start] or order_list[start] == start:
            continue
        first = X[start].clone()
        i = start
        while True:  # row i takes row order[i]: rows are read before the cycle reaches them
            visited[i] = True
            source = order_list[i]
            if source == start:
                X[i] = first
                break
            X[i] = X[source]
            i = source
    index = order.to(X.device)
    for i in range(0, n, _ROWS):
        X[i : i + _ROWS] = X[i : i + _ROWS].index_select(1, index)
    return X


def transpose_(X: torch.Tensor) -> torch.Tensor:
    """`X.T` in place (X square), swapping blocks across the diagonal."""
    n = X.shape[0]
    for i in range(0, n, _ROWS):
        j = min(i + _ROWS, n)
        X[i:j, i:j] = X[i:j, i:j].t().clone()
        if j < n:
            below = X[j:, i:j].clone()
            X[j:, i:j] = X[i:j, j:].t()
            X[i:j, j:] = below.t()
    return X


def reverse_(X: torch.Tensor) -> torch.Tensor:
    """`X.flip(0, 1)` in place (rows and columns reversed)."""
    n = X.shape[0]
    half = n // 2
    for i in range(0, half, _ROWS):
        j = min(i + _ROWS, half)
        top = X[i:j].flip(0, 1)
        X[i:j] = X[n - j : n - i].flip(0, 1)
        X[n - j : n - i] = top
    if n % 2:
        X[half] = X[half].flip(0)
    return X


def invert_lower_(L: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """The inverse of the lower triangular `L` in place (its strictly upper part must be zero, and stays so),
    by blocks of columns from the last (LAPACK's trtri): with the trailing block already inverted,
    [[D, 0], [B, T⁻¹]] becomes [[D⁻¹, 0], [-T⁻¹ B D⁻¹, T⁻¹]]. `L` may be a transposed view."""
    n = L.shape[0]
    for start in reversed(range(0, n, block)):
        end = min(start + block, n)
        D = L[start:end, start:end]
        if end < n:
            panel = L[end:, start:end]
            panel.copy_(L[end:, end:] @ panel)
            panel.copy_(torch.linalg.solve_triangular(D, panel, upper=False, left=False).neg_())
        identity = torch.eye(end - start, dtype=L.dtype, device=L.device)
        D.copy_(torch.linalg.solve_triangular(D, identity, upper=False))
    return L
