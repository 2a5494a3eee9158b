"""Low-rank compensation: a correction of each layer's quantization error, fitted to the calibration inputs,
allocated under one budget, stored as float16 factors beside the quantized weight, reloaded as it was saved."""

import pytest
import torch
from helpers import python_text, save_tiny_model, tiny_model, token_windows
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.evaluation.footprint import bits_per_weight
from hfcompress.quantization.compensated_linear import CompensatedLinear
from hfcompress.quantization.compensation import allocate_compensation, error_factors
from hfcompress.quantization.modules import QuantLinear
from hfcompress.quantization.save import save_quantized


def test_the_correction_removes_the_output_error_its_singular_values_say():
    torch.manual_seed(0)
    x = torch.randn(512, 48) * torch.linspace(0.1, 3, 48)  # inputs of very different scales
    gram = x.T @ x
    error = torch.randn(32, 48) * 0.01
    found = error_factors(error, gram, max_rank=8, damp_percent=1e-8)
    assert found.up.shape == (32, 8) and found.down.shape == (8, 48)
    for rank in (1, 4, 8):
        up, down = found.factors(rank)
        remaining = float(((error - up @ down) @ x.T).square().sum())
        assert remaining == pytest.approx(float(found.S[rank:].double().square().sum()), rel=1e-3)
    plain = torch.linalg.svd(error)  # the unwhitened rank-4 correction leaves more output error
    unwhitened = plain.U[:, :4] * plain.S[:4] @ plain.Vh[:4]
    up, down = found.factors(4)
    assert float(((error - up @ down) @ x.T).square().sum()) < float(((error - unwhitened) @ x.T).square().sum())


def test_ranks_go_where_they_remove_the_most_error_per_parameter():
    found = {
        "big": error_factors(torch.randn(16, 16) * 10, torch.eye(16), max_rank=8),
        "small": error_factors(torch.randn(16, 16) * 0.1, torch.eye(16), max_rank=8),
    }
    shapes = {"big": (16, 16), "small": (16, 16)}
    kept = {name: factors.kept for name, factors in found.items()}
    ranks = allocate_compensation(kept, shapes, budget=6 * 32)
    assert sum(r * 32 for r in ranks.values()) <= 6 * 32
    assert ranks["big"] == 6 and ranks["small"] == 0
    assert allocate_compensation(kept, shapes, budget=31) == {"big": 0, "small": 0}


@pytest.fixture(scope="module")
def compensated():
    config = hfcompress.GPTQConfig(bits=3, group_size=32, dataset=token_windows(16, 32), compensation_bits=0.5)
    return hfcompress.quantize(tiny_model("llama"), config)


def test_compensation_lowers_the_error_for_the_bits_it_was_given(compensated):
    held_out = token_windows(4, 32, seed=7)
    reference = tiny_model("llama")(input_ids=held_out).logits
    plain = hfcompress.quantize(
        tiny_model("llama"), hfcompress.GPTQConfig(bits=3, group_size=32, dataset=token_windows(16, 32))
    )
    with torch.no_grad():
        errors = {m: float((model(input_ids=held_out).logits - reference).square().mean())
                  for m, model in (("plain", plain), ("compensated", compensated))}  # fmt: skip
    assert errors["compensated"] < 0.97 * errors["plain"]  # rank 1 of a 64-wide layer: a small, steady gain
    extra = bits_per_weight(compensated) - bits_per_weight(plain)
    assert 0.3 < extra <= 0.5


def test_compensated_layers_are_recorded_saved_and_reloaded(compensated, tmp_path):
    layers = {n: m for n, m in compensated.named_modules() if isinstance(m, CompensatedLinear)}
    manifest = compensated.config.quantization_config
    assert layers and manifest.compensation == {n: m.rank for n, m in layers.items()}
    assert all(f"{n}.base" in manifest.modules and isinstance(m.base, QuantLinear) for n, m in layers.items())
    assert all(m.up.weight.dtype == torch.float16 for m in layers.values())
    ids = token_windows(2, 16)
    compensated.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, compensated(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="low-rank correction of their quantization error"):
        save_quantized(compensated, tmp_path / "ct", format="compressed-tensors")


def test_the_command(tmp_path):
    from hfcompress.commands.cli import main

    save_tiny_model(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(python_text()[:20000])
    args = ["quantize", "gptq", str(tmp_path / "model"), str(tmp_path / "out"), "--bits", "3", "--group-size", "32",
            "--lowrank-compensation", "2", "--dataset", str(tmp_path / "calib.txt"), "--num-samples", "4",
            "--seq-len", "64", "-q"]  # fmt: skip
    assert main(args) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    budget = 2 * sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, (QuantLinear,)))
    ranks = model.config.quantization_config.compensation
    assert ranks and sum(r * (model.get_submodule(n).in_features + model.get_submodule(n).out_features)
                         for n, r in ranks.items()) <= budget  # fmt: skip


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="`lowrank_compensation` must be 0 \\(none\\) or a positive rank, got -2"):
        hfcompress.GPTQConfig(lowrank_compensation=-2)
    with pytest.raises(ValueError, match="not both"):
        hfcompress.GPTQConfig(lowrank_compensation=8, compensation_bits=0.25)
    with pytest.raises(ValueError, match=r"`compensation_bits` must be in \(0, 16\]"):
        hfcompress.GPTQConfig(compensation_bits=0)
