"""Perplexity streamed from a checkpoint one block at a time (`evaluation.streamed_perplexity`) against the same
figure on the model loaded whole (`evaluation.perplexity`), dense and compressed."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfcompress  # noqa: F401  (from_pretrained reads hfcompress checkpoints)
from hfcompress.commands.cli import main
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
    import json

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


def test_a_checkpoint_another_library_quantized_is_evaluated_whole(tmp_path, capsys, caplog):
    folder = save_sharded_model(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(python_text()[:30_000], encoding="utf-8")
    out = tmp_path / "out"
    assert main(["quantize", "gptq", str(folder), str(out), "--bits", "4", "--group-size", "32", "--sym",
                 "--format", "compressed-tensors", "--dataset", str(tmp_path / "calib.txt"), "--num-samples", "4",
                 "--seq-len", "32", "-q"]) == 0  # fmt: skip
    with caplog.at_level("WARNING"):
        result = _evaluate_json(capsys, out, "--dataset", tmp_path / "calib.txt", "--seq-len", "32",
                                "--max-windows", "2", "--latency-runs", "0", "--offload", "disk")  # fmt: skip
    assert "is quantized with compressed-tensors, which streaming does not read" in caplog.text
    assert "loading it whole instead" in caplog.text and "offload" not in result and result["perplexity"] > 1
    # its packed linears (weight_packed, no weight) count as what they store: 4-bit codes and a scale per 32
    assert 4.5 <= result["bits_per_weight"] < 4.6 and result["model_bits_per_parameter"] < 16
