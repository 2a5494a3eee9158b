"""The low-rank maths on small random matrices: factor shapes, optimality, whitening's error identity,
regularization of singular Gram matrices, the exact low-rank update and rank allocation."""

import pytest
import torch

from hfcompress.lowrank.allocation import ErrorCurve, allocate_ranks, uniform_ranks
from hfcompress.lowrank.svd import (
    decompose,
    lowrank_update,
    matmul64,
    max_saving_rank,
    rank_for_energy,
    rank_for_ratio,
)


def _inputs(n=512, d=24, seed=0):
    """Anisotropic, correlated activations, like a real layer's input."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing.double() + 0.1


# whitening takes the eigenvectors of W H Wᵀ when out <= in, the SVD of W L otherwise: both shapes everywhere
SHAPES = [(16, 24), (24, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
def test_full_rank_factors_reproduce_the_weight(method, shape):
    W = torch.randn(*shape, dtype=torch.float64)
    X = _inputs(d=shape[1])
    rank = min(shape)
    up, down = decompose(W, method, X.T @ X).factors(rank)
    assert up.shape == (shape[0], rank) and down.shape == (rank, shape[1])
    torch.testing.assert_close(up @ down, W)


def test_plain_svd_is_the_best_approximation_of_the_weight():
    W = torch.randn(16, 24, dtype=torch.float64)
    d = decompose(W, "svd")
    for rank in (1, 5, 12):
        up, down = d.factors(rank)
        error = (W - up @ down).square().sum()
        torch.testing.assert_close(error.item(), d.truncation_error(rank))


@pytest.mark.parametrize("shape", SHAPES)
def test_whitening_error_is_the_output_error_and_beats_the_others(shape):
    W = torch.randn(*shape, dtype=torch.float64)
    X = _inputs(d=shape[1])
    gram = X.T @ X
    whitened = decompose(W, "whiten", gram, damp_percent=0.0)
    rank = 6
    output_error = {}
    for method in ("svd", "asvd", "whiten"):
        up, down = decompose(W, method, gram, damp_percent=0.0).factors(rank)
        output_error[method] = ((W - up @ down) @ X.T).square().sum().item()
    # the dropped singular values of W L are exactly the output error on the calibration inputs
    assert output_error["whiten"] == pytest.approx(whitened.truncation_error(rank), rel=1e-8)
    assert output_error["whiten"] < output_error["asvd"] < output_error["svd"]


@pytest.mark.parametrize("shape", SHAPES)
def test_whitening_equals_the_svd_of_the_whitened_weight(shape):
    W = torch.randn(*shape, dtype=torch.float64)
    X = _inputs(d=shape[1])
    gram = X.T @ X
    whitened = decompose(W, "whiten", gram)  # from an eigendecomposition, on the smaller side
    L = torch.linalg.cholesky(gram + 0.01 * gram.diagonal().mean() * torch.eye(shape[1], dtype=gram.dtype))
    U, S, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    torch.testing.assert_close(whitened.S, S)
    for rank in (3, 10):
        up, down = whitened.factors(rank)
        reference = U[:, :rank] @ (S[:rank, None] * Vh[:rank]) @ torch.linalg.inv(L)
        torch.testing.assert_close(up @ down, reference)
        # and the factors are balanced: each component's norm split evenly between them
        torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1))
        # balanced in place, on fresh tensors: the decomposition gives the same factors again
        assert all(torch.equal(a, b) for a, b in zip(whitened.factors(rank), (up, down), strict=True))


@pytest.mark.parametrize("shape", SHAPES)
def test_whitening_keeping_a_few_components_gives_the_same_factors(shape):
    W = torch.randn(*shape, dtype=torch.float64)
    X = _inputs(d=shape[1])
    full = decompose(W, "whiten", X.T @ X)
    few = decompose(W, "whiten", X.T @ X, max_rank=4)
    torch.testing.assert_close(few.S, full.S)  # every singular value, for the error each rank removes
    for rank in (1, 4):
        for a, b in zip(few.factors(rank), full.factors(rank), strict=True):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match=r"must be in \[1, 4\].*keeps 4 components\), got 5"):
        few.factors(5)


@pytest.mark.parametrize("shape", SHAPES)
def test_whitening_reads_a_low_precision_weight_in_float64_without_copying_it(shape):
    """The whitened products are summed from float64 blocks of the weight as held (bfloat16 while streaming)."""
    W = torch.randn(*shape).bfloat16()
    X = _inputs(d=shape[1])
    held = decompose(W, "whiten", X.T @ X)
    exact = decompose(W.double(), "whiten", X.T @ X)
    assert held.weight is not None and held.weight.dtype == torch.bfloat16
    torch.testing.assert_close(held.S, exact.S)
    for a, b in zip(held.factors(5), exact.factors(5), strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_factors_in_a_dtype_are_the_float64_factors_rounded_once(shape, dtype, monkeypatch):
    """A right-whitened `up` is made a few rows at a time straight into `dtype`: the float64 factors rounded."""
    W = torch.randn(*shape).to(dtype)
    X = _inputs(d=shape[1])
    whitened = decompose(W, "whiten", X.T @ X)
    exact = whitened.factors(5)  # in one block of rows
    monkeypatch.setattr("hfcompress.lowrank.svd.rows_per_block", lambda in_features: 7)
    for a, b in zip(whitened.factors(5, dtype), exact, strict=True):
        assert a.dtype == dtype
        assert torch.equal(a, b.to(dtype))


def test_matmul64_sums_float64_blocks_of_the_inner_dimension():
    a, b = torch.randn(5, 11), torch.randn(11, 3).bfloat16()
    torch.testing.assert_close(matmul64(a, b, chunk=4), a.double() @ b.double())


@pytest.mark.parametrize("shape", [(8, 12), (12, 8)])
def test_a_singular_gram_gives_finite_factors(shape, caplog):
    W = torch.randn(*shape, dtype=torch.float64)
    X = _inputs(n=512, d=shape[1])
    X[:, 3] = 0  # a dead channel
    X = X[:5]  # fewer tokens than features: rank-deficient Gram
    with caplog.at_level("INFO", logger="hfcompress.lowrank.svd"):
        up, down = decompose(W, "whiten", X.T @ X, damp_percent=0.0).factors(4)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    if shape[0] > shape[1]:  # only the Cholesky route needs the Gram positive definite: regularized, and said so
        assert "singular" in caplog.text


def test_a_non_finite_gram_is_refused():
    gram = torch.eye(12, dtype=torch.float64)
    gram[2, 2] = float("nan")
    for shape in [(8, 12), (16, 12)]:
        with pytest.raises(ValueError, match="NaN or infinite"):
            decompose(torch.randn(*shape), "whiten", gram)


def test_bad_methods_ranks_and_grams_are_refused():
    W = torch.randn(8, 12)
    with pytest.raises(ValueError, match="`method`"):
        decompose(W, "tucker")
    with pytest.raises(ValueError, match="needs the input Gram"):
        decompose(W, "whiten")
    with pytest.raises(ValueError, match="Gram matrix is"):
        decompose(W, "asvd", torch.eye(8))
    d = decompose(W, "svd")
    for rank in (0, 9):
        with pytest.raises(ValueError, match="`rank` must be in"):
            d.factors(rank)


def test_rank_helpers():
    assert max_saving_rank(384, 384) == 191  # 192 * 768 == 384 * 384: no saving
    assert 191 * 768 < 384 * 384
    assert max_saving_rank(2, 2) == 0
    assert rank_for_ratio(384, 384, 0.5) == 96
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(S, 9 / 14) == 1
    assert rank_for_energy(S, 0.65) == 2
    assert rank_for_energy(S, 1.0) == 3
    with pytest.raises(ValueError, match="`energy`"):
        rank_for_energy(S, 0.0)


def test_lowrank_update_is_exact_at_full_rank_and_optimal_when_truncated():
    g = torch.Generator().manual_seed(3)
    U, V = torch.randn(20, 5, generator=g), torch.randn(5, 30, generator=g)
    B, A = torch.randn(20, 3, generator=g), torch.randn(3, 30, generator=g)
    dense = U @ V + B @ A
    up, down = lowrank_update(U, V, B, A)
    assert up.shape == (20, 8) and down.shape == (8, 30)
    torch.testing.assert_close(up @ down, dense, rtol=1e-5, atol=1e-4)
    up, down = lowrank_update(U, V, B, A, rank=5)
    best = torch.linalg.svdvals(dense.double())
    assert (dense - up @ down).double().square().sum().item() == pytest.approx(best[5:].square().sum().item(), rel=1e-4)
    with pytest.raises(ValueError, match="`rank` must be in"):
        lowrank_update(U, V, B, A, rank=9)


def test_allocation_meets_the_budget_and_favours_cheap_layers():
    g = torch.Generator().manual_seed(0)
    decaying = torch.logspace(0, -3, 32)  # most energy in a few directions: cheap to truncate
    flat = torch.ones(32) + 0.01 * torch.rand(32, generator=g)
    curves = {
        "cheap": ErrorCurve.from_singular_values(decaying, 32, 64),
        "costly": ErrorCurve.from_singular_values(flat, 32, 64),
    }
    budget = 0.6 * 2 * 32 * 64
    ranks = allocate_ranks(curves, budget)
    spent = sum(curves[n].params(r) for n, r in ranks.items())
    assert spent <= budget
    assert spent > budget - (32 + 64)  # the leftover is spent down to less than one rank step
    assert ranks["costly"] is None or ranks["costly"] > ranks["cheap"]
    # a sensitive layer gets more of the budget than the same spectrum in an insensitive one
    curves = {
        "a": ErrorCurve.from_singular_values(flat, 32, 64, weight=10.0),
        "b": ErrorCurve.from_singular_values(flat, 32, 64, weight=1.0),
    }
    ranks = allocate_ranks(curves, 0.5 * 2 * 32 * 64)
    assert ranks["a"] is None or ranks["a"] > ranks["b"]
    with pytest.raises(ValueError, match="below"):
        allocate_ranks(curves, 10)
    assert allocate_ranks(curves, 2 * 32 * 64) == {"a": None, "b": None}


def test_uniform_ranks_skip_layers_that_would_not_shrink():
    assert uniform_ranks({"a": (64, 64), "b": (8, 256)}, 0.5) == {"a": 16, "b": 3}
    assert uniform_ranks({"a": (64, 64)}, 1.0) == {"a": None}
