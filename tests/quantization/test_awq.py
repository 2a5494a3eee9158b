"""AWQ: activation-aware scales that never do worse than round-to-nearest on their objective, folded only where
the block computes exactly the same, then quantized and saved like any uniform grid."""

import copy

import pytest
import torch
from helpers import tiny_model, token_windows
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hfcompress
from hfcompress.core.capture import capture_block_inputs, run_block
from hfcompress.core.folding import find_producer
from hfcompress.core.hessian import Hessian
from hfcompress.core.structure import find_linears
from hfcompress.core.trace import trace_block
from hfcompress.quantization.awq import awq_clip, awq_scales, output_error_basis
from hfcompress.quantization.awq_blocks import smooth_block
from hfcompress.quantization.awq_outputs import ModuleCalls, holding_module, search_batches
from hfcompress.quantization.grid import rtn_quantize
from hfcompress.quantization.modules import QuantLinear


def _output_error(weight, quantized, H):
    delta = weight - quantized
    return float(((delta @ H) * delta).sum())


def test_salient_channels_get_finer_steps_and_the_error_drops():
    torch.manual_seed(0)
    x = torch.randn(2048, 64)
    x[:, :4] *= 30  # four channels carry most of the activation
    hessian = Hessian(64, "cpu")
    hessian.add(x)
    H = hessian.full()
    weight = torch.randn(48, 64) * 0.1
    plain = rtn_quantize(weight, 3, 32, sym=False).dequantize(torch.float32)
    for activation in (hessian.abs_mean, None):  # mean |x| (what AWQ uses), or the RMS from H's diagonal
        s, alpha = awq_scales(weight, H, bits=3, group_size=32, sym=False, activation=activation)
        assert alpha is not None and bool((s[:4] > s[4:].max()).all())
        scaled = rtn_quantize(weight * s, 3, 32, sym=False).dequantize(torch.float32) / s
        assert _output_error(weight, scaled, H) < 0.8 * _output_error(weight, plain, H)


def test_no_scaling_is_kept_when_nothing_helps():
    H = torch.eye(32) * 2  # every channel alike: no channel is salient
    weight = torch.ones(8, 32)
    s, alpha = awq_scales(weight, H, bits=4, group_size=32, sym=True)
    assert alpha is None and torch.equal(s, torch.ones(32))


def test_clipping_trades_the_largest_weights_for_finer_steps():
    torch.manual_seed(0)
    hessian = Hessian(64, "cpu")
    hessian.add(torch.randn(4096, 64))
    H = hessian.full()
    weight = torch.randn(16, 64) * 0.1
    weight[:, 5] = torch.randn(16).sign() * 0.45  # one large weight per row in the first group
    clipped = awq_clip(weight, H, bits=3, group_size=32, sym=False)
    assert clipped[:, 5].abs().min() < 0.45  # outliers were clamped where that paid
    quantized = {
        w: rtn_quantize(v, 3, 32, sym=False).dequantize(torch.float32)
        for w, v in (("plain", weight), ("clipped", clipped))
    }
    assert _output_error(weight, quantized["clipped"], H) < _output_error(weight, quantized["plain"], H)


@pytest.mark.parametrize("inputs", [48, 700])  # the exact factor, and a sketch of it
def test_the_output_error_basis_measures_the_output_error_in_place_or_not(inputs):
    torch.manual_seed(0)
    hessian = Hessian(inputs, "cpu")
    hessian.add(torch.randn(2 * inputs, inputs) * torch.linspace(0.1, 3, inputs))
    H = hessian.full()
    kept = H.clone()
    basis = output_error_basis(H, generator=torch.Generator().manual_seed(0))
    assert torch.equal(H, kept)  # a copy was factorized
    delta = torch.randn(256, inputs)
    exact = float(((delta @ H) * delta).sum())
    assert abs(float((delta @ basis).square().sum()) / exact - 1) < (0.02 if inputs <= 64 else 0.2)
    in_place = output_error_basis(H, generator=torch.Generator().manual_seed(0), overwrite=True)
    assert torch.equal(in_place, basis) and not torch.equal(H, kept)  # H's own memory held the factor


def _block_with_inputs(model):
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, list(token_windows(8, 32).split(4)))
    modules = {n.removeprefix("model.layers.0."): m for n, m in find_linears(block, "model.layers.0").items()}
    return block, inputs, modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("kv_heads", "o_proj_scaled"), [(4, True), (2, False)])
def test_scales_fold_only_where_the_block_computes_the_same(kv_heads, o_proj_scaled, dtype):
    # a checkpoint's bfloat16 or float16 weights round scaled values: the structure is checked all the same
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype).eval()
    block, inputs, modules = _block_with_inputs(model)
    before = run_block(copy.deepcopy(block), inputs)
    done = smooth_block(
        block,
        "model.layers.0",
        inputs,
        modules,
        hfcompress.AWQConfig(bits=3, group_size=32, dataset=token_windows(), clip=False),
    )
    producers = {leader: producer for leader, (producer, _) in done.items()}
    assert producers.get("self_attn.q_proj") == "input_layernorm"
    assert producers.get("mlp.gate_proj") == "post_attention_layernorm"
    assert producers.get("mlp.down_proj") == "mlp.up_proj"  # act(gate) * up is linear in up
    # with grouped-query attention a value head feeds several output heads: no per-channel fold is exact
    assert (producers.get("self_attn.o_proj") == "self_attn.v_proj") == o_proj_scaled
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]  # the folded values' rounding
    for got, want in zip(run_block(block, inputs), before, strict=True):
        torch.testing.assert_close(got.args[0], want.args[0], rtol=10 * tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checking_a_fold_leaves_every_weight_as_it_was(dtype):
    # subnormal float16 weights lose bits when halved: the check must not fold into the stored weights and back
    model = tiny_model("llama").to(dtype)
    block, inputs, modules = _block_with_inputs(model)
    block.mlp.up_proj.weight.data[:, :8] = torch.tensor(3e-7).to(dtype)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in block.named_parameters()}
    trace = trace_block(block, "model.layers.0", [f"model.layers.0.{n}" for n in modules], inputs[0])
    named = dict(block.named_modules())
    found = [find_producer(block, named, trace.order, names, inputs[0]) for names in trace.groups]
    assert "mlp.up_proj" in found and "post_attention_layernorm" in found
    for name, p in block.named_parameters():
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1]), name


def test_a_norm_whose_scales_do_not_fold_is_left_alone():
    """Gemma's norms multiply by 1 + weight: dividing the weight by s is not dividing the output by s."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()  # fmt: skip
    block, inputs, modules = _block_with_inputs(model)
    norms = {n: m.weight.detach().clone() for n, m in block.named_modules() if "norm" in n}
    done = smooth_block(
        block,
        "model.layers.0",
        inputs,
        modules,
        hfcompress.AWQConfig(bits=3, group_size=32, dataset=token_windows(), clip=False),
    )
    assert "self_attn.q_proj" not in done and "mlp.gate_proj" not in done
    assert all(torch.equal(m.weight, norms[n]) for n, m in block.named_modules() if "norm" in n)


def test_awq_quantizes_saves_and_reloads(tmp_path):
    model = hfcompress.quantize(
        tiny_model("llama"), hfcompress.AWQConfig(bits=4, group_size=32, sym=True, dataset=token_windows())
    )
    manifest = model.config.quantization_config
    assert manifest.method == "awq" and sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    ids = token_windows(2, 16)
    model.save_pretrained(tmp_path / "awq")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "awq")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    hfcompress.save_quantized(model, tmp_path / "ct", format="compressed-tensors")  # scales folded: a plain grid
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_awq_then_gptq_is_recorded_as_such():
    config = hfcompress.AWQConfig(bits=4, group_size=32, dataset=token_windows(), weights="gptq")
    model = hfcompress.quantize(tiny_model("llama"), config)
    assert model.config.quantization_config.method == "awq"
    assert model.config.quantization_config.recipe["weights"] == "gptq"


def test_the_command(tmp_path):
    from helpers import python_text, save_tiny_model

    from hfcompress.commands.cli import main

    save_tiny_model(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(python_text()[:20000])
    out = tmp_path / "out"
    args = ["quantize", "awq", str(tmp_path / "model"), str(out), "--group-size", "32", "--dataset",
            str(tmp_path / "calib.txt"), "--num-samples", "4", "--seq-len", "64", "-q"]  # fmt: skip
    assert main(args) == 0
    assert "awq" in (out / "README.md").read_text()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="`weights` must be 'rtn' or 'gptq', got 'awq'"):
        hfcompress.AWQConfig(dataset=token_windows(), weights="awq")
    with pytest.raises(ValueError, match="AWQConfig needs calibration data"):
        hfcompress.quantize(tiny_model("llama"), hfcompress.AWQConfig())
    with pytest.raises(ValueError, match="search_objective='outputs': expected 'module', 'hessian' or None"):
        hfcompress.AWQConfig(dataset=token_windows(), search_objective="outputs")
    with pytest.raises(ValueError, match="`search_samples` must be at least 1, got 0"):
        hfcompress.AWQConfig(dataset=token_windows(), search_samples=0)


def test_clipping_runs_at_3_bits_by_default_and_never_before_gptq():
    data = {"dataset": token_windows()}
    assert hfcompress.AWQConfig(bits=3, **data).clips() and not hfcompress.AWQConfig(bits=4, **data).clips()
    assert hfcompress.AWQConfig(bits=4, clip=True, **data).clips()
    assert not hfcompress.AWQConfig(bits=3, weights="gptq", clip=True, **data).clips()


def test_the_module_search_is_the_default_with_round_to_nearest_weights_from_4_bits():
    data = {"dataset": token_windows()}
    assert hfcompress.AWQConfig(bits=4, **data).objective() == "module"
    assert hfcompress.AWQConfig(bits=3, **data).objective() == "hessian"
    assert hfcompress.AWQConfig(bits=4, weights="gptq", **data).objective() == "hessian"
    assert hfcompress.AWQConfig(bits=3, search_objective="module", **data).objective() == "module"


def test_a_group_is_scored_by_the_smallest_module_holding_it():
    assert holding_module(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]) == "self_attn"
    assert holding_module(["mlp.experts.3.gate_proj", "mlp.experts.3.up_proj"]) == "mlp.experts.3"
    assert holding_module(["q", "k"]) == ""  # linears of the block itself: the block


def test_the_search_takes_the_first_windows_in_whole_batches():
    model = tiny_model("llama")
    inputs = capture_block_inputs(model, model.model.layers[0], list(token_windows(8, 16).split(2)))
    chosen, places = search_batches(inputs, 3)
    assert list(chosen) == [0, 1] and places == 2 and chosen[1] is inputs[1]
    chosen, places = search_batches(inputs, 100)
    assert list(chosen) == [0, 1, 2, 3] and places == 50


def test_the_module_search_scores_the_attention_output_and_restores_the_weights():
    torch.manual_seed(0)
    model = tiny_model("llama")
    block, inputs, _ = _block_with_inputs(model)
    chosen, places = search_batches(inputs, 8)
    calls = ModuleCalls(block, block.self_attn, chosen, places)
    assert calls.error() == 0  # nothing changed yet: the same outputs
    linears = [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]
    before = [m.weight.detach().clone() for m in linears]
    ones = torch.ones(block.self_attn.q_proj.in_features)
    rounded = calls.rounded_error(linears, ones, bits=2, group_size=32, sym=False, scale_dtype=None)
    assert all(torch.equal(m.weight, w) for m, w in zip(linears, before, strict=True))
    for m in linears:  # the same, by hand: round to nearest, then the attention's output on the recorded calls
        m.weight.data = rtn_quantize(m.weight.data, 2, 32, sym=False).dequantize(torch.float32)
    assert rounded > 0 and calls.error() == pytest.approx(rounded, rel=1e-6)


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_the_module_search_never_leaves_the_module_worse_than_the_hessian_choice(weights):
    # both search the same candidates; the module objective keeps the one its own measure ranks best
    torch.manual_seed(0)
    errors = {}
    for objective in ("module", "hessian"):
        model = tiny_model("llama")
        block, inputs, modules = _block_with_inputs(model)
        config = hfcompress.AWQConfig(
            bits=2, group_size=32, dataset=token_windows(), clip=False, weights=weights, search_objective=objective
        )
        smooth_block(block, "model.layers.0", inputs, modules, config)
        calls = ModuleCalls(block, block.mlp, *search_batches(inputs, 8))  # the MLP's inputs as scaled
        linears = [block.mlp.gate_proj, block.mlp.up_proj]
        errors[objective] = calls.rounded_error(linears, torch.ones(linears[0].in_features), 2, 32, False, None)
    assert errors["module"] <= errors["hessian"]
