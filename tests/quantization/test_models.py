"""Every supported architecture, built tiny from its config: quantize, save, reload, same logits."""

import copy

import pytest
import torch
from helpers import ARCHITECTURES, tiny_model, token_windows
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import hfcompress
from hfcompress.core.calibration import calibrate_block as core_calibrate_block
from hfcompress.core.capture import BlockInputs, capture_block_inputs, run_block
from hfcompress.core.structure import find_layer_stack, find_linears, set_submodule
from hfcompress.core.walk import calibrate_blocks
from hfcompress.quantization.gptq_blocks import quantize_group
from hfcompress.quantization.modules import QuantLinear


def calibrate_block(block, prefix, inputs, modules, config, scale_dtype):
    """GPTQ on one block through the core driver."""

    def solve(names, H):
        return quantize_group(names, modules, H, config, scale_dtype)

    return core_calibrate_block(block, prefix, inputs, modules, solve, config.true_sequential)


CONFIGS = {
    "gptq-4-g32-asym-two-pass": lambda ids: hfcompress.GPTQConfig(
        bits=4, group_size=32, true_sequential=False, dataset=ids
    ),
    "gptq-3-act-order": lambda ids: hfcompress.GPTQConfig(bits=3, group_size=32, act_order=True, dataset=ids),
    "gptq-2-sym-true-sequential": lambda ids: hfcompress.GPTQConfig(
        bits=2, group_size=16, sym=True, true_sequential=True, dataset=ids
    ),
    "gptq-8-channel-static": lambda ids: hfcompress.GPTQConfig(
        bits=8, group_size=-1, act_order=True, static_groups=True, dataset=ids
    ),
    "rtn-4-g32": lambda ids: hfcompress.RTNConfig(bits=4, group_size=32),
}


def _auto_class(arch):
    return AutoModelForMaskedLM if arch == "bert" else AutoModelForCausalLM


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_save_reload_gives_identical_logits(arch, config_name, tmp_path):
    model = tiny_model(arch)
    ids = token_windows(8, 32)
    reference = model(input_ids=ids[:2]).logits
    hfcompress.quantize(model, CONFIGS[config_name](ids))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers, "nothing was quantized"
    logits = model(input_ids=ids[:2]).logits
    # quantized, so different, but still the same model
    assert not torch.equal(logits, reference)
    assert torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0) > 0.9

    model.save_pretrained(tmp_path)
    reloaded = _auto_class(arch).from_pretrained(tmp_path)
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == len(layers)
    assert torch.equal(reloaded(input_ids=ids[:2]).logits, logits)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_output_embedding_stays_in_full_precision(arch):
    model = hfcompress.quantize(tiny_model(arch), hfcompress.RTNConfig(bits=4, group_size=32))
    assert not isinstance(model.get_output_embeddings(), QuantLinear)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("true_sequential", [True, False])
def test_calibration_propagates_the_quantized_block_outputs(arch, true_sequential):
    """What the driver hands to the next block is exactly what the quantized block computes."""
    model = tiny_model(arch)
    prefix, blocks = find_layer_stack(model)
    inputs = capture_block_inputs(model, blocks[0], list(token_windows(8, 32).split(4)))
    block = copy.deepcopy(blocks[0])
    name = f"{prefix}.0"
    modules = {n[len(name) + 1 :]: m for n, m in find_linears(block, name).items()}
    config = hfcompress.GPTQConfig(bits=3, group_size=32, true_sequential=true_sequential)
    outputs, quantized, staged = calibrate_block(block, name, inputs, modules, config, torch.float16)
    assert staged == true_sequential
    assert set(quantized) == set(modules)
    for n, q in quantized.items():
        set_submodule(block, n, QuantLinear.from_quantized(q, 32, False, False, modules[n].bias, torch.float16))
    fresh = run_block(block, inputs)
    for got, expected in zip(outputs, fresh, strict=True):
        torch.testing.assert_close(got.args[0], expected.args[0], rtol=1e-5, atol=1e-5)


class _InPlaceBlock(torch.nn.Module):
    """A block that scales its norm's output in place after the first linear read it."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(32)
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)

    def forward(self, x):
        h = self.norm(x)
        y = self.a(h)
        h.mul_(2)
        return x + self.b(torch.relu(y) + h)


def test_staged_calibration_falls_back_when_a_module_modifies_its_output_in_place(caplog):
    torch.manual_seed(0)
    block = _InPlaceBlock()
    inputs = [BlockInputs((torch.randn(4, 8, 32),), {}) for _ in range(3)]
    modules = {"a": block.a, "b": block.b}
    two_pass_block = copy.deepcopy(block)
    config = hfcompress.GPTQConfig(bits=3, group_size=16)
    with caplog.at_level("WARNING"):
        outputs, quantized, staged = calibrate_block(block, "blk", inputs, modules, config, torch.float16)
    assert not staged and "in place" in caplog.text
    # the same result as asking for the two passes: the staged attempt's weights were undone
    two_pass = hfcompress.GPTQConfig(bits=3, group_size=16, true_sequential=False)
    expected, expected_quantized, _ = calibrate_block(
        two_pass_block, "blk", inputs, {"a": two_pass_block.a, "b": two_pass_block.b}, two_pass, torch.float16
    )
    for name in modules:
        assert torch.equal(quantized[name].codes, expected_quantized[name].codes)
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got.args[0], want.args[0])


def test_true_sequential_calibrates_later_layers_on_quantized_earlier_ones():
    ids = token_windows(8, 32)
    staged = hfcompress.quantize(
        tiny_model("llama"), hfcompress.GPTQConfig(bits=2, group_size=32, dataset=ids, true_sequential=True)
    )
    two_pass = hfcompress.quantize(
        tiny_model("llama"), hfcompress.GPTQConfig(bits=2, group_size=32, dataset=ids, true_sequential=False)
    )
    q = "model.layers.0.self_attn.q_proj"
    o = "model.layers.0.self_attn.o_proj"
    # the first group sees the same inputs either way; o_proj does not
    assert torch.equal(staged.get_submodule(q).weight, two_pass.get_submodule(q).weight)
    assert not torch.equal(staged.get_submodule(o).weight, two_pass.get_submodule(o).weight)


def _hessians(windows, batch_size, dtype, true_sequential):
    """The Hessian each group of the tiny Llama's linears is solved with, by its first linear's name."""
    model = tiny_model("llama").eval()
    prefix, stack = find_layer_stack(model)
    seen = {}

    def make_solver(block, prefix, modules):
        def solve(names, H):
            seen[f"{prefix}.{names[0]}"] = H.clone()
            return {}

        return solve

    batches = list(windows.split(batch_size))
    walk = calibrate_blocks(
        model, list(stack), batches, find_linears(stack, prefix), make_solver, true_sequential, hessian_dtype=dtype
    )
    for _ in walk:
        pass
    return seen


@pytest.mark.parametrize("true_sequential", [True, False], ids=["staged", "two-pass"])
def test_float64_sums_give_the_same_hessians_whatever_the_order_and_batching_of_the_samples(true_sequential):
    ids = token_windows(12, 32)
    shuffled = ids[torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    for dtype in (torch.float64, torch.float32):
        in_order, reordered = _hessians(ids, 4, dtype, true_sequential), _hessians(shuffled, 3, dtype, true_sequential)
        assert len(in_order) == 8 and in_order.keys() == reordered.keys()
        assert all(H.dtype == torch.float32 for H in in_order.values())
        same = [torch.equal(in_order[name], reordered[name]) for name in in_order]
        # float32 sums round differently in another order: what float64 is for
        assert all(same) if dtype == torch.float64 else not any(same)


def test_gptq_with_float64_hessians_writes_the_same_codes_for_reordered_samples():
    ids = token_windows(12, 32)
    shuffled = ids[torch.randperm(12, generator=torch.Generator().manual_seed(0))]

    def state(windows, batch_size):
        config = hfcompress.GPTQConfig(
            bits=3, group_size=32, dataset=windows, batch_size=batch_size, hessian_dtype="float64"
        )
        return hfcompress.quantize(tiny_model("llama"), config).state_dict()

    in_order, reordered = state(ids, 4), state(shuffled, 3)
    assert in_order.keys() == reordered.keys()
    assert all(torch.equal(in_order[k], reordered[k]) for k in in_order)


def test_quant_linear_matches_its_dequantized_weight(device):
    torch.manual_seed(0)
    from hfcompress.quantization.grid import rtn_quantize

    dense = torch.nn.Linear(64, 48)
    q = rtn_quantize(dense.weight.detach(), 4, 16, sym=False)
    layer = QuantLinear.from_quantized(q, 16, False, False, dense.bias).to(device)
    x = torch.randn(3, 64, device=device)
    expected = x @ q.dequantize().to(device).t() + dense.bias.detach().to(device)
    torch.testing.assert_close(layer(x), expected, rtol=1e-3, atol=1e-3)
    assert not any(b.dtype.is_floating_point and b.shape == (48, 64) for b in layer.buffers())


def test_modules_to_not_convert_by_suffix_and_regex():
    config = hfcompress.RTNConfig(group_size=32, modules_to_not_convert=["lm_head", "down_proj", r"re:.*layers\.1\..*"])
    model = hfcompress.quantize(tiny_model("llama"), config)
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert names and all(".layers.0." in n and "down_proj" not in n for n in names)
    assert set(model.config.quantization_config.modules) == names


def test_group_size_must_divide_every_layer():
    with pytest.raises(ValueError, match="does not divide the 64 input features"):
        hfcompress.quantize(tiny_model("llama"), hfcompress.RTNConfig(group_size=48))


def test_gptq_needs_calibration_data():
    with pytest.raises(ValueError, match="calibration data"):
        hfcompress.quantize(tiny_model("llama"), hfcompress.GPTQConfig(group_size=32))


def test_model_without_blocks_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    with pytest.raises(ValueError, match="found no stack of transformer blocks"):
        hfcompress.quantize(model, hfcompress.GPTQConfig(group_size=32, dataset=token_windows()))


def test_model_without_linear_layers_is_refused():
    model = tiny_model("llama")
    model.model.layers = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="no linear layers to quantize"):
        hfcompress.quantize(model, hfcompress.RTNConfig(group_size=32))


def test_quantizing_twice_is_refused():
    model = hfcompress.quantize(tiny_model("llama"), hfcompress.RTNConfig(group_size=32))
    with pytest.raises(ValueError, match="already quantized"):
        hfcompress.quantize(model, hfcompress.RTNConfig(group_size=32))


def test_calibration_from_text_with_a_tokenizer():
    from helpers import python_text, tiny_tokenizer

    config = hfcompress.GPTQConfig(group_size=32, dataset=[python_text()[:20000]], num_samples=4, seq_len=64)
    model = hfcompress.quantize(tiny_model("llama"), config, tokenizer=tiny_tokenizer())
    assert any(isinstance(m, QuantLinear) for m in model.modules())


def test_calibration_text_shorter_than_a_window_is_refused():
    from helpers import tiny_tokenizer

    config = hfcompress.GPTQConfig(group_size=32, dataset=["too short"], seq_len=100)
    with pytest.raises(ValueError, match="fewer than one window of seq_len=100"):
        hfcompress.quantize(tiny_model("llama"), config, tokenizer=tiny_tokenizer())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gptq_on_cuda_matches_cpu():
    ids = token_windows(8, 32)
    config = hfcompress.GPTQConfig(bits=4, group_size=32, dataset=ids)
    cpu = hfcompress.quantize(tiny_model("llama"), config)
    gpu = hfcompress.quantize(tiny_model("llama").cuda(), config)
    x = ids[:2]
    torch.testing.assert_close(gpu(input_ids=x.cuda()).logits.cpu(), cpu(input_ids=x).logits, rtol=0.05, atol=0.05)
