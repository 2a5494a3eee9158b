"""A Hessian collected as its diagonal alone (what Wanda and k-means read)."""

import torch

from hfcompress.core.hessian import Hessian, hessian_diagonal


def test_the_diagonal_collected_alone_is_the_full_hessians_diagonal():
    g = torch.Generator().manual_seed(0)
    full, diagonal = Hessian(16, "cpu"), Hessian(16, "cpu", diagonal=True)
    for rows in (5, 0, 9):
        x = torch.randn(rows, 16, generator=g)
        full.add(x)
        diagonal.add(x)
    d = diagonal.full()
    assert d.shape == (16,) and torch.allclose(d, hessian_diagonal(full.full()), rtol=1e-5)
    assert torch.equal(hessian_diagonal(d), d) and torch.allclose(diagonal.abs_mean, full.abs_mean)
