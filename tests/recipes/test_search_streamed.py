"""`hfcompress search --offload disk`: the GPTQ search on a model streamed from its shards, against the same search
on the model loaded whole."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_search, search_files
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (loads the candidates)
from hfcompress.data import load_texts, tokenize_windows
from hfcompress.evaluation import perplexity
from hfcompress.quantization.modules import QuantLinear
from hfcompress.steps.loading import load_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return search_files(tmp_path_factory.mktemp("streamed-search"), sharded=True)


def _search(files, out, *extra):
    return run_search(files, out, "--techniques", "gptq", *extra)


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_a_streamed_search_picks_and_writes_what_the_whole_models_search_builds(files, tmp_path):
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    assert _search(files, whole, "--budget", "bits=3.2", "--offload", "none") == 0
    assert _search(files, streamed, "--budget", "bits=3.2", "--offload", "disk") == 0

    expected = _json(whole / "search" / "cache.json")["scores"]
    scores = _json(streamed / "search" / "cache.json")["scores"]
    assert scores.keys() == expected.keys() and len(scores) == 14
    for name, row in expected.items():
        assert scores[name] == pytest.approx(row, rel=1e-3), name

    results = _json(streamed / "search" / "results.json")
    assert results["evaluated"] is True and results["chosen"] == "gptq-mixed-3.20"
    assert results["peak_memory"]["peak_rss_bytes"] > 10**8  # Python with torch, at least
    original, point = results["points"]
    in_memory = {p["name"]: p for p in _json(whole / "search" / "results.json")["points"]}
    mixed = in_memory["gptq-mixed-3.20"]
    assert point["steps"] == mixed["steps"]  # the same widths per layer
    assert point["effective_bits"] <= 3.2 + 1e-3 and point["meets_budget"]
    assert abs(point["effective_bits"] - mixed["effective_bits"]) < 1e-6  # counted on the written skeleton
    assert abs(point["planned_bits"] - point["effective_bits"]) < 1e-6
    # the evaluations streamed from disk: the original model's is the in-memory search's, and the written model's
    # is what it gives loaded whole
    assert original["perplexity"] == pytest.approx(in_memory["dense"]["perplexity"], rel=1e-4)
    assert original["size_bytes"] == in_memory["dense"]["size_bytes"] and not original["meets_budget"]
    windows = tokenize_windows(load_tokenizer(str(streamed)), load_texts(str(files / "calib.txt")), 64)[:6]
    loaded = perplexity(AutoModelForCausalLM.from_pretrained(streamed), windows)
    assert point["perplexity"] == pytest.approx(loaded, rel=1e-4)
    assert point["perplexity"] == pytest.approx(mixed["perplexity"], rel=0.05)  # codes agree on over 99%
    allocation = (streamed / "search" / "allocation.md").read_text()
    assert f"{point['perplexity']:.4f}" in allocation and f"{original['perplexity']:.4f}" in allocation
    assert (streamed / "search" / "sensitivity.md").is_file() and "steps:" in (streamed / "recipe.yaml").read_text()
    assert not any((streamed / "search" / "candidates").iterdir())  # moved into OUTPUT

    built = AutoModelForCausalLM.from_pretrained(whole / "search" / "candidates" / "gptq-mixed-3.20")
    written = AutoModelForCausalLM.from_pretrained(streamed)
    assert _json(streamed / "hfcompress_record.json")["steps"][-1]["config"]["offload"] == "disk"
    layers = {n: m for n, m in written.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        reference = built.get_submodule(name)
        assert layer.bits == reference.bits, name
        same = (layer.codes() == reference.codes()).float().mean()
        assert same > 0.99, (name, float(same))  # float16 shards read in float32 against the float32 load


def test_a_streamed_search_writes_compressed_tensors_evaluated_before_the_rewrite(files, tmp_path):
    pytest.importorskip("compressed_tensors")
    from hfcompress.commands.cli import main
    from hfcompress.evaluation import weights_size_bytes

    out = tmp_path / "out"
    assert _search(files, out, "--budget", "bits=3.5", "--offload", "disk", "--format", "compressed-tensors") == 0
    assert _json(out / "config.json")["quantization_config"]["quant_method"] == "compressed-tensors"
    record = _json(out / "hfcompress_record.json")
    assert [s["technique"] for s in record["steps"]] == ["quantization", "export"]
    assert record["loading"] == {"requires_hfcompress": False} and record["command"].count("hfcompress search") == 1
    assert main(["verify", str(out), "-q"]) == 0  # the record's digests are the rewritten files'
    point = _json(out / "search" / "results.json")["points"][1]
    assert point["size_bytes"] == weights_size_bytes(out)
    # streamed from the hfcompress shards before the rewrite: what transformers gives on the rewritten files
    windows = tokenize_windows(load_tokenizer(str(out)), load_texts(str(files / "calib.txt")), 64)[:6]
    loaded = perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), windows)
    assert point["perplexity"] == pytest.approx(loaded, rel=1e-3)
    assert sorted(p.name for p in (out / "search" / "candidates").iterdir()) == []
    assert "steps:" in (out / "recipe.yaml").read_text() and len(list(out.glob("model*.safetensors"))) > 1


def test_a_streamed_search_resumes_from_its_sensitivities_with_another_budget(files, tmp_path, caplog):
    out = tmp_path / "out"
    assert _search(files, out, "--budget", "bits=3.2", "--offload", "auto", "--max-memory", "1KB") == 0
    first = _json(out / "search" / "results.json")
    assert first["offload"] == "disk"  # auto streamed: the model would not fit in 1KB
    seconds = _json(out / "search" / "cache.json")["seconds"]
    before = sorted(p.name for p in out.iterdir())

    assert _search(files, out, "--budget", "bits=2.6", "--offload", "disk", "--resume") == 0
    results = _json(out / "search" / "results.json")
    assert results["budget"] == "bits=2.6" and results["points"][1]["effective_bits"] <= 2.6 + 1e-3
    again = _json(out / "search" / "cache.json")["seconds"]
    assert again["streamed_scores"] == seconds["streamed_scores"]  # not measured again
    assert results["points"][0] == first["points"][0]  # nor the original model's perplexity
    assert results["points"][1]["perplexity"] != first["points"][1]["perplexity"]  # the new model evaluated
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier model replaced, no stale shard left
    model = AutoModelForCausalLM.from_pretrained(out)
    widths = {m.bits for m in model.modules() if isinstance(m, QuantLinear)}
    assert widths == {2, 3} or widths == {2, 4}
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--techniques", "gptq,prune"], "--offload disk searches GPTQ widths per layer only"),
    ],
)
def test_a_streamed_search_refuses_what_it_cannot_do_and_writes_nothing(files, tmp_path, capsys, extra, message):
    assert _search(files, tmp_path / "out", "--budget", "bits=3", "--offload", "disk", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_auto_streams_only_a_model_that_would_not_fit_and_loads_whole_what_cannot_stream(files, caplog):
    from hfcompress.recipes.search import SearchConfig
    from hfcompress.recipes.search_streamed import should_stream_search

    model = str(files / "model")
    gptq = SearchConfig(budget="bits=3", dataset="calib.txt", eval_dataset="calib.txt", techniques="gptq")
    assert should_stream_search(model, gptq, "auto", "1KB") and not should_stream_search(model, gptq, "auto", "1GB")
    assert not should_stream_search(model, gptq, "none", "1KB")
    every = SearchConfig(budget="bits=3", dataset="calib.txt", eval_dataset="calib.txt")
    with caplog.at_level("WARNING"):
        assert not should_stream_search(model, every, "auto", "1KB")
    assert "--offload disk searches GPTQ widths per layer only" in caplog.text and "loading it whole" in caplog.text
    with pytest.raises(ValueError, match="--max-memory must be a size like 16GB"):
        should_stream_search(model, gptq, "auto", "lots")
