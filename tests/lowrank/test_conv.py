"""Tucker-2 and depthwise-separable replacements of Conv2d layers in transformers vision models."""

import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    ConvNextConfig,
    ConvNextForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
)

from hfcompress import ConvDecompositionConfig, decompose_convolutions
from hfcompress.lowrank.conv import SeparableConv2d, Tucker2Conv2d, separable_factors, tucker2_factors


def _resnet():
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=3)
    return ResNetForImageClassification(config).eval()


def _convnext():
    torch.manual_seed(0)
    config = ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=3)
    return ConvNextForImageClassification(config).eval()


def test_tucker2_is_exact_at_full_rank_and_hooi_beats_nothing_worse_than_hosvd():
    W = torch.randn(12, 8, 3, 3, dtype=torch.float64)
    U_in, core, U_out = tucker2_factors(W, 8, 12)
    torch.testing.assert_close(torch.einsum("rskl,or,is->oikl", core, U_out, U_in), W)
    errors = []
    for iterations in (0, 3):
        U_in, core, U_out = tucker2_factors(W, 4, 6, iterations=iterations)
        errors.append((torch.einsum("rskl,or,is->oikl", core, U_out, U_in) - W).square().sum().item())
    assert errors[1] <= errors[0] + 1e-9
    with pytest.raises(ValueError, match="Tucker ranks"):
        tucker2_factors(W, 9, 4)


def test_separable_factors_are_exact_for_a_separable_kernel():
    depthwise, pointwise = torch.randn(8, 1, 3, 3, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    W = pointwise[:, :, None, None] * depthwise[:, 0][None]
    d, p = separable_factors(W)
    torch.testing.assert_close(p[:, :, None, None] * d[:, 0][None], W)


@pytest.mark.parametrize("method", ["tucker2", "separable"])
@pytest.mark.parametrize("build", [_resnet, _convnext])
def test_decomposed_vision_models_shrink_run_and_reload(method, build, tmp_path):
    model = build()
    pixels = torch.randn(2, 3, 32, 32)
    before = sum(p.numel() for p in model.parameters())
    reference = model(pixel_values=pixels).logits
    decompose_convolutions(model, ConvDecompositionConfig(method=method, rank_ratio=0.5))
    kind = Tucker2Conv2d if method == "tucker2" else SeparableConv2d
    replaced = [n for n, m in model.named_modules() if isinstance(m, kind)]
    assert replaced and sum(p.numel() for p in model.parameters()) < before
    logits = model(pixel_values=pixels).logits
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert [n for n, m in reloaded.named_modules() if isinstance(m, kind)] == replaced
    torch.testing.assert_close(reloaded(pixel_values=pixels).logits, logits, rtol=0, atol=0)


def test_full_rank_tucker_keeps_the_outputs():
    model = _resnet()
    pixels = torch.randn(2, 3, 32, 32)
    reference = model(pixel_values=pixels).logits
    conv = model.resnet.encoder.stages[1].layers[0].layer[1].convolution
    layer = Tucker2Conv2d.from_conv(conv, conv.in_channels, conv.out_channels)
    x = torch.randn(1, conv.in_channels, 8, 8)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-4)
    assert model(pixel_values=pixels).logits.shape == reference.shape


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="`rank_ratio`"):
        ConvDecompositionConfig(rank_ratio=0)
    with pytest.raises(ValueError, match="`method`"):
        ConvDecompositionConfig(method="cp")
    with pytest.raises(ValueError, match="gets smaller"):
        decompose_convolutions(_resnet(), ConvDecompositionConfig(rank_ratio=1.0))
