"""`hessian_dtype` on every technique that solves layers with their input Hessians: summed in float64, the
Hessians, and so the compressed model, do not depend on the order and batching of the calibration samples."""

import pytest
import torch
from helpers import tiny_model, token_windows

import hfcompress

CONFIGS = {
    "sparsegpt": lambda **data: hfcompress.OneShotPruningConfig(method="sparsegpt", sparsity=0.5, **data),
    "whiten": lambda **data: hfcompress.LowRankConfig(method="whiten", rank=8, **data),
    # AWQ reads H and each input's mean |x| (both summed in hessian_dtype); with GPTQ weights GPTQ's Hessians too
    "awq": lambda **data: hfcompress.AWQConfig(bits=4, group_size=32, **data),
    "awq-gptq": lambda **data: hfcompress.AWQConfig(bits=4, group_size=32, weights="gptq", **data),
    "w8a8-gptq": lambda **data: hfcompress.W8A8Config(weights="gptq", **data),
}


@pytest.mark.parametrize("technique", list(CONFIGS))
def test_float64_hessians_give_the_same_model_for_reordered_and_rebatched_samples(technique):
    ids = token_windows(8, 32)
    shuffled = ids[torch.randperm(8, generator=torch.Generator().manual_seed(0))]

    def state(windows, batch_size, hessian_dtype):
        config = CONFIGS[technique](dataset=windows, batch_size=batch_size, hessian_dtype=hessian_dtype)
        return hfcompress.compress(tiny_model("llama"), config).state_dict()

    for hessian_dtype in ("float64", "float32"):
        in_order, reordered = state(ids, 4, hessian_dtype), state(shuffled, 3, hessian_dtype)
        assert in_order.keys() == reordered.keys()
        same = [torch.equal(in_order[k], reordered[k]) for k in in_order]
        if hessian_dtype == "float64":
            assert all(same), technique
        elif technique != "w8a8-gptq":  # the control: float32 sums round differently in another order, and the
            # solve carries it into the weights (whether a rounding flips one of W8A8's 8-bit codes depends on the
            # CPU: they came out equal on an Intel Xeon, unequal on an AMD EPYC)
            assert not all(same), technique


@pytest.mark.parametrize(
    "config",
    [
        hfcompress.OneShotPruningConfig,
        hfcompress.LowRankConfig,
        hfcompress.KMeansConfig,
        hfcompress.VQConfig,
        hfcompress.AWQConfig,
        hfcompress.W8A8Config,
    ],
)
def test_a_hessian_dtype_other_than_float32_or_float64_is_refused(config):
    extra = {"rank": 8} if config is hfcompress.LowRankConfig else {}
    extra |= {"dataset": "calib.txt"} if config in (hfcompress.AWQConfig, hfcompress.W8A8Config) else {}
    with pytest.raises(ValueError, match=r"`hessian_dtype` must be one of 'float32', 'float64', got 'bfloat16'"):
        config(hessian_dtype="bfloat16", **extra)
