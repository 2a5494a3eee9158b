"""One definition of bits per weight: stored bits of the compressed layers over the dense weights they stand
for (factors, codes, scales, bitmasks; biases excluded), and a whole-model figure beside it."""

import pytest
from helpers import tiny_model

import hfcompress
from hfcompress.evaluation.footprint import bits_per_weight, model_bits_per_parameter
from hfcompress.lowrank import FactorizedLinear
from hfcompress.recipes.budget import Baseline


def _linear_shapes(model):
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.startswith("model.") and hasattr(m, "in_features")}  # fmt: skip


def test_a_factorized_model_counts_its_factors_not_a_dense_32():
    model = hfcompress.factorize(tiny_model(), hfcompress.LowRankConfig(rank=8, method="svd"))
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert layers
    stored = sum(32 * 8 * (m.in_features + m.out_features) for m in layers)
    dense = sum(m.in_features * m.out_features for m in layers)
    assert bits_per_weight(model) == pytest.approx(stored / dense)
    assert bits_per_weight(model) < 32


def test_factorized_then_quantized_counts_the_quantized_factors_once():
    model = hfcompress.factorize(tiny_model(), hfcompress.LowRankConfig(rank=8, method="svd"))
    quantized = hfcompress.quantize(model, hfcompress.RTNConfig(bits=4, group_size=8))
    assert 0 < bits_per_weight(quantized) < bits_per_weight(hfcompress.factorize(tiny_model(), hfcompress.LowRankConfig(rank=8, method="svd"))) / 4  # fmt: skip


def test_the_search_budget_and_the_reports_agree_when_every_linear_is_compressed():
    dense = tiny_model()
    shapes = _linear_shapes(dense)
    baseline = Baseline(sum(o * i for o, i in shapes.values()), shapes, 32, 0, 0)
    quantized = hfcompress.quantize(dense, hfcompress.RTNConfig(bits=4, group_size=32))
    assert baseline.effective_bits(quantized) == pytest.approx(bits_per_weight(quantized))


def test_the_whole_model_figure_counts_everything_once():
    dense = tiny_model()
    assert bits_per_weight(dense) == 32 and model_bits_per_parameter(dense) == 32
    quantized = hfcompress.quantize(tiny_model(), hfcompress.RTNConfig(bits=4, group_size=32))
    # the embeddings, norms and the tied/untied lm_head stay at 32 bits: between the layers' figure and 32
    assert bits_per_weight(quantized) < model_bits_per_parameter(quantized) < 32
