"""The input Hessian of a linear layer's squared output error, H = 2 XᵀX / n, as pure tensor functions: its
running accumulation over calibration batches and the upper Cholesky factor of its inverse (GPTQ, SparseGPT,
whitened SVD and k-means all start from it)."""

from __future__ import annotations

import contextlib

import torch

from .distributed import reduce_mean, reduce_sum
from .linalg import all_finite, invert_lower_, permute_symmetric_, reverse_, transpose_
from .tensor_file import SpilledTensor

__all__ = [
    "Hessian",
    "accumulate_hessian",
    "gram_upper",
    "hessian_diagonal",
    "inverse_cholesky",
    "symmetrize_upper",
    "symmetrize_upper_",
]


def gram_upper(x: torch.Tensor, block: int = 256, out: torch.Tensor | None = None, alpha: float = 1.0) -> torch.Tensor:
    """The upper triangle (diagonal included) of xᵀx for x [rows, n]; entries below it are unspecified.
    With `out`, `alpha` xᵀx is added to it in place instead (no n x n temporary) and `out` is returned; an `out`
    of a wider dtype than x's gets the products computed in x's dtype (one block of rows at a time).

    Only blocks on and above the diagonal are computed: about 30% fewer FLOPs than xᵀx. (SciPy's `ssyrk`
    halves them, but its BLAS threads fight torch's for the cores and slow every other matmul.)
    """
    n = x.shape[1]
    if out is None:
        out = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, block):
        if out.dtype == x.dtype:
            out[i : i + block, i:].addmm_(x[:, i : i + block].t(), x[:, i:], alpha=alpha)
        else:  # a wider `out` (a float64 sum): the block's product in x's dtype, added in out's
            out[i : i + block, i:].add_(x[:, i : i + block].t() @ x[:, i:], alpha=alpha)
    return out


def symmetrize_upper(H: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle is that of `H`."""
    upper = torch.triu(H)
    return upper + torch.triu(upper, diagonal=1).t()


def symmetrize_upper_(H: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`symmetrize_upper` in place, a block of rows at a time; returns `H`."""
    n = H.shape[0]
    for i in range(0, n, block):
        j = min(i + block, n)
        H[i:j, :i] = H[:i, i:j].t()
        diagonal = H[i:j, i:j]
        diagonal.copy_(symmetrize_upper(diagonal))
    return H


def accumulate_hessian(
    x: torch.Tensor, H: torch.Tensor, n_samples: int, upper_only: bool = False
) -> tuple[torch.Tensor, int]:
    """Fold the rows of `x` ([..., in]) into the running mean Hessian `H = 2 XᵀX / n` built from `n_samples`
    rows. Returns the updated `H` (modified in place) and the new row count.

    With `upper_only` only the upper triangle of `H` is kept up to date (cheaper); finish with
    `symmetrize_upper`.
    """
    x = x.reshape(-1, x.shape[-1]).to(H.dtype)
    n_new = x.shape[0]
    if n_new == 0:
        return H, n_samples
    total = n_samples + n_new
    H.mul_(n_samples / total)
    if upper_only:  # added block by block: for a wide layer a temporary xᵀx would be hundreds of MB
        gram_upper(x.contiguous(), out=H, alpha=2 / total)
    else:
        H.addmm_(x.t(), x, alpha=2 / total)
    return H, total


def inverse_cholesky(
    H: torch.Tensor,
    damp_percent: float,
    perm: torch.Tensor | None = None,
    fix_dead: bool = False,
    overwrite: bool = False,
) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (of H with rows and columns in the order `perm`, when given), dampening the
    diagonal until H is positive definite; with `fix_dead`, zero diagonal entries (inputs that are always zero)
    count as 1. Everything happens in one matrix of H's size (`core.linalg`): a copy of H, or with `overwrite`
    H's own memory (H is lost; for a wide layer that is hundreds of MB saved, and H's values wait in a
    temporary file in case the dampening must be raised)."""
    if not all_finite(H):
        raise ValueError(
            "the Hessian holds NaN or infinite values: the model's weights or its activations on the calibration data "
            "are not finite (check the model with `hfcompress verify`)"
        )
    n = H.shape[0]
    diagonal = H.diagonal().clone()
    if fix_dead:
        diagonal[diagonal == 0] = 1
    # H = U Uᵀ with U upper triangular is the lower Cholesky factor L of H with rows and columns reversed, reversed
    # back; then H⁻¹ = U⁻ᵀ U⁻¹, so U⁻¹ (= L⁻¹ reversed) is the upper Cholesky factor of H⁻¹: one factorization and
    # one triangular inversion, instead of `cholesky_inverse` (slow on CPU) and a second factorization
    reverse = (torch.arange(n, device=H.device) if perm is None else perm.to(H.device)).flip(0)
    damp = damp_percent * torch.mean(diagonal)
    info = torch.empty((), dtype=torch.int32, device=H.device)
    in_place = overwrite and H.is_contiguous()
    X = permute_symmetric_(H if in_place else H.clone(memory_format=torch.contiguous_format), reverse)
    with SpilledTensor(X) if in_place else contextlib.nullcontext() as backup:
        for _ in range(6):
            X.diagonal().copy_(diagonal[reverse] + damp)
            # LAPACK works on column-major matrices: handed the (symmetric) matrix as its transposed view, it
            # factorizes in place instead of through a hidden copy; X then holds Lᵀ
            L = X.mT
            torch.linalg.cholesky_ex(L, out=(L, info))
            if info == 0:
                invert_lower_(L.tril_())
                return reverse_(transpose_(X))  # L⁻¹, rows and columns reversed
            if in_place:
                backup.load(out=X)
            else:
                permute_symmetric_(X.copy_(H), reverse)
            damp = damp * 10 if damp > 0 else 1e-6 * torch.mean(diagonal).clamp(min=1e-8)
    raise ValueError("the Hessian is not positive definite even after dampening; check the calibration data")


class Hessian:
    """A running H = 2 XᵀX / n over the inputs a layer sees, upper triangle only until `full()`, and each input's
    mean magnitude `abs_mean` (mean |x|, AWQ's activation statistic; exact after `full()`, and summed like H).

    With `diagonal`, only H's diagonal 2 Σ x_j² / n is kept, as a vector (what Wanda and k-means read): for a
    wide layer the matrix is hundreds of MB and its accumulation most of the calibration's time.

    `dtype` is what H is summed in; `full()` returns it in float32 either way. In float32 the running sums' rounding
    depends on the order the samples come in, on which of them share a batch and on how processes split them.
    With float64, H holds the sum of one float32 product xᵀx per sample (x's leading dimension) until `full()`
    makes it the mean: the products do not depend on the batching, their float64 sum is exact (or rounded far
    below float32's precision), and H comes out the same in any order, batching or split (for the same number of
    threads, which changes the float32 products themselves). That costs twice H's memory while it is collected."""

    def __init__(self, in_features: int, device, diagonal: bool = False, dtype: torch.dtype = torch.float32):
        shape = (in_features,) if diagonal else (in_features, in_features)
        self.H = torch.zeros(*shape, device=device, dtype=dtype)
        self.abs_mean = torch.zeros(in_features, device=device, dtype=dtype)  # in float64 a sum, as H, until full()
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1])
        if not rows.shape[0]:
            return
        total = self.count + rows.shape[0]
        if self.H.dtype == torch.float64:
            self._add_to_sum(x.detach())
            self.count = total
            return
        self.abs_mean.mul_(self.count / total).add_(rows.abs().sum(0), alpha=1 / total)
        if self.H.dim() == 1:
            rows = rows.to(self.H.dtype)
            self.H.mul_(self.count / total).add_((rows * rows).sum(0), alpha=2 / total)
            self.count = total
        else:
            self.H, self.count = accumulate_hessian(rows, self.H, self.count, upper_only=True)

    def _add_to_sum(self, x: torch.Tensor) -> None:
        """Add each sample's float32 product (of x's leading dimension, when x has more than two) to the float64
        sum (the upper triangle, or the diagonal), and its float32 sum of |x| to `abs_mean`'s."""
        for sample in x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else (x,):
            sample = sample.reshape(-1, x.shape[-1]).float()
            self.abs_mean.add_(sample.abs().sum(0))
            if self.H.dim() == 1:
                self.H.add_((sample * sample).sum(0))
            else:
                gram_upper(sample.contiguous(), out=self.H)

    def full(self) -> torch.Tensor:
        """The symmetric H (or its diagonal), made in place (no second matrix: for a wide layer H alone is hundreds
        of MB; a float64 sum becomes its float32 copy); across processes, over every rank's inputs
        (`core.distributed`), as `abs_mean` then is."""
        if self.H.dtype == torch.float64:  # sums until now: made the means in one step
            self.abs_mean, _ = reduce_sum(self.abs_mean, self.count)
            self.H, self.count = reduce_sum(self.H, self.count)
            self.abs_mean = self.abs_mean.div_(max(self.count, 1)).float()
            self.H.mul_(2 / max(self.count, 1))
        else:
            self.abs_mean, _ = reduce_mean(self.abs_mean, self.count)
            self.H, self.count = reduce_mean(self.H, self.count)
        if self.H.dim() == 2:
            symmetrize_upper_(self.H)
        self.H = self.H.float()
        return self.H


def hessian_diagonal(H: torch.Tensor) -> torch.Tensor:
    """The diagonal of the Hessian `H`, given as the matrix or (collected with `diagonal`) as the vector itself."""
    return H if H.dim() == 1 else torch.diagonal(H)
