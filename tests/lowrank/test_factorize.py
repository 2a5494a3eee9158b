"""`factorize` on tiny models: every method and target, the budget, save and reload, and what happens
without the plugin."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import tiny_model, token_windows
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import FactorizedLinear, LowRankConfig, factorize


def _factorized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def _linear_params(model):
    return sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n
    )


def _relative_error(a, b):
    return ((a - b).square().mean() / b.square().mean()).item()


@pytest.mark.parametrize("method", ["svd", "asvd", "whiten"])
@pytest.mark.parametrize(
    "target",
    [
        {"rank": 12},
        {"energy": 0.8},
        {"param_ratio": 0.6, "allocation": "uniform"},
        {"param_ratio": 0.6},
    ],
)
def test_every_method_and_target_shrinks_the_model(method, target):
    ids = token_windows(8, 32)
    model = tiny_model("llama")
    before, reference = _linear_params(model), model(ids).logits
    factorize(model, LowRankConfig(method=method, dataset=ids, **target))
    layers = _factorized(model)
    assert layers, "nothing was factorized"
    for name, layer in layers.items():
        assert layer.rank * (layer.in_features + layer.out_features) < layer.in_features * layer.out_features, name
    after = _linear_params(model)
    assert after < before
    if "param_ratio" in target:
        assert after <= 0.6 * before
    assert model.config.quantization_config.lowrank == {n: m.rank for n, m in layers.items()}
    assert _relative_error(model(ids).logits, reference) < 1.0


def test_whitening_beats_plain_svd_at_the_same_rank():
    ids = token_windows(16, 32)
    reference = tiny_model("llama")(ids).logits
    errors = {}
    for method in ("svd", "whiten"):
        model = factorize(tiny_model("llama"), LowRankConfig(method=method, rank=8, dataset=ids))
        errors[method] = _relative_error(model(ids).logits, reference)
    assert errors["whiten"] < errors["svd"]


def test_a_layer_is_left_dense_when_factors_would_not_be_smaller():
    # k_proj is 32x64: rank 24 factors hold 24 * 96 = 2304 parameters, more than its 2048
    model = factorize(tiny_model("llama"), LowRankConfig(method="svd", rank=24))
    names = set(_factorized(model))
    assert not any("k_proj" in n for n in names)
    assert any("q_proj" in n for n in names)  # 64x64: 24 * 128 < 4096


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_factorized_checkpoints_reload_with_identical_logits(arch, tmp_path):
    ids = token_windows(4, 16)
    model = factorize(
        tiny_model(arch),
        LowRankConfig(method="whiten", param_ratio=0.7, allocation="uniform", dataset=ids),
    )
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hfcompress" and config["lowrank"] and config["modules"] == []
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert set(_factorized(reloaded)) == set(_factorized(model))
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=0)


def test_without_hfcompress_a_factorized_checkpoint_fails_loudly(tmp_path):
    factorize(tiny_model("llama"), LowRankConfig(method="svd", rank=8)).save_pretrained(tmp_path)
    script = textwrap.dedent(
        """
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained(sys.argv[1])
        except Exception as e:
            print("refused:", type(e).__name__, e)
        else:
            print("loaded")
        assert "hfcompress" not in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused" in result.stdout and "mismatch" in result.stdout, result.stdout


def test_a_reloaded_factorized_model_trains_with_trainer_like_any_other():
    """No packed weights: `is_trainable` lets Trainer fine-tune it (e.g. distillation after factorizing)."""
    model = factorize(tiny_model("llama"), LowRankConfig(method="svd", rank=8))
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_qat_trainable
    from transformers.trainer_utils import validate_quantization_for_training

    validate_quantization_for_training(model)  # raises for a model Trainer refuses


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rank": 0}, "`rank` must be a positive integer"),
        ({"param_ratio": 0.0}, r"`param_ratio` must be in \(0, 1\]"),
        ({"param_ratio": 1.5}, r"`param_ratio` must be in \(0, 1\]"),
        ({"energy": 1.2}, r"`energy` must be in \(0, 1\]"),
        ({"rank": 4, "energy": 0.9}, "exactly one of"),
        ({}, "exactly one of"),
        ({"rank": 4, "method": "tucker"}, "`method` must be one of"),
        ({"param_ratio": 0.5, "probe_ratios": [1.2]}, "`probe_ratios`"),
    ],
)
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankConfig(**kwargs)


def test_bad_inputs_are_refused_before_any_work():
    with pytest.raises(ValueError, match="not below min"):
        factorize(tiny_model("llama"), LowRankConfig(method="svd", rank=64))  # q_proj is 64x64
    with pytest.raises(ValueError, match="needs calibration data"):
        factorize(tiny_model("llama"), LowRankConfig(method="whiten", rank=8))
    factorized = factorize(tiny_model("llama"), LowRankConfig(method="svd", rank=8))
    with pytest.raises(ValueError, match="already quantized or factorized"):
        factorize(factorized, LowRankConfig(method="svd", rank=4))
    with pytest.raises(TypeError, match="LowRankConfig"):
        factorize(tiny_model("llama"), hfcompress.RTNConfig())


def test_config_round_trips():
    config = LowRankConfig(method="asvd", param_ratio=0.5, probe_ratios=[0.6, 0.3, 0.6])
    assert config.probe_ratios == [0.3, 0.6]
    assert LowRankConfig(**config.to_dict()) == config


def test_a_sensitivity_cache_is_read_only_for_the_settings_it_was_measured_with(tmp_path, caplog):
    ids, cache = token_windows(8, 32), str(tmp_path / "sensitivity.json")

    def run(**extra):
        caplog.clear()
        with caplog.at_level("INFO", logger="hfcompress.lowrank.sensitivity"):
            factorize(
                tiny_model("llama"),
                LowRankConfig(method="whiten", dataset=ids, param_ratio=0.6, sensitivity_cache=cache, **extra),
            )
        return caplog.text

    assert "read from" not in run()
    assert "read from" in run()
    assert "measured for other settings" in run(hessian_dtype="float64")  # the whitening's sums change the curves
    assert "read from" in run(hessian_dtype="float64")
