"""Adding a technique is one module and one registration: a toy technique defined outside the package runs
through the Python API, a recipe and the command line (found as an installed plugin), and its checkpoints load
back with `from_pretrained`."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model, token_windows
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.evaluation import bits_per_weight
from hfcompress.recipes import Recipe, RecipeError, run_recipe

sys.path.insert(0, os.path.dirname(__file__))
from toy_technique import ToyConfig, ToyLinear

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_model(folder)
    return folder


def _logits(model):
    with torch.no_grad():
        return model(token_windows(2, 16)).logits


def _toys(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, ToyLinear)]


def test_the_python_api_dispatches_to_the_toy_technique_and_the_checkpoint_reloads(model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    reference = _logits(model)
    hfcompress.quantize(model, ToyConfig())
    assert len(_toys(model)) == 14 and not isinstance(model.lm_head, ToyLinear)  # 2 blocks x 7 linears
    assert 8 <= bits_per_weight(model) < 9  # int8 codes + one fp32 scale per row, from STORED_TENSORS
    logits = _logits(model)
    assert 0 < (logits - reference).abs().max() < 0.05  # quantized, and close
    model.save_pretrained(tmp_path / "toy")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "toy")
    assert _toys(reloaded) == _toys(model)
    torch.testing.assert_close(_logits(reloaded), logits)
    # the generic verb reaches it too, and a bad value is refused by the toy's own config
    assert _toys(hfcompress.compress(AutoModelForCausalLM.from_pretrained(model_dir), ToyConfig(clip=0.9)))
    with pytest.raises(ValueError, match="`clip` must be in"):
        ToyConfig(clip=2)


def test_a_recipe_runs_the_toy_technique_after_a_built_in_one(model_dir, tmp_path):
    recipe = Recipe.from_dict(
        {"steps": [{"prune": {"method": "magnitude", "sparsity": 0.3}}, {"quantize": {"method": "toy", "clip": 0.95}}]}
    )
    run_recipe(recipe, str(model_dir), tmp_path / "out", quiet=True)
    assert sorted(p.name for p in (tmp_path / "out" / "steps").iterdir()) == ["01-prune-magnitude", "02-quantize-toy"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(_toys(model)) == 14
    record = (tmp_path / "out" / "hfcompress_record.json").read_text()
    assert '"toy"' in record and '"clip": 0.95' in record
    # the config list form names it by its config class, and its fields are checked before anything runs
    assert Recipe.from_configs([ToyConfig(clip=0.5)]).to_dict() == {
        "steps": [{"quantize": {"method": "toy", "clip": 0.5, "modules_to_not_convert": None}}]
    }
    with pytest.raises(RecipeError, match="unknown field 'bits'"):
        run_recipe(
            Recipe.from_dict({"steps": [{"quantize": {"method": "toy", "bits": 4}}]}), str(model_dir), tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()


def _install_plugin(folder: Path) -> None:
    """An installed distribution that declares the toy module under the `hfcompress.techniques` entry points."""
    (folder / "toy_technique.py").write_text((HERE / "toy_technique.py").read_text())
    info = folder / "hfcompress_toy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: hfcompress-toy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[hfcompress.techniques]\ntoy = toy_technique\n")


def test_the_command_line_finds_an_installed_toy_technique_and_its_output_loads(model_dir, tmp_path):
    plugin = tmp_path / "site"
    plugin.mkdir()
    _install_plugin(plugin)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "hfcompress.commands.cli"]
    shown = subprocess.run([*command, "quantize", "--help"], env=env, capture_output=True, text=True)
    assert (
        shown.returncode == 0
        and "Toy int8." in shown.stdout
        and "{gptq,rtn,awq,w8a8,bnb,kmeans,vq,toy}" in shown.stdout
    )
    shown = subprocess.run([*command, "quantize", "toy", "--help"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "--clip CLIP" in shown.stdout
    out = tmp_path / "out"
    done = subprocess.run([*command, "quantize", "toy", str(model_dir), str(out), "--clip", "0.9", "-q"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(_toys(model)) == 14
    assert "toy" in (out / "README.md").read_text()
    bad = subprocess.run([*command, "quantize", "toy", str(model_dir), str(tmp_path / "bad"), "--clip", "3"], env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "`clip` must be in (0, 1], got 3.0" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_a_checkpoint_of_an_unknown_technique_says_what_is_missing(tmp_path):
    code = textwrap.dedent(
        f"""
        import hfcompress
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(tmp_path / "toy")!r})
        except ValueError as e:
            print(e)
        """
    )
    model = hfcompress.quantize(AutoModelForCausalLM.from_config(_tiny_config()), ToyConfig())
    model.save_pretrained(tmp_path / "toy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "layers of kind 'toy', which no imported module knows how to rebuild" in done.stdout, done.stderr


def _tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
