"""A solved layer's weight made from its codes for each forward (core.deferred): the same outputs as the weight
held, no values held between forwards, and GPTQ's codes unchanged by it."""

import pytest
import torch
from helpers import tiny_model, token_windows
from torch import nn
from transformers.pytorch_utils import Conv1D

import hfcompress
from hfcompress.core.deferred import defer_weight, restore_weight
from hfcompress.core.structure import linear_weight, set_linear_weight
from hfcompress.quantization import gptq_blocks
from hfcompress.quantization.grid import rtn_quantize


def _layers():
    torch.manual_seed(0)
    linear = nn.Linear(24, 16)
    conv1d = Conv1D(16, 24)  # GPT-2's transposed linear: (out, in) as its arguments, weight stored [in, out]
    nn.init.normal_(conv1d.weight)
    return {"linear": linear, "conv1d": conv1d}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_deferred_weight_gives_the_held_weights_outputs_and_holds_nothing_between_forwards(kind):
    layer = _layers()[kind]
    quantized = rtn_quantize(linear_weight(layer).detach(), bits=3, group_size=8, sym=False)
    x = torch.randn(5, 24)
    set_linear_weight(layer, quantized.dequantize(torch.float32), exact=True)
    held = layer(x)

    made = []
    defer_weight(layer, lambda: made.append(1) or quantized.dequantize(torch.float32))
    assert layer.weight.is_meta
    assert torch.equal(layer(x), held)
    assert torch.equal(layer(x), held)
    assert len(made) == 2  # made for each forward
    assert layer.weight.is_meta  # and dropped after it
    assert tuple(linear_weight(layer).shape) == (16, 24)


def test_a_failing_forward_still_drops_the_weight_and_restore_removes_the_hooks():
    layer = _layers()["linear"]
    defer_weight(layer, lambda: torch.ones(16, 24))
    with pytest.raises(RuntimeError):
        layer(torch.randn(5, 23))  # wrong width
    assert layer.weight.is_meta
    restore_weight(layer)
    set_linear_weight(layer, torch.zeros(16, 24))  # a meta weight is replaced, not copied into
    assert torch.equal(layer(torch.ones(2, 24)), layer.bias.expand(2, 16))
    assert not layer._forward_pre_hooks and not layer._forward_hooks


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gptq_codes_are_those_of_weights_held_in_float32(arch, monkeypatch):
    config = hfcompress.GPTQConfig(bits=4, group_size=16, dataset=token_windows(8, 32))
    deferred = hfcompress.quantize(tiny_model(arch), config).state_dict()

    def hold(module, make):
        set_linear_weight(module, make(), exact=True)

    monkeypatch.setattr(gptq_blocks, "defer_weight", hold)
    held = hfcompress.quantize(tiny_model(arch), config).state_dict()
    assert deferred.keys() == held.keys()
    for name, tensor in deferred.items():
        assert torch.equal(tensor, held[name]), name
