"""Dense linears kept whole by a compressed model decode through hfcompress's loop and compute what nn.Linear does."""

import copy

import pytest
import torch
from helpers import tiny_model

import hfcompress
from hfcompress.core.structure import is_plain_linear
from hfcompress.quantization.cpu_extension import load, unavailable_reason
from hfcompress.quantization.decode_linear import DENSE_MAX_ROWS, DecodeLinear, use_decode_loop


@pytest.fixture
def loop():
    """The compiled module; skips where the CPU kernels do not build."""
    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    return load()


@pytest.fixture
def calls(loop, monkeypatch):
    """Counts the dense loop's calls."""
    counted = []
    original = loop.dense_matmul

    def counting(x, weight, avx512):
        counted.append((tuple(x.shape), avx512))
        return original(x, weight, avx512)

    monkeypatch.setattr(loop, "dense_matmul", counting)
    return counted


def isas(loop):
    return [True, False] if loop.has_avx512() else [False]


@pytest.mark.parametrize("out_features,in_features", [(40, 64), (33, 1000), (64, 13), (17, 4100)])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 12])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_loop_matches_torch(loop, out_features, in_features, rows, dtype):
    torch.manual_seed(rows)
    weight, x = torch.randn(out_features, in_features).to(dtype), torch.randn(rows, in_features)
    expected = x.double() @ weight.double().T  # bfloat16 weights widen exactly: the same float32 products
    for avx512 in isas(loop):
        y = loop.dense_matmul(x, weight, avx512)
        assert y.shape == (rows, out_features) and y.dtype == torch.float32
        # float32 sums of `in_features` products: a few units in the last place of the largest terms
        assert (y.double() - expected).abs().max() <= 2e-6 * in_features**0.5 * expected.abs().max()


def test_dense_loop_refuses_bad_tensors(loop):
    with pytest.raises(RuntimeError, match="weight must be contiguous float32"):
        loop.dense_matmul(torch.randn(1, 8), torch.randn(8, 4), False)
    with pytest.raises(RuntimeError, match="weight must be contiguous float32 or bfloat16"):
        loop.dense_matmul(torch.randn(1, 8), torch.randn(4, 8).double(), False)


@pytest.mark.parametrize("isa", ["auto", "avx2"])
def test_decode_linear_serves_decoding_calls(calls, loop, isa, monkeypatch):
    monkeypatch.setenv("HFCOMPRESS_CPU_ISA", isa)
    torch.manual_seed(0)
    plain = torch.nn.Linear(72, 40)
    layer = copy.deepcopy(plain)
    assert use_decode_loop(layer) == [""] and type(layer) is DecodeLinear
    with torch.no_grad():
        for shape in [(1, 72), (1, 1, 72), (3, 4, 72)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    assert [shape for shape, _ in calls] == [(1, 72), (1, 72), (12, 72)]
    assert {avx512 for _, avx512 in calls} == {isa == "auto" and loop.has_avx512()}


def test_bfloat16_decoding_rounds_once_as_torch_does(calls):
    torch.manual_seed(0)
    plain = torch.nn.Linear(1000, 40).bfloat16()
    layer = copy.deepcopy(plain)
    use_decode_loop(layer)
    with torch.no_grad():
        for rows in range(1, DENSE_MAX_ROWS[torch.bfloat16] + 1):
            x = torch.randn(1, rows, 1000, dtype=torch.bfloat16)
            y = layer(x)
            exact = (x.double() @ plain.weight.double().T + plain.bias.double()).bfloat16()
            assert y.dtype == torch.bfloat16 and y.shape == (1, rows, 40)
            # one rounding of a float32 sum: at most one bfloat16 step from the exact result's rounding
            torch.testing.assert_close(y.float(), exact.float(), rtol=2**-7, atol=1e-2)
            torch.testing.assert_close(y.float(), plain(x).float(), rtol=2**-7, atol=1e-2)
    assert [shape for shape, _ in calls] == [(1, 1000), (2, 1000)]


def test_decode_linear_leaves_other_calls_to_torch(calls):
    torch.manual_seed(0)
    plain = torch.nn.Linear(32, 16)
    layer = copy.deepcopy(plain)
    use_decode_loop(layer)
    with torch.no_grad():  # a prompt: more rows than the loop serves
        x = torch.randn(DENSE_MAX_ROWS[torch.float32] + 1, 32)
        torch.testing.assert_close(layer(x), plain(x))
        x16 = torch.randn(1, 32, dtype=torch.float16)  # another dtype
        assert layer.half()(x16).dtype == torch.float16
        x16 = torch.randn(DENSE_MAX_ROWS[torch.bfloat16] + 1, 32, dtype=torch.bfloat16)  # a bfloat16 prompt
        assert layer.bfloat16()(x16).dtype == torch.bfloat16
        layer.float()
    x = torch.randn(1, 32, requires_grad=True)  # a gradient to compute: torch's differentiable matmul
    layer(x).sum().backward()
    plain(x.detach()).sum().backward()
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad)
    assert x.grad is not None and calls == []


def test_decode_linear_off_without_the_kernels(monkeypatch):
    monkeypatch.setenv("HFCOMPRESS_CPU_KERNELS", "0")
    layer = torch.nn.Linear(16, 8)
    use_decode_loop(layer)
    with torch.no_grad():
        layer(torch.randn(1, 16))
    assert layer._decode_isa == "off"


def test_decode_linear_is_still_a_plain_linear():
    model = tiny_model()
    keys = list(model.state_dict())
    names = use_decode_loop(model)
    assert "lm_head" in names and all(is_plain_linear(model.get_submodule(n)) for n in names)
    assert list(model.state_dict()) == keys and isinstance(model.lm_head, torch.nn.Linear)
    assert type(copy.deepcopy(model).lm_head) is DecodeLinear


def test_quantized_models_decode_their_output_layer_through_the_loop(loop, calls, tmp_path):
    """A quantized model's output layer (kept whole) takes the loop while generating, in memory and loaded again,
    with the tokens and logits of torch's matmul."""
    torch.manual_seed(0)
    model = hfcompress.quantize(tiny_model().eval(), hfcompress.RTNConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path / "q")
    loaded = hfcompress_load(tmp_path / "q")
    for quantized in (model, loaded):
        assert [n for n, m in quantized.named_modules() if type(m) is DecodeLinear] == ["lm_head"]
    reference = copy.deepcopy(model)
    reference.lm_head.__class__ = torch.nn.Linear
    prompt = torch.tensor([[1, 5, 9, 2]])
    options = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        expected = reference.generate(prompt, **options)
        assert calls == []
        for quantized in (model, loaded):
            got = quantized.generate(prompt, **options)
            assert torch.equal(got.sequences, expected.sequences)
            for a, b in zip(got.logits, expected.logits, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(calls) >= 10  # one per generated token after the prompt, in each model


def hfcompress_load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_only_the_output_layer_on_request():
    model = tiny_model()
    assert use_decode_loop(model, output_layer_only=True) == ["lm_head"]
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
