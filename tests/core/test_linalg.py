"""In-place linear algebra (`core.linalg`) and the Hessian factor built on it."""

from __future__ import annotations

import pytest
import torch

from hfcompress.core.hessian import inverse_cholesky
from hfcompress.core.linalg import all_finite, invert_lower_, permute_symmetric_, reverse_, transpose_

# sizes below, at and across the 512-row blocks, odd ones crossing the middle row
SIZES = [1, 7, 512, 1030]


@pytest.mark.parametrize("n", SIZES)
def test_in_place_permutation_transpose_and_reversal_equal_the_copying_ones(n):
    g = torch.Generator().manual_seed(n)
    X = torch.randn(n, n, generator=g)
    order = torch.randperm(n, generator=g)
    assert torch.equal(permute_symmetric_(X.clone(), order), X[order][:, order])
    assert torch.equal(transpose_(X.clone()), X.t())
    assert torch.equal(reverse_(X.clone()), X.flip(0, 1))
    with pytest.raises(ValueError, match="permutation"):
        permute_symmetric_(X.clone(), torch.full((n,), n))


@pytest.mark.parametrize(("n", "block"), [(1, 256), (300, 256), (512, 128), (1030, 256)])
def test_a_lower_triangular_matrix_is_inverted_in_place(n, block):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2 * n, n, generator=g)
    L = torch.linalg.cholesky(x.t() @ x / (2 * n) + 0.1 * torch.eye(n))
    expected = torch.linalg.inv(L.double())
    row_major = L.clone()
    assert invert_lower_(row_major, block).data_ptr() == row_major.data_ptr()
    column_major = L.t().contiguous().mT  # a transposed view, as the Cholesky factor is held
    invert_lower_(column_major, block)
    for got in (row_major, column_major):
        assert torch.equal(got, got.tril())
        assert (got.double() - expected).norm() / expected.norm() < 1e-5


def test_a_factor_that_needs_more_dampening_is_the_same_when_it_takes_the_hessians_memory():
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(0))  # rank 10 of 64: fails undampened
    H = x.t() @ x
    kept = inverse_cholesky(H, damp_percent=0.0)
    owned = H.clone()
    taken = inverse_cholesky(owned, damp_percent=0.0, overwrite=True)  # its values come back from the backup
    assert taken.data_ptr() == owned.data_ptr() and torch.equal(taken, kept)
    assert torch.isfinite(kept).all() and torch.equal(kept, kept.triu())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_value_in_any_chunk(bad):
    X = torch.randn(37, 29)
    assert all_finite(X, elements=100)
    for index in (0, 99, 100, X.numel() - 1):
        Y = X.clone()
        Y.view(-1)[index] = bad
        assert not all_finite(Y, elements=100)
        assert not all_finite(Y.t(), elements=100)  # not contiguous
