"""Float32 maths on low-precision weights (`core.precision`): a bfloat16 model computes exactly what the same
weights upcast to float32 compute, and GPTQ on it writes the codes of the float32 run."""

from __future__ import annotations

import pytest
import torch

from hfcompress.core import rowwise
from hfcompress.core.precision import float32_maths, maths_for, matmuls_must_be_exact, stores_low_precision
from hfcompress.quantization import GPTQConfig, quantize
from tests.helpers import tiny_model, token_windows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_compute_as_float32(arch, dtype):
    model = tiny_model(arch).to(dtype)
    upcast = tiny_model(arch).to(dtype).float()
    ids = token_windows(2, 16)
    with torch.no_grad():
        expected = upcast(ids).logits
        with float32_maths():
            logits = model(ids).logits
        plain = model(ids).logits
    assert logits.dtype == torch.float32 and torch.equal(logits, expected)
    assert plain.dtype == dtype  # outside the mode nothing changes
    assert next(model.parameters()).dtype == dtype  # and the weights were not converted


def test_results_written_into_out_are_kept():
    a, b = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(4, 5, dtype=torch.bfloat16)
    out = torch.empty(3, 5, dtype=torch.bfloat16)
    with float32_maths():
        torch.matmul(a, b, out=out)
    assert torch.equal(out, torch.matmul(a, b))


def test_maths_for_only_upcasts_for_low_precision_models_and_always_asks_for_exact_matmuls():
    model = tiny_model("llama")
    assert not stores_low_precision(model)
    a, b = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(4, 5, dtype=torch.bfloat16)
    with maths_for(model):
        assert torch.matmul(a, b).dtype == torch.bfloat16 and matmuls_must_be_exact()
    with maths_for(model.to(torch.bfloat16)):
        assert torch.matmul(a, b).dtype == torch.float32 and matmuls_must_be_exact()
    assert not matmuls_must_be_exact()


def test_an_input_gradient_through_large_bfloat16_weights_keeps_no_float32_copy_of_them(monkeypatch):
    """A backward pass to the input through frozen bfloat16 weights (the streamed Fisher pass) gives the gradient
    of the float32 weights, and autograd holds the weight as stored instead of its upcast blocks of rows."""
    monkeypatch.setattr(rowwise, "MIN_ROWS", 64)
    monkeypatch.setattr(rowwise, "ELEMENTS", 64 * 64)
    weight = torch.randn(300, 64).to(torch.bfloat16)
    x = torch.randn(5, 64, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.dtype)
        return tensor

    with float32_maths(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = torch.nn.functional.linear(x, weight)
    y.square().sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.linear(reference, weight.float())
    expected.square().sum().backward()
    assert torch.allclose(y, expected, atol=1e-5) and torch.allclose(x.grad, reference.grad, rtol=1e-4, atol=1e-4)
    assert saved == [torch.bfloat16]  # the weight as stored, nothing in float32

    trained = weight.float().requires_grad_(True)  # a weight that takes a gradient keeps autograd's own way
    with float32_maths():
        torch.nn.functional.linear(x, trained.to(torch.bfloat16)).sum().backward()
    assert trained.grad is not None


@pytest.mark.parametrize("by_rows", [False, True])
def test_gptq_on_a_bfloat16_model_gives_the_float32_codes(by_rows, monkeypatch):
    if by_rows:  # weights upcast (and solved layers made from their codes) 64 rows at a time, as 4096-wide layers are
        monkeypatch.setattr(rowwise, "MIN_ROWS", 64)
        monkeypatch.setattr(rowwise, "ELEMENTS", 64 * 64)
    config = GPTQConfig(bits=4, group_size=32, dataset=token_windows(8, 32))
    reference = quantize(tiny_model("llama").to(torch.bfloat16).float(), config)
    low = quantize(tiny_model("llama").to(torch.bfloat16), config)
    expected, got = reference.state_dict(), low.state_dict()
    for name, tensor in expected.items():
        if name.endswith(("qweight", "qzeros", "scales", "g_idx")):
            assert torch.equal(got[name], tensor), name


def test_a_bfloat16_checkpoint_is_held_in_bfloat16_and_quantized_as_in_float32(tmp_path):
    from safetensors.torch import load_file

    from hfcompress.steps import OutputOptions, compress_folder

    folder = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder)
    config = GPTQConfig(bits=4, group_size=32, dataset=token_windows(8, 32))
    held = compress_folder(folder, tmp_path / "auto", config)  # default: --dtype auto
    wide = compress_folder(folder, tmp_path / "float32", config, OutputOptions(dtype="float32"))
    a, b = load_file(held / "model.safetensors"), load_file(wide / "model.safetensors")
    assert a.keys() == b.keys()
    for key, tensor in b.items():
        assert a[key].dtype == tensor.dtype and torch.equal(a[key], tensor), key


def test_perplexity_of_a_bfloat16_model_is_that_of_its_weights_in_float32():
    from hfcompress.evaluation.perplexity import perplexity

    windows = token_windows(4, 32)
    held = perplexity(tiny_model("llama").to(torch.bfloat16), windows)
    assert held == perplexity(tiny_model("llama").to(torch.bfloat16).float(), windows)
