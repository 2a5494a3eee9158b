"""One-shot pruning with `--offload disk`: streamed block by block from the shards, it writes exactly what the run
in memory writes, and a run that fails midway resumes to the same output."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (registers the checkpoint format)
from hfcompress.io import partial_dir
from hfcompress.pruning import OneShotPruningConfig
from hfcompress.steps import OutputOptions, compress_folder
from tests.helpers import failing_at_shard, read_safetensors, save_sharded_model, token_windows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruning-streaming")
    return {arch: str(save_sharded_model(root / arch, arch)) for arch in ("llama", "gpt2")}


CONFIGS = {
    "magnitude": lambda: OneShotPruningConfig(method="magnitude", sparsity=0.5),
    "wanda": lambda: OneShotPruningConfig(method="wanda", sparsity=0.6, dataset=token_windows(8, 32)),
    "sparsegpt-2:4": lambda: OneShotPruningConfig(method="sparsegpt", pattern="2:4", dataset=token_windows(8, 32)),
}
CASES = [
    ("llama", "magnitude", "bitmask"),
    ("llama", "wanda", "bitmask"),
    ("llama", "sparsegpt-2:4", "bitmask"),
    ("llama", "sparsegpt-2:4", "dense"),
    ("gpt2", "sparsegpt-2:4", "bitmask"),  # Conv1D layers, tied embeddings
]


@pytest.mark.parametrize(("arch", "method", "storage"), CASES)
def test_streamed_pruning_writes_what_memory_writes(models, tmp_path, arch, method, storage):
    config = CONFIGS[method]()
    memory = compress_folder(models[arch], tmp_path / "memory", config, storage=storage)
    disk = compress_folder(models[arch], tmp_path / "disk", config, OutputOptions(offload="disk"), storage=storage)

    expected, streamed = read_safetensors(memory), read_safetensors(disk)
    assert streamed.keys() == expected.keys()
    for key, tensor in expected.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key], tensor), key
    bitmasks = [key for key in streamed if key.endswith(".weight_bitmask")]
    assert bool(bitmasks) == (storage == "bitmask" and arch == "llama")  # GPT-2's Conv1D layers stay dense
    assert json.loads((disk / "config.json").read_text()) == json.loads((memory / "config.json").read_text())
    step = json.loads((disk / "hfcompress_record.json").read_text())["steps"][-1]
    assert step["config"]["offload"] == "disk" and step["method"] == config.method

    ids = token_windows(2, 16)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(memory)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(disk)(ids).logits
    assert torch.equal(a, b)
    name = "model.layers.0.mlp.down_proj" if arch == "llama" else "transformer.h.0.mlp.c_proj"
    layer = AutoModelForCausalLM.from_pretrained(disk).get_submodule(name)
    weight = layer.dense_weight() if storage == "bitmask" and arch == "llama" else layer.weight
    assert (weight == 0).float().mean() >= 0.5


def test_a_streamed_pruning_that_failed_midway_resumes_to_the_same_output(models, tmp_path):
    config = CONFIGS["sparsegpt-2:4"]()
    whole = compress_folder(models["llama"], tmp_path / "whole", config, OutputOptions(offload="disk"))

    output = tmp_path / "failed"
    with failing_at_shard(1), pytest.raises(RuntimeError, match="killed"):
        compress_folder(models["llama"], output, config, OutputOptions(offload="disk"))
    assert not output.exists()
    progress = json.loads((partial_dir(output) / "hfcompress_progress.json").read_text())
    assert progress["blocks_done"] == 1 and all(isinstance(n, int) for n in progress["layers"].values())

    resumed = compress_folder(models["llama"], output, config, OutputOptions(offload="disk", resume=True))
    expected, written = read_safetensors(whole), read_safetensors(resumed)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[key], tensor) for key, tensor in expected.items())
    assert (resumed / "config.json").read_bytes() == (whole / "config.json").read_bytes()


def test_a_model_with_two_stacks_to_calibrate_is_refused_before_any_work(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        decoder_start_token_id=0,
    )  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    from hfcompress.pruning.streaming import prune_streaming

    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="calibrates one stack of blocks"):
        prune_streaming(tmp_path / "t5", tmp_path / "out", CONFIGS["wanda"](), task="base")
    assert not any((tmp_path / "out").iterdir())
