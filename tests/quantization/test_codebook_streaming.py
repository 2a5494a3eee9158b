"""k-means and VQ with `--offload disk`: streamed block by block from the shards, they write exactly what the run in
memory writes, and a run that fails midway resumes to the same output."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (registers the checkpoint format)
from hfcompress.io import partial_dir
from hfcompress.quantization.codebook_config import KMeansConfig, VQConfig
from hfcompress.steps import OutputOptions, compress_folder
from tests.helpers import failing_at_shard, read_safetensors, save_sharded_model, token_windows


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_sharded_model(tmp_path_factory.mktemp("codebook-streaming") / "llama", "llama"))


CONFIGS = {
    "kmeans": lambda: KMeansConfig(bits=3, iters=4),
    "kmeans-calibrated": lambda: KMeansConfig(bits=3, iters=4, dataset=token_windows(8, 32)),
    "vq-calibrated": lambda: VQConfig(bits=2, dim=2, groups=4, iters=4, dataset=token_windows(8, 32)),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_streamed_codebooks_are_those_of_the_run_in_memory(model, tmp_path, method):
    config = CONFIGS[method]()
    memory = compress_folder(model, tmp_path / "memory", config)
    disk = compress_folder(model, tmp_path / "disk", config, OutputOptions(offload="disk"))

    expected, streamed = read_safetensors(memory), read_safetensors(disk)
    assert streamed.keys() == expected.keys()
    assert any(key.endswith(".weight_codebook") for key in streamed)
    for key, tensor in expected.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key], tensor), key
    assert json.loads((disk / "config.json").read_text()) == json.loads((memory / "config.json").read_text())

    ids = token_windows(2, 16)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(memory)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(disk)(ids).logits
    assert torch.equal(a, b)


def test_a_streamed_codebook_run_that_failed_midway_resumes_to_the_same_output(model, tmp_path):
    config = CONFIGS["vq-calibrated"]()
    whole = compress_folder(model, tmp_path / "whole", config, OutputOptions(offload="disk"))

    output = tmp_path / "failed"
    with failing_at_shard(1), pytest.raises(RuntimeError, match="killed"):
        compress_folder(model, output, config, OutputOptions(offload="disk"))
    layers = json.loads((partial_dir(output) / "hfcompress_progress.json").read_text())["layers"]
    assert layers and all(state == {"bits": 2, "dim": 2, "books": 4} for state in layers.values())

    resumed = compress_folder(model, output, config, OutputOptions(offload="disk", resume=True))
    expected, written = read_safetensors(whole), read_safetensors(resumed)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[key], tensor) for key, tensor in expected.items())
    assert (resumed / "config.json").read_bytes() == (whole / "config.json").read_bytes()


def test_a_streamed_run_keeps_no_kernel_of_a_written_block(model, tmp_path, monkeypatch):
    """Each written block runs its codebook layers (the next block's inputs) through kernels that repack the
    codes; freeing the block must drop them too, or the run grows by those copies block after block."""
    from hfcompress.core import block_stream
    from hfcompress.quantization.codebook_linear import CodebookLinear

    released = []
    original = block_stream.release

    def release(module):
        original(module)
        released.extend(m for m in module.modules() if isinstance(m, CodebookLinear))

    monkeypatch.setattr(block_stream, "release", release)  # what BlockStream calls as it frees a written block
    config = KMeansConfig(bits=3, iters=4, dataset=token_windows(8, 32))
    compress_folder(model, tmp_path / "disk", config, OutputOptions(offload="disk"))
    assert released and all(m._kernel is None and m._kernel_key is None for m in released)


def test_a_streamed_run_refused_before_writing_anything_keeps_nothing(model, tmp_path):
    """VQ's vectors must tile every layer, which the streamed run checks once the skeleton is built (inside the
    output's partial folder): a refusal there leaves no folder to resume, nor a message offering one."""
    with pytest.raises(ValueError, match="VQ needs in_features divisible by dim=2 and out_features by groups=3"):
        compress_folder(
            model, tmp_path / "out", VQConfig(bits=2, dim=2, groups=3, iters=4), OutputOptions(offload="disk")
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []
