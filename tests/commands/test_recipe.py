"""`hfcompress recipe`: validation before any work, step folders, resume, and the combinations being correct."""

import json
import time

import pytest
import torch
from helpers import tiny_model, tiny_tokenizer
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.commands.cli import main
from hfcompress.quantization import QuantLinear
from hfcompress.quantization.sparse_quant import SparseQuantLinear
from hfcompress.recipes import Recipe, RecipeError, run_recipe, validate_recipe


def run(*argv):
    return main([str(a) for a in argv])


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_prune_factorize_quantize_chain_is_correct_and_resumable(model_dir, text_file, tmp_path, caplog):
    recipe = write(
        tmp_path / "r.yaml",
        f"""
steps:
  - prune: {{method: sparsegpt, sparsity: 0.3, num_samples: 8, seq_len: 64}}
  - factorize: {{param_ratio: 0.85, method: whiten, num_samples: 8, seq_len: 64, sensitivity_samples: 2}}
  - quantize: {{method: gptq, bits: 4, group_size: 32, num_samples: 8, seq_len: 64}}
dataset: {text_file}
""",
    )
    out = tmp_path / "out"
    assert run("recipe", recipe, model_dir, out, "-q") == 0
    steps = sorted(p.name for p in (out / "steps").iterdir())
    assert steps == ["01-prune-sparsegpt", "02-factorize-whiten", "03-quantize-gptq"]
    record = json.loads((out / "hfcompress_record.json").read_text())
    assert [s["technique"] for s in record["steps"]] == ["pruning", "factorization", "quantization"]
    assert record["command"].startswith("hfcompress recipe")
    assert "factorization" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out)
    qconfig = model.config.quantization_config
    assert qconfig.lowrank and any(name.endswith(".up") for name in qconfig.modules)  # GPTQ ran on the factors
    assert isinstance(model.get_submodule(next(n for n in qconfig.modules if n.endswith(".down"))), QuantLinear)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()

    # resume: unchanged steps are reused; a changed last step runs again alone
    mtimes = {p.name: (p / "recipe_step.json").stat().st_mtime for p in (out / "steps").iterdir()}
    time.sleep(0.01)
    write(recipe, recipe.read_text().replace("bits: 4, group_size: 32", "bits: 3, group_size: 32"))
    assert run("recipe", recipe, model_dir, out, "--resume", "-q") == 0
    after = {p.name: (p / "recipe_step.json").stat().st_mtime for p in (out / "steps").iterdir()}
    assert after["01-prune-sparsegpt"] == mtimes["01-prune-sparsegpt"]
    assert after["02-factorize-whiten"] == mtimes["02-factorize-whiten"]
    assert after["03-quantize-gptq"] > mtimes["03-quantize-gptq"]
    assert AutoModelForCausalLM.from_pretrained(out).config.quantization_config.bits == 3


def test_pruned_then_quantized_checkpoint_shows_both_savings(model_dir, text_file, tmp_path):
    both = run_recipe(
        Recipe.from_dict({"steps": [{"prune": {"method": "magnitude", "sparsity": 0.5}},
                                    {"quantize": {"method": "rtn", "bits": 4, "group_size": 32}}]}),
        str(model_dir), tmp_path / "both", quiet=True,
    )  # fmt: skip
    alone = run_recipe([hfcompress.RTNConfig(bits=4, group_size=32)], str(model_dir), tmp_path / "alone", quiet=True)
    assert (both / "model.safetensors").stat().st_size < (alone / "model.safetensors").stat().st_size
    model = AutoModelForCausalLM.from_pretrained(both)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, SparseQuantLinear)
    assert float((layer.dequantize_weight(torch.float32) == 0).float().mean()) >= 0.5


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "steps: [{quantize: {method: gptq, bits: 4, grup_size: 128}}]",
            "step 1 (quantize-gptq): unknown field 'grup_size'",
        ),
        ("steps: [{quantize: {method: rtn, bits: 5}}]", "step 1 (quantize-rtn): `bits` must be one of"),
        ("steps: [{quantize: {method: squeezellm}}]", "step 1 (quantize): `method` must be one of gptq, rtn, awq"),
        ("steps: [{quantize: {method: gptq}}]", "step 1 (quantize-gptq) needs data"),
        ("steps: [{sparsify: {}}]", "step 1: unknown technique 'sparsify'"),
        ("steps: [{prune: {sparsity: 1.5}}]", "step 1 (prune-magnitude): `sparsity` must be in [0, 1)"),
        ("steps: [{factorize: {rank: eight, method: svd}}]", "step 1 (factorize-svd): `rank` must be an integer"),
        (
            "steps: [{quantize: {method: rtn}}, {prune: {sparsity: 0.5}}]",
            "step 2 (prune-magnitude) comes after step 1 (quantize)",
        ),
        ("steps: [{factorize: {rank: 8, method: svd}}, {prune: {sparsity: 0.5}}]", "would prune the factors"),
        (
            "steps: [{factorize: {rank: 8, method: svd}}, {quantize: {method: rtn, format: compressed-tensors}}]",
            "step 2 (quantize-rtn): format compressed-tensors cannot hold the factorized layers of step 1",
        ),
        (
            "steps: [{prune: {sparsity: 0.5}}, {distill: {student_layers: 1}}]\ndataset: org/texts",
            "distillation must be the first step",
        ),
        ("steps: [{quantize: {method: rtn}}]\nseed: 3", "unknown recipe keys ['seed']"),
        ("steps: []", "`steps:` must be a non-empty list"),
    ],
)
def test_bad_recipes_fail_in_the_first_second_and_write_nothing(model_dir, tmp_path, capsys, text, message):
    recipe = write(tmp_path / "r.yaml", text)
    start = time.perf_counter()
    assert run("recipe", recipe, model_dir, tmp_path / "out", "-q") == 2
    assert time.perf_counter() - start < 5
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_in_the_way_is_refused_unless_resume_or_overwrite(model_dir, tmp_path, capsys):
    recipe = write(tmp_path / "r.yaml", "steps: [{quantize: {method: rtn, group_size: 32}}]")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert run("recipe", recipe, model_dir, out, "-q") == 2
    assert "--resume" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep me"
    assert run("recipe", recipe, model_dir, out, "--resume", "-q") == 2
    assert "holds no recipe steps" in capsys.readouterr().err


def test_python_configs_make_the_same_recipe(text_file):
    configs = [
        hfcompress.OneShotPruningConfig(method="wanda", sparsity=0.4, dataset=str(text_file)),
        hfcompress.GPTQConfig(bits=3, group_size=32, dataset=str(text_file)),
    ]
    recipe = Recipe.from_configs(configs)
    assert [s.name for s in recipe.steps] == ["prune-wanda", "quantize-gptq"]
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    validate_recipe(recipe)
    with pytest.raises(RecipeError, match="must be a path or dataset name"):
        Recipe.from_configs([hfcompress.GPTQConfig(dataset=["some", "texts"])])


def test_lora_merge_then_quantize_equals_merging_then_quantizing_by_hand(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    adapted.save_pretrained(tmp_path / "adapter")
    steps = [{"merge_lora": {"adapter": str(tmp_path / "adapter")}}, {"quantize": {"method": "rtn", "group_size": 32}}]
    out = run_recipe(Recipe.from_dict({"steps": steps}), str(model_dir), tmp_path / "out", quiet=True)
    by_hand = hfcompress.merge_lora(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter")
    hfcompress.quantize(by_hand, hfcompress.RTNConfig(group_size=32))
    ids = torch.tensor([[5, 9, 30, 7, 2]])
    with torch.no_grad():
        expected = by_hand(ids).logits
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(out)(ids).logits, expected, rtol=1e-3, atol=1e-3
        )
    record = json.loads((out / "hfcompress_record.json").read_text())
    assert [s["technique"] for s in record["steps"]] == ["lora-merge", "quantization"]


def test_distill_then_quantize_quantizes_the_student(model_dir, text_file, tmp_path):
    steps = [
        {
            "distill": {
                "student_layers": 1,
                "max_steps": 2,
                "batch_size": 2,
                "seq_len": 32,
                "max_windows": 8,
                "cpu": True,
            }
        },
        {"quantize": {"method": "rtn", "bits": 8, "group_size": 32}},
    ]
    out = run_recipe(
        Recipe.from_dict({"steps": steps, "dataset": str(text_file)}), str(model_dir), tmp_path / "o", quiet=True
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 1
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    record = json.loads((out / "hfcompress_record.json").read_text())
    assert [s["technique"] for s in record["steps"]] == ["distillation", "quantization"]


def test_a_recipe_that_fails_midway_leaves_output_as_it_was(model_dir, tmp_path):
    out = tmp_path / "out"
    run_recipe([hfcompress.RTNConfig(bits=4, group_size=32)], str(model_dir), out, quiet=True)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # validation passes (a group size is a valid number); the run fails at step 2 (48 divides no layer)
    failing = Recipe.from_dict(
        {
            "steps": [
                {"prune": {"method": "magnitude", "sparsity": 0.3}},
                {"quantize": {"method": "rtn", "group_size": 48}},
            ]
        }
    )
    with pytest.raises(ValueError, match="group_size"):
        run_recipe(failing, str(model_dir), out, overwrite=True, quiet=True)
    with pytest.raises(ValueError, match="group_size"):  # a resume that fails keeps the old recipe.yaml too
        run_recipe(failing, str(model_dir), out, resume=True, quiet=True)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "02-" not in str(p)}
    assert {k: v for k, v in after.items() if not str(k).startswith("steps/01-prune")} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder, no lock file


def test_relative_paths_in_a_recipe_file_are_relative_to_its_folder(text_file, tmp_path, monkeypatch):
    recipes = tmp_path / "project" / "recipes"
    recipes.mkdir(parents=True)
    (recipes / "data").mkdir()
    (recipes / "data" / "calib.txt").write_bytes(text_file.read_bytes())
    path = write(recipes / "r.yaml", "steps:\n  - quantize: {method: gptq, bits: 4}\ndataset: data/calib.txt\n"
                 "eval_dataset: wikitext\n")  # fmt: skip
    monkeypatch.chdir(tmp_path)  # run from elsewhere: the path is the recipe's, not the current folder's
    recipe = Recipe.from_yaml("project/recipes/r.yaml")
    assert recipe.dataset == str(recipes / "data" / "calib.txt")
    assert recipe.eval_dataset == "wikitext"  # no such path beside the recipe: a Hub dataset name
    assert Recipe.from_yaml(path).dataset == recipe.dataset


def test_the_python_run_holds_the_checkpoints_dtype_as_the_command_does(tmp_path, monkeypatch):
    import hfcompress.steps.compress as compress_step

    folder = tmp_path / "bf16"
    tiny_model().to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    held = []
    load_model = compress_step.load_model

    def loaded(*args, **kwargs):
        model = load_model(*args, **kwargs)
        held.append(model.model.norm.weight.dtype)
        return model

    monkeypatch.setattr(compress_step, "load_model", loaded)
    out = run_recipe([hfcompress.RTNConfig(bits=4, group_size=32)], str(folder), tmp_path / "out", quiet=True)
    assert held == [torch.bfloat16]  # not float32's twice the memory
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
