"""Factorization with `--offload disk`: streamed block by block from the shards, it writes exactly what the run in
memory writes; a run that fails midway resumes to the same output; what cannot stream is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (registers the checkpoint format)
from hfcompress.io import partial_dir
from hfcompress.lowrank import LowRankConfig
from hfcompress.steps import OutputOptions, compress_folder
from tests.helpers import failing_at_shard, read_safetensors, save_sharded_model, token_windows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowrank-streaming")
    return {arch: str(save_sharded_model(root / arch, arch)) for arch in ("llama", "gpt2")}


CONFIGS = {
    "svd-uniform": lambda: LowRankConfig(method="svd", param_ratio=0.6, allocation="uniform"),
    "svd-energy": lambda: LowRankConfig(method="svd", energy=0.9),
    "whiten-rank": lambda: LowRankConfig(method="whiten", rank=8, dataset=token_windows(8, 32)),
    "asvd-uniform-parallel": lambda: LowRankConfig(
        method="asvd", param_ratio=0.6, allocation="uniform", sequential=False, dataset=token_windows(8, 32)
    ),
}
CASES = [("llama", name) for name in CONFIGS] + [("gpt2", "whiten-rank")]  # GPT-2: Conv1D layers, tied embeddings


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_streamed_factorization_writes_what_memory_writes(models, tmp_path, arch, method):
    config = CONFIGS[method]()
    memory = compress_folder(models[arch], tmp_path / "memory", config)
    disk = compress_folder(models[arch], tmp_path / "disk", config, OutputOptions(offload="disk"))

    expected, streamed = read_safetensors(memory), read_safetensors(disk)
    assert streamed.keys() == expected.keys()
    assert any(key.endswith(".up.weight") for key in streamed), "nothing was factorized"
    for key, tensor in expected.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key], tensor), key
    assert json.loads((disk / "config.json").read_text()) == json.loads((memory / "config.json").read_text())
    record = json.loads((disk / "hfcompress_record.json").read_text())
    expected_record = json.loads((memory / "hfcompress_record.json").read_text())
    assert record["steps"][-1]["config"]["ranks"] == expected_record["steps"][-1]["config"]["ranks"]
    assert record["metrics"]["after"]["parameters"] == expected_record["metrics"]["after"]["parameters"]

    ids = token_windows(2, 16)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(memory)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(disk)(ids).logits
    assert torch.equal(a, b)


def test_a_streamed_factorization_that_failed_midway_resumes_to_the_same_output(models, tmp_path):
    config = CONFIGS["whiten-rank"]()
    whole = compress_folder(models["llama"], tmp_path / "whole", config, OutputOptions(offload="disk"))

    output = tmp_path / "failed"
    with failing_at_shard(1), pytest.raises(RuntimeError, match="killed"):
        compress_folder(models["llama"], output, config, OutputOptions(offload="disk"))
    progress = json.loads((partial_dir(output) / "hfcompress_progress.json").read_text())
    assert progress["blocks_done"] == 1 and set(progress["layers"].values()) == {8}

    resumed = compress_folder(models["llama"], output, config, OutputOptions(offload="disk", resume=True))
    expected, written = read_safetensors(whole), read_safetensors(resumed)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[key], tensor) for key, tensor in expected.items())
    assert (resumed / "config.json").read_bytes() == (whole / "config.json").read_bytes()


def test_sensitivity_allocation_is_refused_before_any_work_or_loaded_whole_with_auto(models, tmp_path, caplog):
    import logging

    config = LowRankConfig(method="whiten", param_ratio=0.6, dataset=token_windows(8, 32))  # sensitivity: the default
    with pytest.raises(ValueError, match="cannot allocate ranks by sensitivity"):
        compress_folder(models["llama"], tmp_path / "out", config, OutputOptions(offload="disk"))
    assert not any(tmp_path.iterdir())
    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        out = compress_folder(models["llama"], tmp_path / "auto", config, OutputOptions(max_memory="10KB"))
    assert any("loading it whole" in r.getMessage() and "sensitivity" in r.getMessage() for r in caplog.records)
    assert (out / "model.safetensors").is_file()
