"""A solved layer's weight made from its codes for each forward, a block of rows at a time (core.deferred): the
same outputs as the weight held, no values held, and GPTQ's codes unchanged by it."""

import pytest
import torch
from helpers import tiny_model, token_windows
from torch import nn
from transformers.pytorch_utils import Conv1D

import hfcompress
from hfcompress.core import rowwise
from hfcompress.core.deferred import defer_weight, restore_weight
from hfcompress.core.structure import linear_weight, set_linear_weight
from hfcompress.quantization import gptq_blocks
from hfcompress.quantization.grid import rtn_quantize


def _layers():
    torch.manual_seed(0)
    linear = nn.Linear(64, 600)
    conv1d = Conv1D(600, 64)  # GPT-2's transposed linear: (out, in) as its arguments, weight stored [in, out]
    nn.init.normal_(conv1d.weight)
    return {"linear": linear, "conv1d": conv1d}


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rows", [0, 256])  # one block; blocks of 256 rows
def test_deferred_weight_gives_the_held_weights_outputs_and_holds_nothing(kind, rows, monkeypatch):
    monkeypatch.setattr(rowwise, "ELEMENTS", rows * 64 or 1 << 22)  # weights a block: 64 a row
    layer = _layers()[kind]
    quantized = rtn_quantize(linear_weight(layer).detach(), bits=3, group_size=8, sym=False)
    x = torch.randn(3, 5, 64)
    set_linear_weight(layer, quantized.dequantize(torch.float32), exact=True)
    held = layer(x)

    made = []

    def make(start, stop):
        made.append((start, stop))
        return quantized.dequantize(torch.float32, start=start, stop=stop)

    defer_weight(layer, make)
    assert layer.weight.is_meta
    assert torch.equal(layer(x), held)
    assert made == ([(0, 256), (256, 512), (512, 600)] if rows else [(0, 600)])
    assert layer.weight.is_meta
    assert tuple(linear_weight(layer).shape) == (600, 64)
    restore_weight(layer)
    set_linear_weight(layer, quantized.dequantize(torch.float32))  # a meta weight is replaced, not copied into
    assert torch.equal(layer(x), held)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("by_rows", [False, True])
def test_gptq_codes_are_those_of_weights_held_in_float32(arch, by_rows, monkeypatch):
    if by_rows:  # solved layers made 64 rows at a time
        monkeypatch.setattr(rowwise, "MIN_ROWS", 64)
        monkeypatch.setattr(rowwise, "ELEMENTS", 64 * 64)
    config = hfcompress.GPTQConfig(bits=4, group_size=16, dataset=token_windows(8, 32))
    deferred = hfcompress.quantize(tiny_model(arch), config).state_dict()

    def hold(module, make_rows):
        set_linear_weight(module, make_rows(0, linear_weight(module).shape[0]), exact=True)

    monkeypatch.setattr(gptq_blocks, "defer_weight", hold)
    held = hfcompress.quantize(tiny_model(arch), config).state_dict()
    assert deferred.keys() == held.keys()
    for name, tensor in deferred.items():
        assert torch.equal(tensor, held[name]), name


def test_a_restored_weight_is_read_again_in_the_dtype_it_was_stored_in():
    """A streamed walk reads a block again after a stream deferred its layers: the reading casts to the parameter's
    dtype (as `load_state_dict` does), which must be the stored bfloat16 again, not the deferred float32."""
    from accelerate.utils import set_module_tensor_to_device

    layer = nn.Linear(64, 32, dtype=torch.bfloat16)
    stored = layer.weight.detach().clone()
    quantized = rtn_quantize(stored.float(), bits=4, group_size=8, sym=False)
    defer_weight(layer, lambda start, stop: quantized.dequantize(torch.float32, start=start, stop=stop))
    assert layer.weight.dtype == torch.float32 and layer.weight.is_meta
    restore_weight(layer)
    assert layer.weight.is_meta and layer.weight.dtype == torch.bfloat16
    set_module_tensor_to_device(layer, "weight", "cpu", value=stored)
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.weight, stored)
    restore_weight(layer)  # not deferred: nothing changes
    assert torch.equal(layer.weight, stored)
