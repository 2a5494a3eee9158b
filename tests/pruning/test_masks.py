"""The pure functions of pruning: schedule, block masks, N:M, bitmask packing; configs."""

import logging

import pytest
import torch

from hfcompress.pruning import MagnitudePruningConfig, MovementPruningConfig, cubic_sparsity, pruning_config_from_dict
from hfcompress.pruning.masks import block_reduce, expand_blocks, global_threshold, n_m_mask, topk_mask
from hfcompress.pruning.sparse import pack_bitmask, unpack_bitmask


def test_cubic_schedule_holds_warmup_and_cooldown_and_is_cubic():
    args = dict(total_steps=100, final_sparsity=0.9, initial_sparsity=0.0, warmup_steps=10, cooldown_steps=20)
    assert cubic_sparsity(0, **args) == 0.0
    assert cubic_sparsity(9, **args) == 0.0
    assert cubic_sparsity(80, **args) == pytest.approx(0.9)
    assert cubic_sparsity(99, **args) == pytest.approx(0.9)
    # halfway through the ramp, 1 - (1/2)^3 of the way
    assert cubic_sparsity(45, **args) == pytest.approx(0.9 * (1 - 0.5**3))
    values = [cubic_sparsity(t, **args) for t in range(100)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="more steps than warm-up"):
        cubic_sparsity(0, total_steps=30, final_sparsity=0.5, warmup_steps=10, cooldown_steps=20)


def test_topk_and_global_threshold_keep_exactly_what_they_should():
    scores = torch.randn(16, 8)
    mask = topk_mask(scores, 0.75)
    assert int(mask.sum()) == 32
    assert scores[mask].min() >= scores[~mask].max()
    a, b = torch.randn(10, 10), torch.randn(5, 4) + 10  # b scores higher: the global ranking keeps it
    threshold = global_threshold([a, b], 0.8)
    assert int((a >= threshold).sum() + (b >= threshold).sum()) == 24
    assert int((b >= threshold).sum()) == 20


def test_blocks_reduce_and_expand():
    w = torch.arange(32.0).reshape(4, 8)
    grid = block_reduce(w, (2, 4), "sum")
    assert grid.shape == (2, 2)
    assert grid[0, 0] == w[:2, :4].sum()
    assert torch.equal(
        expand_blocks(torch.tensor([[1, 0], [0, 1]]), (2, 4))[:, :4], torch.tensor([[1] * 4] * 2 + [[0] * 4] * 2)
    )
    with pytest.raises(ValueError, match="does not divide a 4x8"):
        block_reduce(w, (3, 4))


def test_n_m_mask_keeps_n_of_every_m():
    scores = torch.randn(6, 16)
    mask = n_m_mask(scores, 2, 4)
    assert torch.all(mask.reshape(6, 4, 4).sum(-1) == 2)
    kept_min = scores.reshape(6, 4, 4).masked_fill(~mask.reshape(6, 4, 4), float("inf")).amin(-1)
    dropped_max = scores.reshape(6, 4, 4).masked_fill(mask.reshape(6, 4, 4), float("-inf")).amax(-1)
    assert torch.all(kept_min >= dropped_max)
    with pytest.raises(ValueError, match="divisible by 4"):
        n_m_mask(torch.randn(2, 6), 2, 4)


@pytest.mark.parametrize("cols", [8, 13, 64])
def test_bitmask_round_trip(cols):
    mask = torch.rand(5, cols) > 0.6
    packed = pack_bitmask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-cols // 8))
    assert torch.equal(unpack_bitmask(packed, cols), mask)


def test_configs_round_trip_and_validate(caplog):
    movement = MovementPruningConfig(method="sigmoid", final_sparsity=0.97, warmup_steps=5, granularity="32x32")
    assert pruning_config_from_dict(movement.to_dict()) == movement
    assert movement.effective_ranking == "global" and MovementPruningConfig().effective_ranking == "local"
    magnitude = MagnitudePruningConfig(final_sparsity=0.5, granularity="row", target_modules=["query", "re:.*value"])
    assert MagnitudePruningConfig.from_dict(magnitude.to_dict()) == magnitude
    assert magnitude.block_shape((6, 10)) == (1, 10)
    with caplog.at_level(logging.WARNING):
        assert pruning_config_from_dict({**magnitude.to_dict(), "from_the_future": 1}) == magnitude
    assert "from_the_future" in caplog.text
    for bad, message in [
        (dict(final_sparsity=1.0), "`final_sparsity` must be in \\[0, 1\\), got 1.0"),
        (dict(final_sparsity=-0.1), "`final_sparsity`"),
        (dict(initial_sparsity=0.6, final_sparsity=0.5), "must not exceed"),
        (dict(granularity="3by3"), "`granularity` must be"),
        (dict(method="random"), "`method` must be 'topk', 'threshold' or 'sigmoid', got 'random'"),
        (dict(ranking="both"), "`ranking`"),
        (dict(target_modules="query"), "list of strings"),
    ]:
        with pytest.raises(ValueError, match=message):
            MovementPruningConfig(**bad)
    with pytest.raises(ValueError, match="pruning_method"):
        pruning_config_from_dict({"pruning_method": "random"})
