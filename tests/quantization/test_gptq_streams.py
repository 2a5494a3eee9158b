"""Several GPTQ runs in one walk over the blocks, the per-channel output errors, the Fisher information of layer
outputs and the scores the search builds from them."""

import copy

import pytest
import torch
from helpers import tiny_model, token_windows

from hfcompress.core.fisher import output_fisher
from hfcompress.core.structure import candidate_linears
from hfcompress.quantization import GPTQConfig, quantize
from hfcompress.quantization.gptq_streams import assemble, output_errors, quantize_streams
from hfcompress.quantization.modules import QuantLinear
from hfcompress.recipes.sensitivity import fisher_scores


def _config(**extra):
    settings = {"bits": 4, "group_size": 32, "dataset": token_windows(8, 32), "num_samples": 8} | extra
    return GPTQConfig(**settings)


def _codes(model):
    """Every stored tensor of every quantized layer: packed codes, scales, zero points."""
    return {
        f"{n}.{t}": getattr(m, t).clone()
        for n, m in model.named_modules()
        if isinstance(m, QuantLinear)
        for t in QuantLinear.STORED_TENSORS
        if getattr(m, t, None) is not None
    }


@pytest.mark.parametrize("true_sequential", [True, False])
def test_each_stream_is_the_gptq_run_it_stands_for_and_the_model_is_left_as_it_was(true_sequential):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    names = list(candidate_linears(model, None))
    mixed = {n: (2 if "mlp" in n else 4) for n in names}
    streams = {"4bit": dict.fromkeys(names, 4), "3bit": dict.fromkeys(names, 3), "mixed": mixed}
    config = _config(true_sequential=true_sequential)
    results = quantize_streams(model, config, streams)
    for name, tensor in model.state_dict().items():  # the weights went back after every stream
        assert torch.equal(tensor, before[name]), name

    overrides = {n: 2 for n in names if "mlp" in n}
    expected = {
        "4bit": quantize(tiny_model(), _config(true_sequential=true_sequential)),
        "3bit": quantize(tiny_model(), _config(bits=3, true_sequential=true_sequential)),
        "mixed": quantize(tiny_model(), _config(layer_bits=overrides, true_sequential=true_sequential)),
    }
    for stream, reference in expected.items():
        assembled = assemble(model, config, results[stream])
        ours = _codes(assembled)
        assert ours.keys() == _codes(reference).keys()
        for name, stored in _codes(reference).items():
            assert torch.equal(ours[name], stored), (stream, name)
        manifest = assembled.config.quantization_config
        assert manifest.bits == reference.config.quantization_config.bits
        assert manifest.overrides == reference.config.quantization_config.overrides
    assert all(results["mixed"][n].plan.bits == mixed[n] for n in names)


def test_a_stream_without_a_width_for_some_layer_is_refused():
    model = tiny_model()
    names = list(candidate_linears(model, None))
    with pytest.raises(ValueError, match="gives no width for"):
        quantize_streams(model, _config(), {"partial": dict.fromkeys(names[1:], 4)})


def test_output_errors_are_the_mean_squared_error_of_each_output_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    weight, quantized = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    H = 2 * x.t() @ x / x.shape[0]
    expected = (x @ weight.t() - x @ quantized.t()).square().mean(dim=0)
    assert torch.allclose(output_errors(weight, quantized, H), expected, rtol=1e-4)
    # rows made on demand, over several blocks of rows: what the streamed walk gives from a layer's codes
    weight, quantized = torch.randn(1100, 16, generator=g), torch.randn(1100, 16, generator=g)
    asked = []
    rows = lambda start, stop: asked.append((start, stop)) or quantized[start:stop]  # noqa: E731
    expected = (x @ weight.t() - x @ quantized.t()).square().mean(dim=0)
    assert torch.allclose(output_errors(weight, rows, H), expected, rtol=1e-4)
    assert asked == [(0, 512), (512, 1024), (1024, 1100)]


def test_output_fisher_is_the_mean_squared_gradient_of_sampled_tokens_at_each_output():
    model = tiny_model()
    windows = token_windows(4, 16)
    name = "model.layers.1.mlp.down_proj"
    fisher = output_fisher(model, windows, [name, "model.layers.0.self_attn.q_proj"], batch_size=2, seed=3)
    assert all(p.requires_grad for p in model.parameters())  # left as they were

    # the same sums by hand: the output's gradient for tokens drawn with the same generator
    generator = torch.Generator().manual_seed(3)
    kept = {}
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: kept.update(out=out))
    total, tokens = 0, 0
    for batch in windows.split(2):
        logits = model(input_ids=batch, use_cache=False).logits.float()
        flat = logits.reshape(-1, logits.shape[-1])
        drawn = torch.multinomial(torch.softmax(flat.detach(), -1), 1, generator=generator).squeeze(1)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(flat, drawn, reduction="sum"), kept["out"])
        total = total + grad.square().reshape(-1, grad.shape[-1]).sum(0)
        tokens += flat.shape[0]
    handle.remove()
    assert torch.allclose(fisher[name], total / tokens, rtol=1e-4, atol=1e-10)
    assert fisher["model.layers.0.self_attn.q_proj"].shape == (model.config.hidden_size,)


def test_fisher_scores_predict_the_kl_divergence_of_a_small_change():
    """For a small change of one layer, ½ Σ F_r e_r is the KL divergence of the model's next-token
    distributions from its own, to second order: checked against the KL measured directly."""
    model = tiny_model()
    windows = token_windows(4, 32)
    name = "model.layers.1.mlp.down_proj"
    module = model.get_submodule(name)
    inputs = []
    handle = module.register_forward_hook(lambda m, a, out: inputs.append(a[0].detach()))
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=windows).logits, -1)
    handle.remove()
    x = torch.cat(inputs).reshape(-1, module.in_features)
    H = 2 * x.t() @ x / x.shape[0]
    delta = 2e-3 * torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(1))
    changed = module.weight.detach() + delta
    # the Fisher estimate needs many drawn tokens: average over several draws of the whole windows
    fisher = {name: torch.stack([output_fisher(model, windows, [name], seed=s)[name] for s in range(8)]).mean(0)}
    estimate = fisher_scores(fisher, {"changed": {name: output_errors(module.weight, changed, H)}})[name]["changed"]
    with torch.no_grad():
        original = module.weight.detach().clone()
        module.weight.copy_(changed)
        moved = torch.log_softmax(model(input_ids=windows).logits, -1)
        module.weight.copy_(original)
    kl = float((reference.exp() * (reference - moved)).sum(-1).mean())
    assert estimate == pytest.approx(kl, rel=0.1)  # 1% on this model and seed
    assert fisher_scores(fisher, {"x": {name: None}}) == {}  # a layer without an error is left out
