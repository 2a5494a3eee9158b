import pytest
import torch

from hfcompress.core.hessian import inverse_cholesky
from hfcompress.quantization.gptq import accumulate_hessian, gptq_quantize, gram_upper, symmetrize_upper
from hfcompress.quantization.grid import grid_params, rtn_quantize


def correlated_inputs(n=2048, features=64, seed=0):
    """Inputs whose features are strongly correlated, as activations are."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(features, features, generator=g)
    mixing = torch.randn(features // 4, features, generator=g)
    latent = torch.randn(n, features // 4, generator=g)
    return latent @ mixing + 0.05 * torch.randn(n, features, generator=g) @ basis


def output_error(layer_weight, dequantized, x):
    return ((x @ layer_weight.t() - x @ dequantized.t()) ** 2).mean().item()


def hessian(x):
    H = torch.zeros(x.shape[1], x.shape[1])
    H, _ = accumulate_hessian(x, H, 0)
    return H


def test_hessian_accumulation_is_the_running_mean():
    x = torch.randn(300, 16)
    H = torch.zeros(16, 16)
    n = 0
    for chunk in x.split(64):
        H, n = accumulate_hessian(chunk, H, n)
    assert n == 300
    assert torch.allclose(H, 2 * x.t() @ x / 300, atol=1e-5)


def test_the_running_hessian_also_holds_each_inputs_mean_magnitude():
    from hfcompress.core.hessian import Hessian

    batches = [torch.randn(2, 5, 12), torch.randn(7, 12) * 3, torch.randn(0, 12)]
    running = Hessian(12, "cpu")
    for x in batches:
        running.add(x)
    H = running.full()
    rows = torch.cat([x.reshape(-1, 12) for x in batches])
    torch.testing.assert_close(running.abs_mean, rows.abs().mean(0))
    torch.testing.assert_close(H, 2 * rows.t() @ rows / rows.shape[0])


@pytest.mark.parametrize("n", [100, 384, 600])
def test_gram_upper_matches_full_product(n):
    x = torch.randn(50, n)
    assert torch.allclose(symmetrize_upper(gram_upper(x, block=128)), x.t() @ x, atol=1e-4)
    H_upper, _ = accumulate_hessian(x, torch.zeros(n, n), 0, upper_only=True)
    assert torch.allclose(symmetrize_upper(H_upper), hessian(x), atol=1e-4)
    # accumulated into a matrix in place, in several batches
    H, count = torch.zeros(n, n), 0
    for chunk in x.split(17):
        H, count = accumulate_hessian(chunk, H, count, upper_only=True)
    assert torch.allclose(symmetrize_upper(H), hessian(x), atol=1e-4)


@pytest.mark.parametrize(
    "bits,group_size,sym,act_order,static_groups",
    [
        (4, 32, False, False, False),
        (4, -1, False, False, False),
        (3, 32, True, False, False),
        (2, 16, False, False, False),
        (8, -1, True, False, False),
        (4, 32, False, True, False),
        (4, 32, True, True, True),
        (3, -1, False, True, False),
    ],
)
def test_gptq_output_error_is_below_rtn(bits, group_size, sym, act_order, static_groups):
    torch.manual_seed(0)
    x = correlated_inputs()
    layer = torch.nn.Linear(64, 24, bias=False)
    W = layer.weight.detach()
    q, loss = gptq_quantize(W, hessian(x), bits, group_size, sym, act_order, static_groups)
    rtn = rtn_quantize(W, bits, group_size, sym)
    gptq_err, rtn_err = output_error(W, q.dequantize(), x), output_error(W, rtn.dequantize(), x)
    assert gptq_err < rtn_err
    assert loss >= 0
    assert q.codes.shape == W.shape and q.codes.max() <= 2**bits - 1


def test_act_order_records_the_group_of_each_column():
    torch.manual_seed(0)
    x = correlated_inputs(features=64) * torch.linspace(0.1, 3, 64)  # make the diagonal order non-trivial
    W = torch.randn(8, 64)
    q, _ = gptq_quantize(W, hessian(x), 4, 16, False, act_order=True)
    # each group has exactly group_size columns, but they are not the consecutive ones
    assert torch.equal(torch.bincount(q.g_idx.long()), torch.full((4,), 16))
    assert not torch.equal(q.g_idx, torch.arange(64, dtype=torch.int32) // 16)
    static, _ = gptq_quantize(W, hessian(x), 4, 16, False, act_order=True, static_groups=True)
    assert torch.equal(static.g_idx, torch.arange(64, dtype=torch.int32) // 16)


def test_dead_columns_are_zero_and_do_not_break_the_inverse():
    x = correlated_inputs()
    x[:, 5] = 0  # a feature that never fires
    W = torch.randn(8, 64)
    q, _ = gptq_quantize(W, hessian(x), 4, 32, False)
    assert torch.isfinite(q.dequantize()).all()
    assert torch.allclose(q.dequantize()[:, 5], torch.zeros(8), atol=1e-6)


def test_singular_hessian_is_dampened():
    x = torch.randn(10, 64)  # rank 10 < 64
    W = torch.randn(8, 64)
    q, _ = gptq_quantize(W, hessian(x), 4, 32, False, damp_percent=0.0)
    assert torch.isfinite(q.dequantize()).all()


def test_inverse_cholesky_is_the_upper_factor_of_the_inverse():
    x = correlated_inputs(features=96)
    H = hessian(x)
    U = inverse_cholesky(H, damp_percent=0.01)
    damped = H.double() + 0.01 * H.diag().mean().double() * torch.eye(96, dtype=torch.float64)
    assert torch.equal(U, torch.triu(U)) and bool((U.diag() > 0).all())
    expected = torch.linalg.inv(damped)
    assert torch.allclose((U.t() @ U).double(), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("features", [96, 1025])  # an odd size crosses the in-place reversal's middle row
def test_inverse_cholesky_can_take_the_hessians_memory(features):
    H = hessian(correlated_inputs(features=features))
    perm = torch.randperm(features, generator=torch.Generator().manual_seed(0))
    kept = inverse_cholesky(H, 0.01, perm=perm)
    owned = H.clone()
    taken = inverse_cholesky(owned, 0.01, perm=perm, overwrite=True)
    assert taken.data_ptr() == owned.data_ptr() and torch.equal(taken, kept)
    assert torch.equal(H, hessian(correlated_inputs(features=features)))  # without `overwrite`, H is untouched


def reference_gptq_codes(W, H, bits, group_size, block_size):
    """GPTQ one column at a time: each column's error spread over every later column at once. A group's range is
    read from its columns as updated so far, except that columns past the current block of `block_size` are read
    as they were when the block began (what lazy-batch GPTQ, the reference implementation, reads)."""
    W = W.double().clone()
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H.double()), upper=True)
    codes = torch.zeros_like(W)
    for col in range(W.shape[1]):
        if col % block_size == 0:
            at_block_start = W.clone()
            block_end = col + block_size
        if col % group_size == 0:
            group = torch.cat([W[:, col:block_end], at_block_start[:, block_end:]], dim=1)[:, :group_size]
            lo, hi = group.min(dim=1).values.clamp(max=0), group.max(dim=1).values.clamp(min=0)
            scale = (hi - lo) / (2**bits - 1)
            zero = torch.round(-lo / scale)
        codes[:, col] = torch.clamp(torch.round(W[:, col] / scale) + zero, 0, 2**bits - 1)
        err = (W[:, col] - (codes[:, col] - zero) * scale) / Hinv[col, col]
        W[:, col + 1 :] -= err[:, None] * Hinv[col, col + 1 :][None, :]
    return codes


@pytest.mark.parametrize("group_size", [24, 48, 64, 192])
def test_segmented_updates_match_plain_gptq(group_size):
    # blocks of 64 columns, segments of 16, groups that cross both: the same codes as one column at a time
    x = correlated_inputs(features=192)
    H = hessian(x)
    H = H + 0.01 * H.diag().mean() * torch.eye(192)  # dampened here, so both sides invert the same matrix
    W = torch.randn(48, 192, generator=torch.Generator().manual_seed(3))
    quantized, _ = gptq_quantize(W, H, bits=3, group_size=group_size, damp_percent=0.0, block_size=64)
    expected = reference_gptq_codes(W, H, bits=3, group_size=group_size, block_size=64)
    assert (quantized.codes.double() != expected).float().mean() < 0.002


@pytest.mark.parametrize("rows, group_size", [(384, 32), (257, -1)])
def test_solving_shares_of_the_rows_gives_the_codes_of_the_whole(rows, group_size):
    """What lets processes split a GPTQ solve by rows (`core.distributed.row_shares`) without changing a code."""
    x = correlated_inputs(features=128)
    H, W = hessian(x), torch.randn(rows, 128, generator=torch.Generator().manual_seed(1))
    whole, _ = gptq_quantize(W, H, 4, group_size, False, act_order=True, static_groups=True)
    half = -(-rows // 2)
    parts = [gptq_quantize(W[s], H, 4, group_size, False, act_order=True, static_groups=True)[0]
             for s in (slice(0, half), slice(half, rows))]  # fmt: skip
    assert torch.equal(torch.cat([p.codes for p in parts]), whole.codes)
    assert torch.equal(torch.cat([p.scales for p in parts]), whole.scales)
    assert torch.equal(torch.cat([p.zeros for p in parts]), whole.zeros)


@pytest.mark.parametrize(
    "act_order, static_groups, masked", [(False, False, False), (True, True, True), (True, False, False)]
)
def test_a_wide_weight_is_solved_a_block_of_rows_at_a_time_with_the_same_codes(
    act_order, static_groups, masked, monkeypatch
):
    from hfcompress.quantization import gptq

    x = correlated_inputs(features=128)
    H, W = hessian(x), torch.randn(600, 128, generator=torch.Generator().manual_seed(2))
    mask = (torch.rand(600, 128, generator=torch.Generator().manual_seed(4)) > 0.3) if masked else None
    args = dict(act_order=act_order, static_groups=static_groups, mask=mask)
    whole, whole_loss = gptq_quantize(W, H, 4, 32, False, **args)
    passes = []
    real = gptq._solve_rows
    monkeypatch.setattr(
        gptq, "_solve_rows", lambda weight, *a, **k: passes.append(len(weight)) or real(weight, *a, **k)
    )
    monkeypatch.setattr(gptq, "PASS_ELEMENTS", 256 * 128)
    blocked, blocked_loss = gptq_quantize(W, H, 4, 32, False, **args)
    assert passes == [256, 256, 88]
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(blocked, field), getattr(whole, field)), field
    assert blocked_loss == pytest.approx(whole_loss, rel=1e-5)


@pytest.mark.parametrize("static_groups", [True, False])
def test_hessian_clip_search_weighs_each_column_by_its_cost(static_groups):
    """With a diagonal Hessian no error is spread, so GPTQ's codes are round-to-nearest on ranges searched with
    each column's cost H_jj as its weight; the group's columns, and their weights, follow the visiting order
    unless the groups are static."""
    torch.manual_seed(0)
    weight = torch.randn(6, 32)
    weight[:, 3] *= 8  # outliers worth keeping in range only where their column costs much
    diagonal = torch.rand(32) + 0.05
    diagonal[3] = 50.0
    quantized, _ = gptq_quantize(
        weight, torch.diag(diagonal), bits=3, group_size=8, act_order=True, static_groups=static_groups,
        damp_percent=0.0, clip_search=True,
    )  # fmt: skip
    order = torch.arange(32) if static_groups else torch.argsort(diagonal, descending=True)
    for g, columns in enumerate(order.split(8)):
        scale, zero = grid_params(weight[:, columns], 3, sym=False, clip_search=True, column_weights=diagonal[columns])
        assert torch.allclose(quantized.scales[:, g], scale) and torch.equal(quantized.zeros[:, g], zero)


def test_unknown_clip_objective_is_refused():
    with pytest.raises(ValueError, match=r"clip_objective.*'mse'"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), bits=4, group_size=-1, clip_search=True, clip_objective="mse")
