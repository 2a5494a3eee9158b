"""The command line end to end on a tiny model folder with a real tokenizer."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import python_text, save_tiny_model
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401
from hfcompress.commands.cli import main
from hfcompress.quantization.modules import QuantLinear


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(folder)
    # a float16 checkpoint, as most on the Hub are
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(python_text()[:60_000], encoding="utf-8")
    return path


def run(*argv):
    return main([str(a) for a in argv])


def test_gptq_end_to_end_then_evaluate(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "gptq"
    code = run(
        "quantize", "gptq", model_dir, out, "--bits", 4, "--group-size", 32, "--act-order", "--no-static-groups",
        "--dataset", text_file, "--num-samples", 8, "--seq-len", 64, "-q",
    )  # fmt: skip
    assert code == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(os.listdir(out))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hfcompress"
    assert config["quantization_config"]["act_order"] is True
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.embed_tokens.weight.dtype == torch.float16  # unquantized parts keep the checkpoint dtype
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    capsys.readouterr()

    assert run("evaluate", out, "--dataset", text_file, "--seq-len", 64, "--max-windows", 4, "--json", "-q") == 0
    result = json.loads(capsys.readouterr().out)
    assert {"perplexity", "size_bytes", "bits_per_weight", "latency_s"} <= set(result)
    assert 1 < result["perplexity"] < 1e4
    assert result["size_bytes"] == (out / "model.safetensors").stat().st_size
    assert 4 < result["bits_per_weight"] < 5.5  # 4-bit codes + fp16 scales, zero points and g_idx at group 32

    assert run("evaluate", model_dir, "--dataset", text_file, "--seq-len", 64, "--max-windows", 4, "--json", "-q") == 0
    dense = json.loads(capsys.readouterr().out)
    assert (
        dense["bits_per_weight"] == 16 and dense["size_bytes"] > result["size_bytes"]
    )  # stored bits: a float16 checkpoint, loaded in float32


def test_rtn_compressed_tensors(model_dir, tmp_path):
    out = tmp_path / "rtn-ct"
    assert (
        run(
            "quantize",
            "rtn",
            model_dir,
            out,
            "--bits",
            4,
            "--group-size",
            32,
            "--sym",
            "--format",
            "compressed-tensors",
            "-q",
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--bits", "5"], "`bits` must be one of 2, 3, 4, 8, got 5"),
        (["--group-size", "48"], "does not divide the 64 input features"),
        (["--bits", "3", "--format", "compressed-tensors"], "format compressed-tensors with an asymmetric 3-bit grid"),
    ],
)
def test_bad_settings_fail_clearly_and_write_nothing(model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert run("quantize", "rtn", model_dir, out, *extra, "-q") == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_calibration_set_shorter_than_seq_len(model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    out = tmp_path / "out"
    assert run("quantize", "gptq", model_dir, out, "--group-size", 32, "--dataset", short, "--seq-len", 100, "-q") == 2
    assert "fewer than one window of seq_len=100" in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_and_dataset_paths(tmp_path, model_dir, capsys):
    assert run("quantize", "rtn", tmp_path / "nope", tmp_path / "out", "-q") == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        run("quantize", "gptq", model_dir, tmp_path / "out", "--group-size", 32, "--dataset", tmp_path / "no.txt", "-q")
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_model_without_blocks(tmp_path, capsys, text_file):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "empty"
    LlamaForCausalLM(
        LlamaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=0, num_attention_heads=4)
    ).save_pretrained(folder)
    save_tiny_tokenizer = __import__("helpers").tiny_tokenizer()
    save_tiny_tokenizer.save_pretrained(folder)
    code = run(
        "quantize", "gptq", folder, tmp_path / "out", "--group-size", 32, "--dataset", text_file, "--seq-len", 64, "-q"
    )
    assert code == 2
    assert "found no stack of transformer blocks" in capsys.readouterr().err


def test_non_empty_output_is_refused_unless_overwrite(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run("quantize", "rtn", model_dir, out, "--group-size", 32, "-q") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    assert run("quantize", "rtn", model_dir, out, "--group-size", 32, "--overwrite", "-q") == 0
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folders left behind


def test_interrupted_save_leaves_no_output(model_dir, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def broken_save(self, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    assert run("quantize", "rtn", model_dir, tmp_path / "out", "--group-size", 32, "-q") == 130
    assert capsys.readouterr().err == "hfcompress: interrupted; no output was written\n"  # one line, no traceback
    assert os.listdir(tmp_path) == []  # no staging folder, no lock file


def test_console_script_and_optimum_cli(model_dir, tmp_path):
    out = tmp_path / "rtn"
    hfcompress_bin = shutil.which("hfcompress")
    assert hfcompress_bin, "the hfcompress console script is not installed"
    done = subprocess.run(
        [hfcompress_bin, "quantize", "rtn", str(model_dir), str(out), "--group-size", "32", "-q"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").exists()
    optimum_cli = shutil.which("optimum-cli")
    if optimum_cli is None:
        pytest.skip("optimum is not installed")
    out2 = tmp_path / "rtn2"
    done = subprocess.run(
        [optimum_cli, "hfcompress", "quantize", "rtn", str(model_dir), str(out2), "--group-size", "32", "-q"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (out2 / "model.safetensors").exists()
    bad = subprocess.run(
        [optimum_cli, "hfcompress", "quantize", "rtn", str(model_dir), str(out2), "-q"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "optimum-cli hfcompress: error" in bad.stderr
    described = subprocess.run([optimum_cli, "--help"], capture_output=True, text=True).stdout
    described = " ".join(described.split())  # argparse wraps the line
    from hfcompress.commands.cli import command_names

    assert {"recipe", "search", "verify", "build-kernels"} <= set(command_names())
    for name in command_names():  # optimum's one-line description lists every command
        assert name in described, name


def test_help_lists_the_contract():
    done = subprocess.run(
        [sys.executable, "-m", "hfcompress.commands.cli", "quantize", "gptq", "--help"], capture_output=True, text=True
    )
    for flag in [
        "--bits",
        "--group-size",
        "--act-order",
        "--sym",
        "--dataset",
        "--num-samples",
        "--seq-len",
        "--format",
        "--overwrite",
    ]:
        assert flag in done.stdout
