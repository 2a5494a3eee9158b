"""Mixture-of-experts models streamed from disk. Their checkpoints store each expert's projections as tensors of
their own (Mixtral under other names too, Qwen2-MoE beside a shared expert, DeepSeek-V3 after a dense block) or
fused (GPT-OSS, transposed, with biases), which loading converts into 3-D tensors (`core.stored_layout`); streamed,
each block's experts are read as one linear each and the run writes what the run in memory writes (experts left
plain in the original checkpoint's layout, as `save_pretrained` writes them)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import failing_at_write, read_safetensors, save_sharded_model, token_windows
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (from_pretrained reads hfcompress checkpoints)
from hfcompress.core.streaming import ShardedCheckpoint, tied_keys
from hfcompress.evaluation import perplexity, streamed_perplexity
from hfcompress.io import partial_dir
from hfcompress.lowrank import LowRankConfig
from hfcompress.pruning import OneShotPruningConfig
from hfcompress.quantization import AWQConfig, GPTQConfig, KMeansConfig, RTNConfig
from hfcompress.steps import OutputOptions, compress_folder

ARCHS = ["mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {arch: save_sharded_model(root / arch, arch) for arch in [*ARCHS, "llama"]}


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_the_layout_makes_what_loading_makes(models, arch):
    checkpoint = ShardedCheckpoint(models[arch])
    skeleton = checkpoint.skeleton(dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.float32).state_dict()
    assert checkpoint.layout.targets() == set(loaded) - tied_keys(skeleton)
    # Mixtral's experts are renamed and stacked; GPT-OSS stores them fused, under the model's names
    assert checkpoint.layout.is_identity() == (arch == "gpt_oss")
    names = [n for n in loaded if ".layers.1." in n]
    made = checkpoint.layout.read(names, checkpoint.read, torch.float32)
    assert made.keys() == set(names)
    for name in names:
        assert made[name].dtype == torch.float32 and torch.equal(made[name], loaded[name]), name
    # an expert's slice made from its own stored tensors (Mixtral stores one per expert; GPT-OSS, fused, cannot)
    fused = "model.layers.1.mlp.experts.gate_up_proj"
    part = checkpoint.layout.read_part(fused, 3, 8, checkpoint.read, torch.float32)
    assert part is None if arch == "gpt_oss" else torch.equal(part, loaded[fused][3])


def test_a_checkpoint_stored_under_the_models_names_reads_as_it_is(models):
    checkpoint = ShardedCheckpoint(models["llama"])
    checkpoint.skeleton()
    assert checkpoint.layout.is_identity()


DENSE = "re:.*experts.*"
CONFIGS = {
    "gptq": lambda: GPTQConfig(bits=4, group_size=32, dataset=token_windows(8, 32)),
    "rtn": lambda: RTNConfig(bits=4, group_size=32),
    "rtn-experts-dense": lambda: RTNConfig(bits=4, group_size=32, modules_to_not_convert=[DENSE]),
    "gptq-compensated-experts-dense": lambda: GPTQConfig(
        bits=4, group_size=32, dataset=token_windows(4, 16), lowrank_compensation=2, modules_to_not_convert=[DENSE]
    ),
    "wanda": lambda: OneShotPruningConfig(method="wanda", sparsity=0.5, dataset=token_windows(4, 16)),
    "magnitude-experts-dense": lambda: OneShotPruningConfig(method="magnitude", sparsity=0.5),
    "svd": lambda: LowRankConfig(method="svd", param_ratio=0.6, allocation="uniform"),
    "awq-gptq": lambda: AWQConfig(bits=3, group_size=32, n_grid=2, dataset=token_windows(4, 16), weights="gptq"),
    "kmeans": lambda: KMeansConfig(bits=3, iters=4),
}
CASES = [
    ("mixtral", "wanda"),
    ("mixtral", "svd"),
    ("mixtral", "awq-gptq"),  # two passes: the first writes its experts fused, the second reads them back
    ("mixtral", "rtn-experts-dense"),
    ("mixtral", "gptq-compensated-experts-dense"),
    (
        "qwen2_moe",
        "magnitude-experts-dense",
    ),  # pruned, stored as plain weights  # the shards rewritten with the corrections, experts read back
    ("qwen2_moe", "gptq"),
    ("gpt_oss", "rtn"),
    ("deepseek_v3", "kmeans"),
]


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_streaming_writes_what_memory_writes(models, tmp_path, arch, method):
    step = {"storage": "dense"} if method.startswith("magnitude") else {}
    memory = compress_folder(models[arch], tmp_path / "memory", CONFIGS[method](), **step)
    disk = compress_folder(models[arch], tmp_path / "disk", CONFIGS[method](), OutputOptions(offload="disk"), **step)
    config = json.loads((disk / "config.json").read_text())
    assert config == json.loads((memory / "config.json").read_text())
    record = json.loads((disk / "hfcompress_record.json").read_text())
    assert record["steps"][-1]["config"]["offload"] == "disk"
    expected, streamed = read_safetensors(memory), read_safetensors(disk)
    held = (config.get("quantization_config") or {}).get("experts")
    if method.endswith("experts-dense"):
        # the experts stay plain: written as transformers saves them, in the original checkpoint's layout (one
        # tensor per expert; Mixtral's under `block_sparse_moe.`, its router too)
        assert not held and any(".experts.3." in key for key in streamed)
        assert not any(key.endswith(("experts.gate_up_proj", "experts.down_proj")) for key in streamed)
        assert arch != "mixtral" or not any(".mlp." in key for key in streamed)
        assert any(key.endswith(".up.weight") for key in streamed) == ("compensated" in method)
    else:  # each expert a compressed layer of its own
        assert held and not any(key.endswith("mlp.experts.gate_up_proj") for key in streamed)
    assert streamed.keys() == expected.keys()
    for key, tensor in expected.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key], tensor), key
    ids = token_windows(2, 16)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(disk, dtype=torch.float32)(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def test_streamed_perplexity_of_a_mixture_of_experts(models, tmp_path):
    """Dense, the fused experts run as transformers runs them; quantized, each expert's packed linear."""
    windows = token_windows(4, 16)
    folder = models["gpt_oss"]
    whole = perplexity(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), windows)
    assert streamed_perplexity(folder, windows) == pytest.approx(whole, rel=1e-4)  # float16 shards, float32 maths
    out = compress_folder(folder, tmp_path / "out", CONFIGS["rtn"](), OutputOptions(offload="disk"))
    loaded = perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), windows)
    streamed = streamed_perplexity(out, windows)
    assert streamed == pytest.approx(loaded, rel=1e-4) and streamed != pytest.approx(whole, rel=1e-4)


def test_a_killed_run_resumes_to_the_same_experts(models, tmp_path):
    """Killed after the first block, the run resumes on a skeleton whose written experts are rebuilt from the
    progress file, and writes what an uninterrupted run writes."""
    config = GPTQConfig(bits=4, group_size=32, dataset=token_windows(4, 16))
    whole = compress_folder(models["qwen2_moe"], tmp_path / "whole", config, OutputOptions(offload="disk"))
    with failing_at_write(2), pytest.raises(RuntimeError, match="killed"):
        compress_folder(models["qwen2_moe"], tmp_path / "out", config, OutputOptions(offload="disk"))
    assert json.loads((partial_dir(tmp_path / "out") / "hfcompress_progress.json").read_text())["blocks_done"] == 1
    resumed = compress_folder(models["qwen2_moe"], tmp_path / "out", config, OutputOptions(offload="disk", resume=True))
    expected, written = read_safetensors(whole), read_safetensors(resumed)
    assert written.keys() == expected.keys() and all(torch.equal(written[k], v) for k, v in expected.items())
    assert json.loads((resumed / "config.json").read_text()) == json.loads((whole / "config.json").read_text())
