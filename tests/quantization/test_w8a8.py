"""W8A8: SmoothQuant scales that move activation outliers into the weights without changing the model, int8
weights and per-token int8 activations multiplied exactly in int32, saved, reloaded and exported."""

import copy

import pytest
import torch
from helpers import python_text, save_tiny_model, tiny_model, token_windows
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.core.experts import run_on_expert_linears
from hfcompress.quantization.int8_linear import Int8Linear
from hfcompress.quantization.modules import QuantLinear, dequantized_forward
from hfcompress.quantization.smoothquant import int8_matmul, quantize_per_token, smoothquant_scales
from hfcompress.quantization.w8a8 import smooth_model


def test_outlier_channels_get_the_largest_scales():
    activation_max = torch.ones(16)
    activation_max[3] = 50.0
    weight = torch.randn(8, 16)
    s = smoothquant_scales(activation_max, weight, alpha=0.5)
    assert int(s.argmax()) == 3
    smoothed = activation_max / s  # what the int8 activations must span after the fold
    assert float(smoothed.max() / smoothed.min()) < float(activation_max.max() / activation_max.min()) / 3
    unused = smoothquant_scales(torch.zeros(16), weight, alpha=0.5)
    assert torch.equal(unused, torch.ones(16))  # a channel no token uses is left alone


def test_per_token_codes_are_within_half_a_step():
    x = torch.randn(5, 7, 48) * torch.logspace(-2, 2, 48)
    codes, scale = quantize_per_token(x)
    assert codes.dtype == torch.int8 and scale.shape == (5, 7, 1)
    assert float(((codes.float() * scale - x).abs() / scale).max()) <= 0.5 + 1e-4
    assert int(codes.abs().amax()) == 127


@pytest.mark.parametrize("shape", [(1, 64, 32), (17, 40, 24), (3, 5, 7)])
def test_the_int8_matmul_is_exact(shape):
    rows, inner, out = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (rows, inner), dtype=torch.int8, generator=generator)
    w = torch.randint(-127, 128, (out, inner), dtype=torch.int8, generator=generator)
    assert torch.equal(int8_matmul(a, w), (a.long() @ w.long().t()).int())


def test_an_int8_layer_computes_its_quantized_activations_times_its_weights():
    model = hfcompress.quantize(tiny_model("llama"), hfcompress.W8A8Config(dataset=token_windows(), smoothquant=0))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, Int8Linear)
    x = torch.randn(2, 9, layer.in_features)
    codes, scale = quantize_per_token(x)
    weight = layer.int8_weight().float() * layer.weight_scale.float()
    torch.testing.assert_close(layer(x), (codes.float() * scale) @ weight.t(), rtol=1e-5, atol=1e-6)
    with dequantized_forward(model):  # evaluation must not run it on float inputs
        torch.testing.assert_close(layer(x), (codes.float() * scale) @ weight.t(), rtol=1e-5, atol=1e-6)


def test_smoothing_changes_no_output_and_narrows_the_activations():
    model = tiny_model("llama")
    with torch.no_grad():  # a few outlier channels, as trained language models have
        model.model.layers[0].input_layernorm.weight[:3] = 25.0
    ids = token_windows(4, 32)
    before = model(input_ids=ids).logits
    inputs = {}
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: inputs.update(x=a[0].detach()))
    model(input_ids=ids)
    raw = inputs["x"].abs().amax(dim=(0, 1))
    smoothed = smooth_model(model, hfcompress.W8A8Config(dataset=ids, smoothquant=0.5))
    model(input_ids=ids)
    hook.remove()
    assert smoothed["model.layers.0.self_attn.q_proj"] == "model.layers.0.input_layernorm"
    assert smoothed["model.layers.0.mlp.down_proj"] == "model.layers.0.mlp.up_proj"
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)
    narrowed = inputs["x"].abs().amax(dim=(0, 1))
    assert float(narrowed.max() / narrowed.median()) < float(raw.max() / raw.median()) / 2


def test_smoothing_a_mixture_of_experts_on_few_tokens_changes_no_output():
    # two windows of 8 tokens leave experts that no token reaches: folding their scales into a module that is not
    # their input's producer (the previous expert's down projection) once passed a check on routed outputs alone
    model = tiny_model("mixtral")
    ids = token_windows(4, 32)
    calibration = torch.cat([token_windows(1, 8, seed=10), token_windows(1, 8, seed=20)])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        config = hfcompress.W8A8Config(dataset=calibration, smoothquant=0.5, batch_size=1)
        run_on_expert_linears(model, lambda: smooth_model(model, config))
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-5)


def test_w8a8_stays_close_saves_reloads_and_records_its_activations(tmp_path):
    ids = token_windows(2, 16)
    reference = tiny_model("llama")(input_ids=ids).logits
    model = hfcompress.quantize(tiny_model("llama"), hfcompress.W8A8Config(dataset=token_windows(), weights="gptq"))
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 14
    assert not any(type(m) is QuantLinear for m in model.modules())
    manifest = model.config.quantization_config
    assert manifest.method == "w8a8" and manifest.activations == {
        "bits": 8,
        "strategy": "token",
        "dynamic": True,
        "sym": True,
    }
    logits = model(input_ids=ids).logits
    assert float((logits - reference).abs().max()) < 0.02 * float(reference.abs().max())
    model.save_pretrained(tmp_path / "w8a8")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w8a8")
    assert isinstance(reloaded.model.layers[1].self_attn.o_proj, Int8Linear)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, rtol=0, atol=0)


def test_the_command(tmp_path):
    from hfcompress.commands.cli import main

    save_tiny_model(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(python_text()[:20000])
    out = tmp_path / "out"
    args = ["quantize", "w8a8", str(tmp_path / "model"), str(out), "--smoothquant", "0.8", "--weights", "gptq",
            "--dataset", str(tmp_path / "calib.txt"), "--num-samples", "4", "--seq-len", "64", "-q"]  # fmt: skip
    assert main(args) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization_config.recipe["smoothquant"] == 0.8
    assert isinstance(model.model.layers[0].mlp.gate_proj, Int8Linear)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match=r"`smoothquant` must be in \[0, 1\] \(0: no smoothing\), got 1.5"):
        hfcompress.W8A8Config(dataset=token_windows(), smoothquant=1.5)
    with pytest.raises(ValueError, match="`weights` must be 'rtn' or 'gptq', got 'awq'"):
        hfcompress.W8A8Config(dataset=token_windows(), weights="awq")
    with pytest.raises(ValueError, match="W8A8Config needs calibration data"):
        hfcompress.quantize(tiny_model("llama"), hfcompress.W8A8Config())
    model = copy.deepcopy(tiny_model("llama"))
    hfcompress.quantize(model, hfcompress.RTNConfig(bits=4, group_size=32, sym=True))
    with pytest.raises(ValueError, match="W8A8 needs 8-bit symmetric per-channel weights"):
        Int8Linear.from_quant_linear(model.model.layers[0].mlp.up_proj)
