"""`--offload disk`: quantizing a model block by block from its safetensors shards writes exactly what the run in
memory writes, and what cannot stream is refused or loaded whole with a reason."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (registers the checkpoint format)
from hfcompress.core.hessian import Hessian, inverse_cholesky, symmetrize_upper
from hfcompress.core.streaming import ShardedCheckpoint, streaming_obstacle
from hfcompress.quantization import GPTQConfig, RTNConfig
from hfcompress.quantization.streaming import quantize_streaming
from hfcompress.steps import OutputOptions, compress_folder
from tests.helpers import (
    failing_at_write,
    kill_halfway,
    read_safetensors,
    save_deep_model,
    save_sharded_model,
    tiny_model,
    tiny_tokenizer,
    token_windows,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("streaming")
    return {
        "llama": str(save_sharded_model(root / "llama", "llama")),
        "gpt2": str(save_sharded_model(root / "gpt2", "gpt2")),  # tied embeddings, Conv1D layers
        "pruned": str(save_sharded_model(root / "pruned", "llama", prune=True)),
    }


def _both(model: Path, tmp_path: Path, config) -> tuple[Path, Path]:
    memory = compress_folder(model, tmp_path / "memory", config)
    disk = compress_folder(model, tmp_path / "disk", config, OutputOptions(offload="disk"))
    return memory, disk


CONFIGS = {
    "gptq": lambda: GPTQConfig(bits=4, group_size=32, dataset=token_windows(8, 32)),
    "gptq-2pass-sym": lambda: GPTQConfig(bits=3, group_size=-1, sym=True, true_sequential=False, dataset=token_windows(8, 32)),
    "rtn": lambda: RTNConfig(bits=4, group_size=32),
    # ranks allocated over every layer once all blocks are written, then added to the written shards
    "gptq-compensated": lambda: GPTQConfig(bits=3, group_size=32, lowrank_compensation=4, dataset=token_windows(8, 32)),
}  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "gpt2", "pruned"])
@pytest.mark.parametrize("method", list(CONFIGS))
def test_streaming_writes_what_memory_writes(models, tmp_path, arch, method):
    memory, disk = _both(models[arch], tmp_path, CONFIGS[method]())

    expected, streamed = read_safetensors(memory), read_safetensors(disk)
    assert streamed.keys() == expected.keys()
    for key, tensor in expected.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key], tensor), key
    if arch == "pruned":
        assert any(key.endswith(".weight_bitmask") for key in streamed), "the pruned layers lost their sparsity"
    assert json.loads((disk / "config.json").read_text()) == json.loads((memory / "config.json").read_text())
    # one shard per block and one for the rest, all listed in the index
    index = json.loads((disk / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(streamed)
    assert len(set(index["weight_map"].values())) == 3

    record = json.loads((disk / "hfcompress_record.json").read_text())
    step = record["steps"][-1]
    assert step["config"]["offload"] == "disk" and step["memory"]["peak_rss_bytes"] > 0
    assert (
        record["metrics"]["after"]["parameters"]
        == json.loads((memory / "hfcompress_record.json").read_text())["metrics"]["after"]["parameters"]
    )

    ids = token_windows(2, 16)
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(memory)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(disk)(ids).logits
    assert torch.equal(a, b)


def test_a_model_that_cannot_stream_is_loaded_whole_with_the_reason(models, tmp_path, caplog):
    folder = tmp_path / "custom"
    folder.mkdir()
    for file in Path(models["llama"]).iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    (folder / "config.json").write_text(json.dumps(config))
    assert "auto_map" in streaming_obstacle(folder)

    config = json.loads((Path(models["llama"]) / "config.json").read_text())
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    assert "no safetensors weights" in streaming_obstacle(tmp_path / "plain")
    assert "not a local folder" in streaming_obstacle("org/model")

    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        out = compress_folder(
            models["llama"], tmp_path / "out", RTNConfig(bits=4, group_size=32), OutputOptions(offload="disk")
        )
        assert not caplog.records  # it could stream
        # a folder hfcompress cannot stream: the run loads it whole and says why (auto_map is only read by
        # streaming here; transformers ignores it for a model class it knows)
        compress_folder(str(folder), tmp_path / "out2", RTNConfig(bits=4, group_size=32), OutputOptions(offload="disk"))
    assert any("loading it whole instead" in r.getMessage() and "auto_map" in r.getMessage() for r in caplog.records)
    assert (out / "model.safetensors.index.json").is_file()
    assert (tmp_path / "out2" / "model.safetensors").is_file()


def test_what_streaming_cannot_do_is_refused_before_any_work(models, tmp_path):
    disk = OutputOptions(offload="disk", eval_tasks="arc_easy")
    with pytest.raises(ValueError, match="runs no lm-eval tasks: drop --eval-tasks"):
        compress_folder(models["llama"], tmp_path / "a", RTNConfig(bits=4, group_size=32), disk)
    # the streamed run itself writes hfcompress's format (the command rewrites it: tests/quantization/test_ct_export.py)
    with pytest.raises(ValueError, match="writes format hfcompress only, got 'compressed-tensors'"):
        quantize_streaming(models["llama"], tmp_path / "c", RTNConfig(bits=4, group_size=32, sym=True),
                           format="compressed-tensors")  # fmt: skip
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_whose_names_do_not_match_the_model_is_refused(models, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    model = tiny_model("llama").half()
    state = {f"renamed.{k}": v for k, v in model.state_dict().items()}
    from safetensors.torch import save_file

    save_file(state, folder / "model.safetensors")
    model.config.save_pretrained(folder)
    with pytest.raises(
        ValueError, match="are not in the checkpoint, under their own names or any transformers converts on loading"
    ):
        ShardedCheckpoint(folder).skeleton()


@pytest.fixture(scope="module")
def bitmask_pruned(tmp_path_factory):
    """A model pruned to 50% and saved as bitmask + values (each pruned layer's non-zeros, 1-D, under the weight's
    name), float16, in several shards."""
    from hfcompress.pruning import OneShotPruningConfig, compress_sparse, prune_oneshot

    model = tiny_model("llama")
    prune_oneshot(model, OneShotPruningConfig(method="magnitude", sparsity=0.5))
    compress_sparse(model.half())
    folder = tmp_path_factory.mktemp("pruned") / "model"
    model.save_pretrained(folder, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_bitmask_pruned_checkpoint_streams_into_quantization(bitmask_pruned, tmp_path, method):
    """Pruned, then quantized streamed: the bitmask layers are read dense (zeros kept by `keep_sparsity`), and the
    run writes the tensors and manifest (pruning recorded, sparse quantized layers listed) of the run in memory."""
    memory, disk = _both(bitmask_pruned, tmp_path, CONFIGS[method]())
    record = json.loads((disk / "hfcompress_record.json").read_text())
    assert record["steps"][-1]["config"]["offload"] == "disk"
    expected, streamed = read_safetensors(memory), read_safetensors(disk)
    assert streamed.keys() == expected.keys() and any(key.endswith(".weight_bitmask") for key in streamed)
    for key, tensor in expected.items():
        assert streamed[key].dtype == tensor.dtype and torch.equal(streamed[key], tensor), key
    config = json.loads((disk / "config.json").read_text())
    assert config == json.loads((memory / "config.json").read_text())
    assert config["quantization_config"]["pruning"]["method"] == "magnitude"


def test_compressed_layers_a_technique_cannot_read_load_whole(bitmask_pruned, tmp_path, caplog):
    """k-means does not read bitmask layers dense: with --offload disk the run loads the model whole, saying why,
    and then does what it does without --offload (here: finds no plain linears to quantize); a skeleton of the
    dense model asked to read the bitmask layers as they are refuses, naming the tensor."""
    from hfcompress.quantization import KMeansConfig

    with pytest.raises(
        ValueError,
        match=r"stored in another shape .* \(first: 'model.layers.0.self_attn.q_proj.weight', stored \[2048\], expected \[64, 64\]\)",
    ):
        ShardedCheckpoint(bitmask_pruned).skeleton()
    config = KMeansConfig(bits=3, iters=2)
    with pytest.raises(
        ValueError, match=r"stored as bitmask \+ values .* which only gptq and rtn quantize"
    ) as in_memory:
        compress_folder(bitmask_pruned, tmp_path / "memory", config)
    with caplog.at_level(logging.WARNING, logger="hfcompress"), pytest.raises(ValueError) as streamed:
        compress_folder(bitmask_pruned, tmp_path / "disk", config, OutputOptions(offload="disk"))
    assert str(streamed.value) == str(in_memory.value)
    assert any(
        "already compressed (sparse)" in r.getMessage() and "loading it whole" in r.getMessage() for r in caplog.records
    )
    assert not (tmp_path / "disk").exists()


def _mapped_from(path: Path) -> list[tuple[int, int]]:
    """The address ranges of this process mapped from the file `path` (Linux)."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, stop = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((start, stop))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory maps (Linux)")
def test_read_copies_tensors_out_of_the_shards_memory_map(models):
    """safetensors hands out views of a map of the whole shard, which keeps every page of it resident while one of
    its tensors lives: a streamed block's layers freed as they are solved would keep theirs."""
    checkpoint = ShardedCheckpoint(models["llama"])
    name = "model.layers.0.mlp.down_proj.weight"
    shard = (Path(models["llama"]) / checkpoint.weight_map[name]).resolve()
    with safe_open(shard, "pt") as f:
        expected = f.get_tensor(name)
        view = expected.data_ptr()
        assert any(start <= view < stop for start, stop in _mapped_from(shard))  # what safetensors gives
    tensor = checkpoint.read([name])[name]
    assert torch.equal(tensor, expected) and tensor.dtype == torch.float16
    assert not any(start <= tensor.data_ptr() < stop for start, stop in _mapped_from(shard))
    assert checkpoint.read([name], torch.float32)[name].dtype == torch.float32


def test_lean_hessian_maths_match_the_plain_formulas():
    torch.manual_seed(0)
    x = torch.randn(300, 70)
    x[:, 5] = 0  # an input that is always zero
    hessian = Hessian(70, "cpu")
    hessian.add(x)
    upper = hessian.H.clone()
    H = hessian.full()
    assert torch.equal(H, symmetrize_upper(upper)) and H.data_ptr() == hessian.H.data_ptr()

    perm = torch.randperm(70)
    fixed = H.clone()
    fixed[5, 5] = 1
    fixed = fixed[perm][:, perm]
    damped = fixed + 0.01 * torch.diag(fixed).mean() * torch.eye(70)
    expected = torch.linalg.cholesky(torch.linalg.inv(damped.double()), upper=True).float()
    before = H.clone()
    result = inverse_cholesky(H, 0.01, perm=perm, fix_dead=True)
    assert torch.equal(H, before)  # not modified
    torch.testing.assert_close(result, expected, rtol=1e-3, atol=1e-4)
    assert torch.equal(result, torch.triu(result))


def test_every_replay_mode_gives_the_same_codes():
    """Replaying recorded submodule outputs or recomputing them is a memory/compute trade, never a change."""
    from hfcompress.core.structure import find_layer_stack
    from hfcompress.quantization.api import select_targets
    from hfcompress.quantization.gptq_blocks import quantize_blocks

    config = GPTQConfig(bits=3, group_size=32, dataset="unused")
    batches = list(token_windows(8, 32).split(4))
    states = []
    for replay in ("all", "lean", "none"):
        model = tiny_model("llama")
        targets = select_targets(model, config)
        quantize_blocks(model, find_layer_stack(model)[1], batches, targets, config, torch.float16, replay=replay)
        states.append(model.state_dict())
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)


@pytest.mark.parametrize(
    "extra, inside",
    [((), ""), (("--sym", "--format", "compressed-tensors"), ".hfcompress-streamed")],  # rewritten at the end
    ids=["hfcompress", "compressed-tensors"],
)
def test_a_killed_streaming_run_resumes_to_the_same_output(tmp_path, extra, inside):
    import os
    import signal
    import subprocess
    import sys

    from hfcompress.io import partial_dir

    model = save_deep_model(tmp_path / "model")
    command = [
        sys.executable, "-m", "hfcompress", "quantize", "gptq", str(model), "OUT", "--bits", "4", "--group-size", "64",
        "--dataset", str(model / "calib.txt"), "--num-samples", "16", "--seq-len", "128", "--offload", "disk", "-q",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(output, *extra):
        cmd = [str(output) if c == "OUT" else c for c in command] + list(extra)
        return subprocess.run(cmd, env=env, capture_output=True, text=True)

    assert run(tmp_path / "whole").returncode == 0

    killed = tmp_path / "killed"
    assert kill_halfway(command, killed, 3, env, inside) == -signal.SIGKILL, "the run ended before it was killed"
    assert not killed.exists()  # never left looking complete

    if not inside:  # other settings are refused the same way whatever the format (one interpreter's start saved)
        refused = run(killed, "--resume", "--bits", "3")
        assert refused.returncode != 0 and "cannot resume" in refused.stderr
        assert "config.bits was 4, now 3" in refused.stderr
    resumed = run(killed, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((killed / "hfcompress_record.json").read_text())
    assert "--resume" in record["command"]
    assert not partial_dir(killed).exists()

    names = {p.name for p in (tmp_path / "whole").iterdir()}
    assert names == {p.name for p in killed.iterdir()}
    for name in names - {"hfcompress_record.json", "README.md"}:  # the record and card say when and how long
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


@pytest.mark.parametrize("killed_at_write", [2, 5])
def test_a_compensated_run_killed_before_or_while_adding_corrections_resumes_to_the_same_output(
    models, tmp_path, killed_at_write
):
    """The two blocks' shards are written 1st and 2nd, the rest 3rd, then the corrections rewrite the blocks'
    shards: killed at the 2nd write a block is still to calibrate; at the 5th, one shard holds its corrections
    and the other not yet."""
    from hfcompress.io import partial_dir
    from hfcompress.quantization.compensation_streaming import FACTORS

    config = GPTQConfig(bits=3, group_size=32, compensation_bits=1.0, dataset=token_windows(8, 32))
    whole = compress_folder(models["llama"], tmp_path / "whole", config, OutputOptions(offload="disk"))
    with failing_at_write(killed_at_write), pytest.raises(RuntimeError, match="killed"):
        compress_folder(models["llama"], tmp_path / "out", config, OutputOptions(offload="disk"))
    partial = partial_dir(tmp_path / "out")
    assert json.loads((partial / "hfcompress_progress.json").read_text())["blocks_done"] == min(killed_at_write - 1, 2)
    if killed_at_write == 5:
        shards = sorted(partial.glob("model-*.safetensors"))
        corrected = [any(k.endswith(".up.weight") for k in safe_open(f, "pt").keys()) for f in shards]
        assert corrected == [True, False, False]
    resumed = compress_folder(models["llama"], tmp_path / "out", config, OutputOptions(offload="disk", resume=True))

    expected, written = read_safetensors(whole), read_safetensors(resumed)
    assert any(key.endswith(".up.weight") for key in expected)  # corrections were added
    assert written.keys() == expected.keys() and all(torch.equal(written[k], v) for k, v in expected.items())
    assert json.loads((resumed / "config.json").read_text()) == json.loads((whole / "config.json").read_text())
    assert not any(p.name.startswith(FACTORS) for p in resumed.iterdir())


def test_auto_streams_a_model_that_would_not_fit_and_says_so(models, tmp_path, caplog):
    from hfcompress.steps.offload import parse_size

    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("800MB") == 800 * 10**6 and parse_size("12") == 12
    with pytest.raises(ValueError, match="--max-memory must be a size like 16GB"):
        parse_size("lots")
    config = RTNConfig(bits=4, group_size=32)
    with caplog.at_level(logging.WARNING, logger="hfcompress"):
        fits = compress_folder(models["llama"], tmp_path / "fits", config, OutputOptions(max_memory="1GB"))
        assert not caplog.records
        small = compress_folder(models["llama"], tmp_path / "small", config, OutputOptions(max_memory="10KB"))
    assert any("streaming it from disk" in r.getMessage() for r in caplog.records)
    assert (small / "model.safetensors.index.json").is_file() and (fits / "model.safetensors").is_file()
    assert read_safetensors(small).keys() == read_safetensors(fits).keys()
    caplog.clear()
    from hfcompress.core.registry import technique_for
    from hfcompress.steps.offload import should_stream

    with caplog.at_level(logging.WARNING, logger="hfcompress"):  # it would not fit, but cannot stream: said so
        tasks = OutputOptions(max_memory="10KB", eval_tasks="arc_easy")
        assert not should_stream(technique_for(config), config, models["llama"], tasks, {"format": "hfcompress"})
    assert any("loading it whole" in r.getMessage() and "--eval-tasks" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="add --offload disk"):
        compress_folder(models["llama"], tmp_path / "r", config, OutputOptions(offload="none", resume=True))


def test_a_streamed_run_records_the_perplexity_a_run_in_memory_records(models, tmp_path):
    """--eval-dataset with --offload disk: the perplexity before (streamed from MODEL) and after (streamed from
    OUTPUT once written) in the record and card, as the run in memory measures them; no latency."""
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"word{i % 97} token{i % 13}" for i in range(4000)), encoding="utf-8")
    config = GPTQConfig(bits=3, group_size=32, dataset=token_windows(8, 32))
    measured = {}
    for offload in ("none", "disk"):
        options = OutputOptions(offload=offload, eval_dataset=str(text), eval_seq_len=32, eval_max_windows=4)
        out = compress_folder(models["llama"], tmp_path / offload, config, options)
        measured[offload] = json.loads((out / "hfcompress_record.json").read_text())
    memory, disk = measured["none"], measured["disk"]
    for when in ("before", "after"):
        assert disk["metrics"][when]["perplexity"] == pytest.approx(memory["metrics"][when]["perplexity"], rel=1e-5)
        assert "latency_s" not in disk["metrics"][when] and "latency_s" in memory["metrics"][when]
    assert disk["metrics"]["after"]["perplexity"] != disk["metrics"]["before"]["perplexity"]
    assert disk["evaluation"]["num_windows"] == 4 and "streamed" in disk["evaluation"]["protocol"]
    card = (tmp_path / "disk" / "README.md").read_text()
    before, after = disk["metrics"]["before"]["perplexity"], disk["metrics"]["after"]["perplexity"]
    assert f"| perplexity | {before:.3f} | {after:.3f} |" in card


@pytest.mark.parametrize("large_block", [False, True])
def test_only_large_blocks_trade_allocation_speed_for_memory(models, tmp_path, monkeypatch, large_block):
    from hfcompress.core import streamed_run

    calls = []  # the real call would change this test process's allocator
    monkeypatch.setattr(streamed_run, "release_large_frees", lambda: calls.append(1))
    if large_block:
        monkeypatch.setattr(streamed_run, "LARGE_BLOCK", 1)
    compress_folder(models["llama"], tmp_path / "out", RTNConfig(bits=4, group_size=32), OutputOptions(offload="disk"))
    assert calls == ([1] if large_block else [])
