"""The knapsack, the sensitivity pass and `hfcompress search` end to end on a tiny model."""

import itertools
import json
import logging
import random

import pytest
import torch
from helpers import run_search, search_files, tiny_model, token_windows
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (loads the candidates)
from hfcompress.commands.cli import main
from hfcompress.core.structure import candidate_linears, linear_weight, set_linear_weight
from hfcompress.recipes.allocation import allocate, grid_bits_per_weight
from hfcompress.recipes.search import Budget, SearchConfig
from hfcompress.recipes.sensitivity import calibration_loss, layer_sensitivity, monotone


def test_knapsack_matches_brute_force_and_respects_the_budget():
    rng = random.Random(0)
    for _ in range(30):
        options = {f"l{i}": [(rng.uniform(1, 10), rng.uniform(0, 5)) for _ in range(3)] for i in range(5)}
        budget = rng.uniform(10, 40)
        best = None
        for combo in itertools.product(range(3), repeat=5):
            cost = sum(options[f"l{i}"][c][0] for i, c in enumerate(combo))
            loss = sum(options[f"l{i}"][c][1] for i, c in enumerate(combo))
            if cost <= budget and (best is None or loss < best):
                best = loss
        picked = allocate(options, budget, resolution=20000)
        if best is None:
            assert picked is None
            continue
        assert sum(options[n][i][0] for n, i in picked.items()) <= budget
        assert sum(options[n][i][1] for n, i in picked.items()) == pytest.approx(best, abs=1e-2)


def test_grid_bits_match_what_a_quantized_layer_stores():
    assert grid_bits_per_weight(4, 128, 1024) == pytest.approx(4.15625)
    assert grid_bits_per_weight(3, -1, 64, sym=True) == pytest.approx(3.25)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_sensitivity_is_the_loss_change_of_each_layer_alone_and_leaves_the_model_as_it_was(arch, caplog):
    caplog.set_level(logging.INFO, logger="hfcompress.recipes.sensitivity")
    model = tiny_model(arch)
    windows = token_windows(4)
    linears = list(candidate_linears(model, None))
    names = [linears[1], linears[-2]]  # one in the first block, one in the last (blocks before it replayed)
    same = {n: linear_weight(model.get_submodule(n)).detach().clone() for n in names}
    noisy = {n: w + 0.5 * torch.randn_like(w) for n, w in same.items()}
    seen = []
    variants = {"same": same, "noisy": noisy}
    results = layer_sensitivity(model, windows, variants, on_result=lambda *a: seen.append(a), measure="loss")
    base = calibration_loss(model, windows)
    for name in names:
        assert results[name]["same"] == pytest.approx(0, abs=1e-6)
        by_hand = tiny_model(arch)
        set_linear_weight(by_hand.get_submodule(name), noisy[name])
        assert results[name]["noisy"] == pytest.approx(calibration_loss(by_hand, windows) - base, abs=1e-5)
        assert torch.equal(linear_weight(model.get_submodule(name)), same[name])
    assert len(seen) == 4
    assert "running the full model" not in caplog.text  # the replayed prefix reproduced the model
    assert layer_sensitivity(model, windows, {"same": same}, done=results) == results  # nothing measured again
    kl = layer_sensitivity(model, windows, variants)  # the default: KL divergence from the model's own outputs
    for name in names:
        assert abs(kl[name]["same"]) < 1e-6 and kl[name]["noisy"] > 1e-5


def test_monotone_sensitivities_never_reward_fewer_bits():
    raw = {"a": {"2bit": 0.5, "3bit": -0.1, "4bit": 0.02}, "b": {"2bit": 0.01, "3bit": 0.03, "4bit": 0.0}}
    assert monotone(raw, ["2bit", "3bit", "4bit"]) == {
        "a": {"2bit": 0.5, "3bit": 0.02, "4bit": 0.02},
        "b": {"2bit": 0.03, "3bit": 0.03, "4bit": 0.0},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return search_files(tmp_path_factory.mktemp("search"))


def test_search_finds_a_model_within_the_budget_and_resumes_from_its_cache(files, tmp_path):
    out = tmp_path / "out"
    assert (
        run_search(files, out, "--budget", "bits=3.8", "--techniques", "gptq,prune", "--prune-sparsities", "0.5") == 0
    )
    results = json.loads((out / "search" / "results.json").read_text())
    chosen = next(p for p in results["points"] if p["name"] == results["chosen"])
    assert chosen["effective_bits"] <= 3.8 + 1e-3 and chosen["meets_budget"]
    eligible = [p for p in results["points"] if p["meets_budget"]]
    assert chosen["perplexity"] == min(p["perplexity"] for p in eligible)
    names = {p["name"] for p in results["points"]}
    assert {"dense", "gptq-2bit", "gptq-3bit", "gptq-4bit", "prune-0.500"} <= names
    assert any(n.startswith("gptq-mixed") for n in names)
    for report in ("pareto.md", "pareto.png", "sensitivity.md", "sensitivity.png"):
        assert (out / "search" / report).is_file()
    cache = json.loads((out / "search" / "cache.json").read_text())
    assert len(cache["scores"]) == 14 and all(len(v) == 3 for v in cache["scores"].values())
    # the chosen model and its recipe are in OUTPUT
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization_config.quant_method == "hfcompress"
    assert "steps:" in (out / "recipe.yaml").read_text()
    mixed = next(p for p in results["points"] if p["name"].startswith("gptq-mixed"))
    assert "layer_bits" in json.dumps(mixed["steps"])

    stamp = (out / "search" / "candidates" / "gptq-3bit" / "model.safetensors").stat().st_mtime
    assert run_search(files, out, "--budget", "bits=3.2", "--techniques", "gptq", "--resume") == 0
    assert (out / "search" / "candidates" / "gptq-3bit" / "model.safetensors").stat().st_mtime == stamp
    results = json.loads((out / "search" / "results.json").read_text())
    assert results["budget"] == "bits=3.2"
    assert next(p for p in results["points"] if p["name"] == results["chosen"])["effective_bits"] <= 3.2 + 1e-3


def test_a_search_for_serving_writes_mixed_compressed_tensors_with_fused_siblings_on_one_width(files, tmp_path):
    out = tmp_path / "out"
    assert run_search(files, out, "--budget", "bits=3.5", "--format", "compressed-tensors") == 0
    results = json.loads((out / "search" / "results.json").read_text())
    assert {p["name"].split("-")[0] for p in results["points"]} == {"dense", "gptq"}  # GPTQ alone by default
    mixed = next(p for p in results["points"] if p["name"].startswith("gptq-mixed"))
    step = mixed["steps"][0]["quantize"]
    assert step["sym"] is True
    widths = {**dict.fromkeys(results_layers(files), step["bits"]), **step.get("layer_bits", {})}
    for block in range(2):
        attention = {widths[f"model.layers.{block}.self_attn.{p}_proj"] for p in "qkv"}
        mlp = {widths[f"model.layers.{block}.mlp.{p}_proj"] for p in ("gate", "up")}
        assert len(attention) == 1 and len(mlp) == 1
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    record = json.loads((out / "hfcompress_record.json").read_text())
    assert (
        record["loading"] == {"requires_hfcompress": False}
        and "import hfcompress" not in (out / "README.md").read_text()
    )
    assert [s["technique"] for s in record["steps"]] == ["quantization", "export"]
    from hfcompress.commands.cli import main

    assert main(["verify", str(out), "-q"]) == 0  # the record's digests are the rewritten files'
    chosen = next(p for p in results["points"] if p["name"] == results["chosen"])
    served = AutoModelForCausalLM.from_pretrained(out)  # plain transformers' compressed-tensors loader
    from transformers import AutoTokenizer

    from hfcompress.data import load_texts, tokenize_windows
    from hfcompress.evaluation import perplexity

    windows = tokenize_windows(AutoTokenizer.from_pretrained(out), load_texts(str(files / "calib.txt")), 64)[:6]
    assert perplexity(served, windows) == pytest.approx(chosen["perplexity"], rel=1e-3)


def results_layers(files) -> list[str]:
    from hfcompress.core.structure import candidate_linears

    return list(candidate_linears(AutoModelForCausalLM.from_pretrained(files / "model"), None))


def test_the_search_sums_hessians_in_the_dtype_it_is_given_as_quantize_does(files, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    args = ["--budget", "bits=4.5", "--techniques", "gptq,prune", "--bits-options", "4", "--prune-sparsities", "0.5"]
    assert run_search(files, out, *args, "--hessian-dtype", "float64") == 0
    results = json.loads((out / "search" / "results.json").read_text())
    steps = {p["name"]: p["steps"][0] for p in results["points"] if p["name"] != "dense"}
    assert steps["gptq-4bit"]["quantize"]["hessian_dtype"] == "float64"
    assert steps["prune-0.500"]["prune"]["hessian_dtype"] == "float64"
    candidate = out / "search" / "candidates" / "gptq-4bit"
    record = json.loads((candidate / "hfcompress_record.json").read_text())
    assert record["steps"][0]["config"]["hessian_dtype"] == "float64"  # what its GPTQ ran with
    quantized = tmp_path / "quantized"
    assert main([
        "quantize", "gptq", str(files / "model"), str(quantized), "--bits", "4", "--group-size", "32",
        "--dataset", str(files / "calib.txt"), "--seq-len", "64", "--num-samples", "8", "--hessian-dtype", "float64",
        "-q",
    ]) == 0  # fmt: skip
    searched, alone = (load_file(folder / "model.safetensors") for folder in (candidate, quantized))
    assert searched.keys() == alone.keys() and all(torch.equal(searched[k], alone[k]) for k in searched)
    with pytest.raises(ValueError, match="`hessian_dtype` must be one of 'float32', 'float64', got 'float16'"):
        SearchConfig(budget="bits=3", dataset="a", eval_dataset="b", hessian_dtype="float16")


def test_compressed_tensors_searches_refuse_techniques_it_cannot_hold():
    with pytest.raises(ValueError, match="use --techniques gptq"):
        SearchConfig(
            budget="bits=3", dataset="a", eval_dataset="b", techniques="gptq,prune", format="compressed-tensors"
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--budget", "bits=1"],
            "budget bits=1 cannot be met with gptq: the smallest reachable point is gptq at 2 bits",
        ),
        (["--budget", "bits"], "--budget must look like bits=3.5"),
        (["--budget", "size=1.5"], "fraction of the original model in (0, 1]"),
        (["--budget", "bits=3", "--techniques", "gptq,awq"], "unknown technique(s) ['awq']"),
        (["--budget", "params=0.5"], "a params= budget needs lowrank or prune"),
        (["--budget", "bits=3", "--sensitivity-samples", "500"], "the sensitivity pass needs sensitivity_samples=500"),
    ],
)
def test_bad_search_input_fails_clearly_and_writes_nothing(files, tmp_path, capsys, extra, message):
    techniques = [] if "--techniques" in extra else ["--techniques", "gptq"]
    assert run_search(files, tmp_path / "out", *extra, *techniques) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_budget_parsing():
    assert Budget.parse("size=0.3") == Budget("size", 0.3)
    with pytest.raises(ValueError, match="needs a number"):
        Budget.parse("bits=x")
    config = SearchConfig(budget="params=0.7", dataset="a.txt", eval_dataset="b.txt", techniques="lowrank,prune")
    assert config.techniques == ["lowrank", "prune"] and config.budget.kind == "params"


def test_window_lengths_default_to_the_model_like_every_other_command():
    from helpers import tiny_model

    from hfcompress.recipes.search import SearchConfig

    config = SearchConfig(budget="bits=3.5", dataset="c.txt", eval_dataset="v.txt")
    config.resolve_windows(tiny_model().config)  # 128 positions: 512 would not fit
    assert (config.seq_len, config.eval_seq_len) == (128, 128)
    too_long = SearchConfig(budget="bits=3.5", dataset="c.txt", eval_dataset="v.txt", seq_len=4096)
    with pytest.raises(ValueError, match="`seq_len` 4096 exceeds the 128 positions"):
        too_long.resolve_windows(tiny_model().config)
