"""A linear computed a block of weight rows at a time (`core.rowwise`): the one-matmul output, bit for bit, and
only a block of the weight made at once; float32 maths on a large low-precision linear goes through it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from hfcompress.core import precision, rowwise
from hfcompress.core.precision import float32_maths
from hfcompress.core.rowwise import conv1d_by_rows, linear_by_rows, rows_per_block


def test_rows_per_block_holds_the_elements_asked_for_but_never_fewer_than_min_rows():
    assert rows_per_block(4096) == (1 << 22) // 4096
    assert rows_per_block(4096, elements=1 << 20) == rowwise.MIN_ROWS
    assert rows_per_block(64, elements=64 * 1000) == 1000


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 40])
def test_linear_by_rows_is_the_one_matmul_output(bias, tokens):
    torch.manual_seed(0)
    x, weight = torch.randn(2, tokens, 384), torch.randn(1100, 384)
    b = torch.randn(1100) if bias else None
    asked = []

    def rows(start, stop):
        asked.append((start, stop))
        return weight[start:stop]

    out = linear_by_rows(x, rows, 1100, b, rows=256)
    assert torch.equal(out, F.linear(x, weight, b))
    assert asked == [(0, 256), (256, 512), (512, 768), (768, 1024), (1024, 1100)]


def test_conv1d_by_rows_is_what_conv1d_computes():
    torch.manual_seed(0)
    layer = Conv1D(700, 96)  # weight stored [in, out]
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(3, 20, 96)
    out = conv1d_by_rows(x, lambda start, stop: layer.weight.t()[start:stop], 700, layer.bias, rows=256)
    assert torch.equal(out, layer(x))


def test_float32_maths_upcasts_a_large_linear_a_block_at_a_time(monkeypatch):
    monkeypatch.setattr(rowwise, "ELEMENTS", 256 * 128)  # 256 rows of 128 inputs a block
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 1000).to(torch.bfloat16)
    x = torch.randn(4, 128)
    expected = F.linear(x, linear.weight.float(), linear.bias.float())
    upcasts = []

    def counted(input, weight_rows, *args):
        def rows(start, stop):
            upcasts.append(stop - start)
            return weight_rows(start, stop)

        return linear_by_rows(input, rows, *args)

    monkeypatch.setattr(precision, "linear_by_rows", counted)
    with float32_maths(), torch.no_grad():
        out = linear(x)
    # the same float32 products; a matmul over 256 rows may add them in another order than one over 1000 (it does
    # with some CPUs' BLAS kernels), hence a tolerance of float32 rounding
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert upcasts == [256, 256, 256, 232]  # never the whole weight in float32
