"""`hfcompress prune oneshot|structured` on a tiny model folder with a real tokenizer."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (loads bitmask checkpoints)
from hfcompress.commands.cli import main


def run(*argv):
    return main([str(a) for a in argv])


def test_prune_oneshot_sparsegpt_2_4_writes_a_smaller_checkpoint_that_reloads(model_dir, text_file, tmp_path):
    out = tmp_path / "sparse"
    code = run(
        "prune", "oneshot", model_dir, out, "--method", "sparsegpt", "--pattern", "2:4", "--dataset", text_file,
        "--num-samples", 8, "--seq-len", 64, "--eval-dataset", text_file, "--eval-max-windows", 4, "-q",
    )  # fmt: skip
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert len(config["quantization_config"]["sparse"]) == 14
    record = json.loads((out / "hfcompress_record.json").read_text())
    assert record["steps"][0]["technique"] == "pruning" and record["steps"][0]["method"] == "sparsegpt"
    assert record["metrics"]["after"]["size_bytes"] < record["metrics"]["before"]["size_bytes"]
    assert (out / "README.md").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[0].self_attn.q_proj.dense_weight()
    assert torch.all((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2)


def test_prune_structured_writes_a_plain_smaller_model(model_dir, text_file, tmp_path):
    out = tmp_path / "structured"
    code = run("prune", "structured", model_dir, out, "--heads", 0.5, "--ffn", 0.5, "--dataset", text_file,
               "--num-samples", 4, "--seq-len", 64, "-q")  # fmt: skip
    assert code == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_attention_heads"], config["intermediate_size"]) == (2, 64)
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.up_proj.out_features == 64


@pytest.mark.parametrize(
    "extra, message",
    [
        (["oneshot", "--sparsity", "1.2", "--method", "magnitude"], "`sparsity` must be in [0, 1), got 1.2"),
        (["oneshot", "--method", "wanda"], "wanda needs calibration data: give `dataset` (--dataset"),
        (["oneshot", "--pattern", "2-4", "--method", "magnitude"], "`pattern` must look like '2:4'"),
        (["structured", "--heads", "1"], "`heads` must be a fraction in [0, 1), got 1.0"),
        (["structured"], "nothing to prune"),
    ],
)
def test_bad_prune_settings_fail_clearly_and_write_nothing(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert run("prune", extra[0], model_dir, out, *extra[1:], "-q") == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_prune_refuses_an_output_in_the_way(model_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert run("prune", "oneshot", model_dir, out, "--method", "magnitude", "-q") == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "keep me"
