"""Low-rank approximations of a weight matrix: pure tensor functions, no modules, no hooks.

A weight `W` [out, in] becomes `U @ V` with `U` [out, r] and `V` [r, in]. Three ways to choose the factors:

- plain SVD: the best rank-r approximation of `W` itself (Eckart-Young);
- activation-aware (ASVD, Yuan et al. 2023): SVD of `W @ diag(s)` where `s` is the input channels'
  activation scale raised to `alpha`, so channels that carry large activations are kept more accurately;
- whitening (SVD-LLM, Wang et al. 2024): SVD of `W @ L` where `L @ L.T` is the Cholesky factorization of the
  input Gram matrix `X.T @ X`. Then `||(W - W_r) X.T||_F = ||(W - W_r) L||_F`, so the dropped singular values
  are exactly the output error on the calibration inputs and truncation is optimal for that error. The SVD
  of `W @ L` itself is never formed (in float64, with LAPACK's workspace, several GB for an 11008-wide layer):
  its singular values and vectors come from the eigenvectors of the smaller of `W (X.T @ X) W.T` [out, out],
  which needs no `L` at all (the rank-r approximation is `U_r U_r.T W`), and `(W @ L).T (W @ L)` [in, in].
  Those products are summed in float64 from a block of `W`'s columns or rows at a time, so `W` itself is never
  copied to float64 (360 MB for an 11008x4096 layer).

Each method yields a `Decomposition` whose factors for any rank are cheap to read off, so rank allocation
can try many ranks from one SVD.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import scipy.linalg
import torch

from ..core.rowwise import rows_per_block

__all__ = [
    "Decomposition",
    "decompose",
    "lowrank_update",
    "matmul64",
    "max_saving_rank",
    "rank_for_energy",
    "rank_for_ratio",
    "regularized_cholesky",
]

logger = logging.getLogger(__name__)


@dataclass
class Decomposition:
    """`W @ T = U diag(S) Vh` for a right transform `T` (identity, a diagonal scale, or a whitening factor).

    `scale` holds a diagonal `T` as a vector; `whitener` a lower-triangular `T`. At most one is set. A whitening
    taken from an eigendecomposition knows one side only, and keeps `W` in `weight` for the other: without `Vh`
    the rank-r approximation is `U_r U_r.T W`, without `U` it is `W T Vh_r.T Vh_r T⁻¹` (that `weight` is the
    tensor given, in its own dtype, read again when factors are taken).
    """

    U: torch.Tensor | None
    S: torch.Tensor
    Vh: torch.Tensor | None
    scale: torch.Tensor | None = None
    whitener: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        if self.weight is not None:
            return tuple(self.weight.shape)
        return self.U.shape[0], self.Vh.shape[1]

    def factors(self, rank: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """`(up [out, rank], down [rank, in])` with `up @ down` the rank-`rank` approximation of `W`; each
        component's norm split evenly between its two factors (`sqrt(S)` on each side for a plain SVD). Computed
        in float64 and returned in `dtype`; a right-whitened `up` is made a block of rows at a
        time, each rounded into `dtype`, so its float64 copy is never whole (an MLP's gate projection's is 0.21 GB
        at hidden 4096 and rank 2400)."""
        out_features, in_features = self.shape
        kept = self.U.shape[1] if self.U is not None else self.Vh.shape[0]
        if not 0 < rank <= kept:
            raise ValueError(
                f"`rank` must be in [1, {kept}] for this decomposition of a {out_features}x{in_features} weight "
                f"(it keeps {kept} components), got {rank}"
            )
        if self.Vh is None:
            up = self.U[:, :rank]
            up, down = _balanced(up.clone(), matmul64(up.T, self.weight))  # U stays as it was
            return up.to(dtype), down.to(dtype)
        if self.U is None:
            return self._right_whitened_factors(rank, dtype)
        root = self.S[:rank].sqrt()
        up = self.U[:, :rank] * root
        down = root[:, None] * self.Vh[:rank]
        if self.scale is not None:
            down = down / self.scale
        return up.to(dtype), down.to(dtype)

    def _right_whitened_factors(self, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`up = W L V` and `down = V.T L⁻¹` (`V` the leading right singular vectors of `W L`), balanced: `up`'s
        columns have the singular values as norms (`V` are eigenvectors of `(W L).T W L`), so its scaling is known
        before it is made, and it is made and rounded a block of rows at a time."""
        V = self.Vh[:rank].T
        right = self.whitener @ V
        # V.T @ L⁻¹, as the solution of X @ L = V.T
        down = torch.linalg.solve_triangular(self.whitener, V.T, upper=False, left=False)
        ratio = _balancing_ratio(self.S[:rank], torch.linalg.vector_norm(down, dim=1))
        down = down.div_(ratio[:, None]).to(dtype)
        up = torch.empty(self.weight.shape[0], rank, dtype=dtype, device=self.weight.device)
        rows = rows_per_block(self.weight.shape[1])
        for start in range(0, up.shape[0], rows):
            up[start : start + rows] = matmul64(self.weight[start : start + rows], right).mul_(ratio)
        return up, down

    def truncation_error(self, rank: int) -> float:
        """Squared Frobenius norm of what rank `rank` drops, measured in the transformed space (for
        whitening: the squared output error summed over the calibration tokens)."""
        return float(self.S[rank:].square().sum())


def regularized_cholesky(gram: torch.Tensor, damp_percent: float = 0.01, max_tries: int = 8) -> torch.Tensor:
    """Lower Cholesky factor of `gram + damp * mean(diag(gram)) * I`, raising `damp` tenfold until it succeeds.

    A Gram matrix of calibration inputs is often singular (dead channels, fewer tokens than features); the
    damping makes it positive definite at the cost of whitening slightly less. Logged when it had to grow.
    Computed in float64, in one copy of `gram` besides the factor.
    """
    damped = gram.to(torch.float64, copy=True)
    diagonal = damped.diagonal().clone()
    diag_mean = diagonal.mean().clamp_min(1e-12)
    damp = damp_percent
    for attempt in range(max_tries):
        damped.diagonal().copy_(diagonal + damp * diag_mean)
        L, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            if attempt:
                logger.info(
                    "the input Gram matrix is singular; regularized with %.3g x mean(diag) to whiten",
                    damp,
                )
            return L
        damp = max(damp * 10, 1e-6)
    raise ValueError(
        f"the input Gram matrix is not positive definite even with {damp:.3g} x mean(diag) added; "
        "check the calibration data for NaN or infinite activations"
    )


def decompose(
    W: torch.Tensor,
    method: str = "svd",
    gram: torch.Tensor | None = None,
    alpha: float = 0.5,
    damp_percent: float = 0.01,
    max_rank: int | None = None,
) -> Decomposition:
    """SVD of `W` [out, in] after the right transform of `method` ("svd", "asvd" or "whiten").

    `gram` is the input Gram matrix `X.T @ X` [in, in] (any positive multiple works), needed by "asvd" (its
    diagonal gives each channel's mean squared activation) and "whiten". Computed in float64. "whiten" keeps
    `W` itself (not a copy) to take factors from: do not change it in place before they are taken. With
    `max_rank`, "whiten" keeps the singular vectors of that many components only (every singular value still).
    """
    W = W.detach()
    scale = None
    if method == "svd":
        target = W.double()
    elif method in ("asvd", "whiten"):
        if gram is None:
            raise ValueError(f"method {method!r} needs the input Gram matrix of calibration activations")
        if gram.shape != (W.shape[1], W.shape[1]):
            raise ValueError(f"the Gram matrix is {tuple(gram.shape)}, expected {(W.shape[1], W.shape[1])}")
        if method == "asvd":
            # ASVD scales by the channel's mean absolute activation; the root mean square from the Gram
            # diagonal is the same statistic up to the activation distribution's shape, and needs no extra hook.
            rms = gram.double().diagonal().clamp_min(0).sqrt()
            scale = rms.clamp_min(rms.max() * 1e-6 + 1e-12) ** alpha
            target = W.double() * scale
        elif W.shape[0] <= W.shape[1]:
            return _whiten_left(W, gram, damp_percent, max_rank)
        else:
            return _whiten_right(W, gram, damp_percent, max_rank)
    else:
        raise ValueError(f"`method` must be one of 'svd', 'asvd', 'whiten', got {method!r}")
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    return Decomposition(U, S, Vh, scale)


def _whiten_left(
    W: torch.Tensor, gram: torch.Tensor, damp_percent: float, keep: int | None, columns: int = 1024
) -> Decomposition:
    """Whitening by the eigenvectors of `W (gram + damp) W.T` [out, out] (see the module's note): the same
    damping as `regularized_cholesky`'s first try, which it never needs to raise (the product is positive
    semi-definite whatever `gram` is). Summed over blocks of `columns` columns, each read in float64 on its own:
    a float64 copy of an 11008-wide Gram matrix would be 970 MB."""
    in_features = gram.shape[0]
    damp = float(damp_percent * gram.diagonal().double().mean().clamp_min(1e-12))
    product = torch.zeros(W.shape[0], W.shape[0], dtype=torch.float64, device=W.device)
    for start in range(0, in_features, columns):
        right = W[:, start : start + columns].double()
        product.addmm_(matmul64(W, gram[:, start : start + columns], columns), right.T)
        product.addmm_(right, right.T, alpha=damp)  # W (damp I) W.T, a block of columns at a time
    if not torch.isfinite(product).all():
        raise ValueError(
            "the weight or the input Gram matrix holds NaN or infinite values; check the calibration data for NaN "
            "or infinite activations"
        )
    U, S = _descending_eigen(product, keep)
    return Decomposition(U, S, None, weight=W)


def _whiten_right(W: torch.Tensor, gram: torch.Tensor, damp_percent: float, keep: int | None) -> Decomposition:
    """Whitening of a weight with more outputs than inputs (an MLP's gate and up projections) by the eigenvectors
    of `(W L).T (W L)` [in, in], the right singular vectors of `W @ L`: the SVD of the tall `W @ L` would need its
    left factor and LAPACK's workspace, several times the weight's size in float64."""
    L = regularized_cholesky(gram, damp_percent)
    product = L.T @ matmul64(W.T, W) @ L
    V, S = _descending_eigen(product, keep)
    return Decomposition(None, S, V.T, whitener=L, weight=W)


def _descending_eigen(product: torch.Tensor, keep: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors (columns: the `keep` leading ones, or all) of the symmetric positive semi-definite `product`
    and the square roots of all its eigenvalues, largest first: the singular vectors and values of the matrix
    whose Gram matrix it is. Each vector's sign makes its largest entry positive (LAPACK's choice is arbitrary and
    differs between its routines). On the CPU, `keep` vectors of a larger matrix are computed alone (LAPACK's
    `syevr` on a subset, in `product`'s own memory, which is lost): the full `eigh` holds a copy of the matrix,
    all its vectors and a workspace of twice its size (for a 4096-wide product in float64, 540 MB beside it)."""
    n = product.shape[0]
    keep = n if keep is None else max(1, min(keep, n))
    if keep == n or product.device.type != "cpu":
        eigenvalues, vectors = torch.linalg.eigh(product)
        vectors = vectors[:, n - keep :]
    else:
        eigenvalues = torch.linalg.eigvalsh(product)
        # the transposed view of the (symmetric) row-major matrix is the column-major array LAPACK works in
        _, top = scipy.linalg.eigh(
            product.numpy().T, subset_by_index=[n - keep, n - 1], driver="evr", overwrite_a=True, check_finite=False
        )
        vectors = torch.from_numpy(top)
    vectors = vectors.flip(1)
    largest = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))
    vectors *= torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)
    return vectors, eigenvalues.flip(0).clamp_min(0).sqrt()


def matmul64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """`a @ b` in float64 from operands of any float dtype, reading `chunk` of the inner dimension in float64 at a
    time: neither operand is copied whole."""
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], chunk):
        out.addmm_(a[:, start : start + chunk].double(), b[start : start + chunk].double())
    return out


def _balanced(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`up` and `down` rescaled in place per component (column of `up`, row of `down`) so both hold the same norm:
    no second copy of the factors (a down projection's 11008-column `down` in float64 at rank 2400 is 0.21 GB)."""
    ratio = _balancing_ratio(torch.linalg.vector_norm(up, dim=0), torch.linalg.vector_norm(down, dim=1))
    return up.mul_(ratio), down.div_(ratio[:, None])


def _balancing_ratio(up_norm: torch.Tensor, down_norm: torch.Tensor) -> torch.Tensor:
    """Per component, what multiplies `up`'s column and divides `down`'s row so both hold the same norm (1 where
    either is zero)."""
    return torch.where((up_norm > 0) & (down_norm > 0), (down_norm / up_norm).sqrt(), torch.ones_like(up_norm))


def max_saving_rank(out_features: int, in_features: int) -> int:
    """The largest rank whose two factors hold fewer parameters than the dense weight (0 if none)."""
    return (out_features * in_features - 1) // (out_features + in_features)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """The rank whose factors hold at most `ratio` of the dense weight's parameters (at least 1)."""
    return max(1, int(ratio * out_features * in_features // (out_features + in_features)))


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """The smallest rank keeping at least `energy` of the squared singular values."""
    if not 0 < energy <= 1:
        raise ValueError(f"`energy` must be in (0, 1], got {energy}")
    cumulative = S.double().square().cumsum(0)
    kept = cumulative / cumulative[-1].clamp_min(1e-300)
    return int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12).item()) + 1


def lowrank_update(
    U: torch.Tensor,
    V: torch.Tensor,
    B: torch.Tensor,
    A: torch.Tensor,
    rank: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of `U @ V + B @ A` of rank `rank` (default: the exact rank, `U.shape[1] + B.shape[1]`).

    The sum is `[U, B] @ [V; A]`; with `P = [U, B] = Qp Rp` and `[V; A].T = Qq Rq` it equals
    `Qp (Rp Rq.T) Qq.T`, so the SVD of the small `(r + k) x (r + k)` core gives the best approximation of
    each rank without ever forming the dense [out, in] matrix. Scale `B` (LoRA's alpha / r) beforehand.
    """
    P = torch.cat([U, B], dim=1).double()
    Q = torch.cat([V, A], dim=0).double()
    full_rank = P.shape[1]
    rank = full_rank if rank is None else rank
    if not 0 < rank <= full_rank:
        raise ValueError(
            f"`rank` must be in [1, {full_rank}] for a rank-{U.shape[1]} layer plus a rank-{B.shape[1]} update, got {rank}"
        )
    Qp, Rp = torch.linalg.qr(P)
    Qq, Rq = torch.linalg.qr(Q.T)
    Uc, S, Vhc = torch.linalg.svd(Rp @ Rq.T)
    root = S[:rank].sqrt()
    up = (Qp @ Uc[:, :rank]) * root
    down = root[:, None] * (Vhc[:rank] @ Qq.T)
    return up.to(U.dtype), down.to(V.dtype)
