"""AWQ and W8A8 with `--offload disk`: streamed block by block from the shards, they write exactly what the run in
memory writes (scales folded, weights clipped and rounded), and a run that fails midway resumes to the same
output."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (registers the checkpoint format)
from hfcompress.quantization import AWQConfig, W8A8Config
from hfcompress.steps import OutputOptions, compress_folder
from tests.helpers import (
    failing_at_shard,
    failing_at_write,
    read_safetensors,
    tiny_model,
    tiny_tokenizer,
    token_windows,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A float16 model in small shards whose norms make a few input channels salient, as trained models' do
    (a random model's are not, and AWQ then rightly scales nothing)."""
    folder = tmp_path_factory.mktemp("smoothing-streaming") / "llama"
    model = tiny_model("llama").half()
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data[:4] *= 8
    model.save_pretrained(folder, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


CONFIGS = {
    "awq": lambda: AWQConfig(bits=3, group_size=32, n_grid=4, dataset=token_windows(8, 32)),
    "awq-rms-clip-hessian": lambda: AWQConfig(
        bits=3,
        group_size=32,
        n_grid=4,
        dataset=token_windows(8, 32),
        clip=True,
        activation_statistic="rms",
        search_objective="hessian",
    ),
    "w8a8": lambda: W8A8Config(smoothquant=0.5, dataset=token_windows(8, 32)),
    # GPTQ calibrates on the smoothed model: streamed in two passes (`stream_twice`)
    "awq-gptq": lambda: AWQConfig(bits=3, group_size=32, n_grid=4, dataset=token_windows(8, 32), weights="gptq"),
    "w8a8-gptq": lambda: W8A8Config(smoothquant=0.5, dataset=token_windows(8, 32), weights="gptq"),
    "w8a8-gptq-unsmoothed": lambda: W8A8Config(smoothquant=0, dataset=token_windows(8, 32), weights="gptq"),
}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_streamed_smoothing_writes_what_the_run_in_memory_writes(model, tmp_path, method):
    memory = compress_folder(model, tmp_path / "memory", CONFIGS[method]())
    disk = compress_folder(model, tmp_path / "disk", CONFIGS[method](), OutputOptions(offload="disk"))

    expected, streamed = read_safetensors(memory), read_safetensors(disk)
    assert streamed.keys() == expected.keys()
    original = read_safetensors(model)
    norms = [key for key in original if key.endswith("layernorm.weight")]
    folded = any(not torch.equal(expected[key], original[key]) for key in norms)
    assert folded == ("unsmoothed" not in method)  # scales were folded into norms
    for key, tensor in expected.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key], tensor), key
    assert json.loads((disk / "config.json").read_text()) == json.loads((memory / "config.json").read_text())
    assert json.loads((disk / "config.json").read_text())["quantization_config"]["method"] == method.split("-")[0]

    ids = token_windows(2, 16)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(memory)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(disk)(ids).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["awq", "w8a8"])
def test_a_streamed_smoothing_run_that_failed_midway_resumes_to_the_same_output(model, tmp_path, method):
    whole = compress_folder(model, tmp_path / "whole", CONFIGS[method](), OutputOptions(offload="disk"))

    output = tmp_path / "failed"
    with failing_at_shard(1), pytest.raises(RuntimeError, match="killed"):
        compress_folder(model, output, CONFIGS[method](), OutputOptions(offload="disk"))
    resumed = compress_folder(model, output, CONFIGS[method](), OutputOptions(offload="disk", resume=True))

    expected, written = read_safetensors(whole), read_safetensors(resumed)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[key], tensor) for key, tensor in expected.items())
    assert (resumed / "config.json").read_bytes() == (whole / "config.json").read_bytes()


@pytest.mark.parametrize(("method", "killed_at_write"), [("awq-gptq", 2), ("w8a8-gptq", 5)])
def test_a_two_pass_run_killed_in_either_pass_resumes_to_the_same_output(model, tmp_path, method, killed_at_write):
    """The smoothing pass writes its two blocks' shards and the rest (writes 1-3), GPTQ then its own (4-6): killed
    at the 2nd write the first pass resumes, at the 5th the second."""
    from hfcompress.core.two_pass import FIRST_PASS
    from hfcompress.io import partial_dir

    whole = compress_folder(model, tmp_path / "whole", CONFIGS[method](), OutputOptions(offload="disk"))
    output = tmp_path / "failed"
    with failing_at_write(killed_at_write), pytest.raises(RuntimeError, match="killed"):
        compress_folder(model, output, CONFIGS[method](), OutputOptions(offload="disk"))
    first_pass_done = not (partial_dir(output) / FIRST_PASS / "hfcompress_progress.json").exists()
    assert first_pass_done == (killed_at_write > 3)
    resumed = compress_folder(model, output, CONFIGS[method](), OutputOptions(offload="disk", resume=True))

    expected, written = read_safetensors(whole), read_safetensors(resumed)
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[key], tensor) for key, tensor in expected.items())
    assert (resumed / "config.json").read_bytes() == (whole / "config.json").read_bytes()
    assert not (resumed / FIRST_PASS).exists()


def test_a_two_pass_run_without_room_for_the_first_pass_copy_is_refused_before_any_work(model, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from hfcompress.quantization.awq_streaming import awq_streaming

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    (tmp_path / "out").mkdir()
    with pytest.raises(OSError, match=r"first pass's copy of the model: 0 MB needed, 0 MB free"):
        awq_streaming(model, tmp_path / "out", CONFIGS["awq-gptq"]())
    assert not any((tmp_path / "out").iterdir())
