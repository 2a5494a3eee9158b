"""Perplexity streamed from a checkpoint one block at a time (`evaluation.streamed_perplexity`) against the same
figure on the model loaded whole (`evaluation.perplexity`), dense and compressed."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (from_pretrained reads hfcompress checkpoints)
from hfcompress.commands.cli import main
from hfcompress.core.streaming import ShardedCheckpoint, streaming_obstacle
from hfcompress.evaluation import perplexity, streamed_perplexity
from tests.helpers import python_text, save_sharded_model, tiny_model, token_windows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_perplexity_is_the_whole_models(tmp_path, arch):
    tiny_model(arch).save_pretrained(tmp_path / "model", max_shard_size="40KB")  # float32, several shards
    windows = token_windows(5, 16)
    expected = perplexity(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), windows, batch_size=2)
    (tmp_path / "scratch").mkdir()
    streamed = streamed_perplexity(tmp_path / "model", windows, batch_size=2, folder=tmp_path / "scratch")
    assert streamed == pytest.approx(expected, rel=1e-5)
    assert not any((tmp_path / "scratch").iterdir())  # the hidden states are removed


def test_a_half_precision_checkpoint_computes_in_float32(tmp_path):
    folder = save_sharded_model(tmp_path / "model")
    windows = token_windows(4, 16)
    whole = perplexity(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), windows)
    assert streamed_perplexity(folder, windows) == pytest.approx(whole, rel=1e-4)


@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "gptq", "--bits", "3", "--group-size", "32"],
        ["quantize", "kmeans", "--bits", "3"],
        ["prune", "oneshot", "--method", "wanda", "--sparsity", "0.5", "--storage", "bitmask"],
        ["factorize", "--method", "svd", "--param-ratio", "0.6", "--allocation", "uniform"],
    ],
    ids=["gptq", "kmeans", "sparse", "factorized"],
)
def test_a_compressed_checkpoint_runs_its_own_layers(tmp_path, command):
    """Streamed from OUTPUT's shards, the compressed layers (packed codes, codebooks, bitmasks, factors) give what
    the same checkpoint gives loaded whole with `from_pretrained`, and not the dense model's figure."""
    folder = save_sharded_model(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(python_text()[:30_000], encoding="utf-8")
    out = tmp_path / "out"
    split = 1 if command[0] == "factorize" else 2  # the command's words, then its options
    words, options = command[:split], command[split:]
    code = main([*words, str(folder), str(out), *options, "--dataset", str(tmp_path / "calib.txt"),
                 "--num-samples", "4", "--seq-len", "32", "--offload", "disk", "-q"])  # fmt: skip
    assert code == 0
    windows = token_windows(4, 16)
    loaded = perplexity(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), windows)
    streamed = streamed_perplexity(out, windows)
    assert streamed == pytest.approx(loaded, rel=1e-4)
    dense = perplexity(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), windows)
    assert streamed != pytest.approx(dense, rel=1e-4)


def test_bad_windows_are_refused(tmp_path):
    folder = save_sharded_model(tmp_path / "model")
    with pytest.raises(ValueError, match=r"seq_len >= 2\], got \(4, 1\)"):
        streamed_perplexity(folder, torch.zeros(4, 1, dtype=torch.long))


def _evaluate_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["evaluate", *map(str, args), "--json", "-q"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_offload_disk_gives_the_whole_models_figures(tmp_path, capsys):
    """`hfcompress evaluate --offload disk` on a compressed checkpoint: the perplexity, bits and size `evaluate`
    gives with the model loaded whole, no latency; `auto` streams only a model over --max-memory."""
    folder = save_sharded_model(tmp_path / "model")
    text = tmp_path / "eval.txt"
    text.write_text(python_text()[:30_000], encoding="utf-8")
    out = tmp_path / "out"
    assert main(["quantize", "rtn", str(folder), str(out), "--bits", "4", "--group-size", "32", "-q"]) == 0
    common = [out, "--dataset", text, "--seq-len", "32", "--max-windows", "6", "--batch-size", "2"]
    whole = _evaluate_json(capsys, *common, "--offload", "none", "--dtype", "float32", "--latency-runs", "1")
    streamed = _evaluate_json(capsys, *common, "--offload", "disk")
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-4)
    for key in ("size_bytes", "bits_per_weight", "model_bits_per_parameter", "num_windows", "seq_len"):
        assert streamed[key] == pytest.approx(whole[key]), key
    assert streamed["offload"] == "disk" and "latency_s" not in streamed and "latency_s" in whole
    assert _evaluate_json(capsys, *common, "--max-memory", "1KB")["offload"] == "disk"
    assert "offload" not in _evaluate_json(capsys, *common, "--max-memory", "1GB", "--latency-runs", "0")


def test_evaluate_offload_disk_refuses_tasks(tmp_path, capsys):
    folder = save_sharded_model(tmp_path / "model")
    assert main(["evaluate", str(folder), "--tasks", "arc_easy", "--offload", "disk"]) != 0
    assert "--offload disk measures perplexity alone (lm-eval tasks need the model whole)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options",
    [["gptq", "--bits", "4", "--group-size", "32"], ["w8a8"]],
    ids=["gptq-w4-asymmetric", "w8a8"],
)
def test_a_compressed_tensors_checkpoint_streams_to_be_evaluated(tmp_path, capsys, caplog, options):
    """`evaluate --offload disk` reads a compressed-tensors folder (asymmetric packed grids, W8A8) one block at a
    time into hfcompress's layers (`ct_import.CompressedTensorsLayout`): the perplexity and bits of the model
    loaded whole; compressing it again streams nothing and says why."""
    folder = save_sharded_model(tmp_path / "model")
    calib = tmp_path / "calib.txt"
    calib.write_text(python_text()[:30_000], encoding="utf-8")
    out = tmp_path / "out"
    assert main(["quantize", *options, str(folder), str(out), "--format", "compressed-tensors",
                 "--dataset", str(calib), "--num-samples", "4", "--seq-len", "32", "-q"]) == 0  # fmt: skip
    common = [out, "--dataset", calib, "--seq-len", "32", "--max-windows", "4", "--batch-size", "2"]
    whole = _evaluate_json(capsys, *common, "--offload", "none", "--dtype", "float32", "--latency-runs", "0")
    streamed = _evaluate_json(capsys, *common, "--offload", "disk")
    assert streamed["offload"] == "disk" and "offload" not in whole
    assert streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-4)
    for key in ("size_bytes", "bits_per_weight", "model_bits_per_parameter", "num_windows"):
        assert streamed[key] == pytest.approx(whole[key]), key
    skeleton = ShardedCheckpoint(out).skeleton("causal-lm", compressed=True)  # what the streamed pass ran
    layer = type(skeleton.model.layers[1].mlp.down_proj).__name__
    assert layer == ("Int8Linear" if options == ["w8a8"] else "QuantLinear")
    with caplog.at_level("WARNING"):  # loaded whole, its linears already quantized: nothing left to quantize
        assert main(["quantize", "rtn", str(out), str(tmp_path / "again"), "--offload", "disk", "-q"]) == 2
    assert "is quantized with compressed-tensors, which streams only to be evaluated" in caplog.text
    assert not (tmp_path / "again").exists()


def test_compressed_tensors_experts_stream_into_expert_linears(tmp_path, capsys, caplog):
    """A Mixtral's experts exported one linear each under its checkpoint's names (`block_sparse_moe.experts.3.w1`,
    gate and up apart) are read back into `ExpertLinears` of packed layers, gate and up rows together, streamed
    and whole (transformers would decompress them to dense weights): the perplexity transformers gives; a scheme
    hfcompress's layers do not hold is found from the config alone."""
    folder = save_sharded_model(tmp_path / "model", arch="mixtral")
    text = tmp_path / "eval.txt"
    text.write_text(python_text()[:20_000], encoding="utf-8")
    out = tmp_path / "out"
    assert main(["quantize", "rtn", str(folder), str(out), "--bits", "4", "--group-size", "32", "--sym",
                 "--format", "compressed-tensors", "-q"]) == 0  # fmt: skip
    common = [out, "--dataset", text, "--seq-len", "32", "--max-windows", "4", "--batch-size", "2"]
    with caplog.at_level("INFO", logger="hfcompress.steps.loading"):
        whole = _evaluate_json(capsys, *common, "--offload", "none", "--dtype", "float32", "--latency-runs", "0")
    assert "with hfcompress, as transformers would decompress its quantized experts to dense weights" in caplog.text
    streamed = _evaluate_json(capsys, *common, "--offload", "disk")
    assert streamed["offload"] == "disk" and streamed["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-4)
    windows = token_windows(4, 16)
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # transformers: experts decompressed
    assert streamed_perplexity(out, windows) == pytest.approx(perplexity(dense, windows), rel=1e-4)
    assert main(["verify", str(out)]) == 0
    assert "read by hfcompress, as transformers would decompress its quantized experts" in capsys.readouterr().out
    experts = ShardedCheckpoint(out).skeleton("causal-lm", compressed=True).model.layers[0].mlp.experts
    assert type(experts).__name__ == "ExpertLinears" and type(experts.gate_up_proj[3]).__name__ == "QuantLinear"
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "float"
    config_file.write_text(json.dumps(config))
    assert "config group 'group_0' is 4-bit float" in streaming_obstacle(out, compressed=True)


def test_a_checkpoint_no_reader_streams_is_evaluated_whole(tmp_path, capsys, caplog):
    """A quantization_config no technique registered a reader for (here an fp8 one) does not stream, saying why."""
    folder = save_sharded_model(tmp_path / "model")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    config_file.write_text(json.dumps(config))
    assert streaming_obstacle(folder, compressed=True) == (
        f"{str(folder)!r} is quantized with fp8, which streaming does not read (hfcompress's does)"
    )
