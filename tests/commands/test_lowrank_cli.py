"""`hfcompress factorize` and `hfcompress merge-lora` on a tiny model folder with a real tokenizer."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.commands.cli import main


def run(*argv):
    return main([str(a) for a in argv])


def test_factorize_then_merge_lora_then_evaluate(model_dir, text_file, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    out = tmp_path / "factorized"
    code = run(
        "factorize", model_dir, out, "--param-ratio", 0.7, "--method", "whiten", "--allocation", "uniform",
        "--dataset", text_file, "--num-samples", 8, "--seq-len", 64, "-q",
    )  # fmt: skip
    assert code == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["lowrank"] and config["lowrank_recipe"]["method"] == "whiten"
    model = AutoModelForCausalLM.from_pretrained(out)
    layer = model.get_submodule(next(iter(config["lowrank"])))
    assert isinstance(layer, hfcompress.FactorizedLinear)

    ids = torch.randint(4, 200, (2, 16))
    adapted = get_peft_model(model, hfcompress.lowrank.lora.adapt_factorized_layers(
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)))  # fmt: skip
    expected = adapted(ids).logits
    adapted.save_pretrained(tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    assert run("merge-lora", out, tmp_path / "adapter", merged_dir, "--rank", "exact", "-q") == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert run("evaluate", merged_dir, "--dataset", text_file, "--seq-len", 64, "--max-windows", 2, "--json", "-q") == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--rank", "0"], "`rank` must be a positive integer"),
        (["--param-ratio", "1.5"], "`param_ratio` must be in"),
        (["--param-ratio", "0.5", "--method", "whiten"], "needs calibration data"),
        (["--rank", "64", "--method", "svd"], "not below min"),
    ],
)
def test_bad_factorize_settings_fail_clearly_and_write_nothing(model_dir, tmp_path, capsys, extra, message):
    assert run("factorize", model_dir, tmp_path / "out", *extra, "-q") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_lora_refuses_what_is_not_an_adapter(model_dir, tmp_path, capsys):
    not_an_adapter = tmp_path / "adapter"
    not_an_adapter.mkdir()
    assert run("merge-lora", model_dir, not_an_adapter, tmp_path / "out", "-q") == 2
    assert "not a peft adapter" in capsys.readouterr().err
    assert run("merge-lora", model_dir, not_an_adapter, tmp_path / "out", "--rank", "big", "-q") == 2
    assert "`rank` must be" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
