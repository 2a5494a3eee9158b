"""`hfcompress export compressed-tensors`: an hfcompress checkpoint (written streamed, block by block) rewritten
shard by shard gives the very files `--format compressed-tensors` writes from memory."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import python_text, save_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hfcompress.commands.cli import main
from hfcompress.quantization import RTNConfig
from hfcompress.quantization.ct_import import load_compressed_tensors
from hfcompress.quantization.ct_readers import installed_reads_zero_points
from hfcompress.steps import OutputOptions, compress_folder

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(python_text()[:40_000], encoding="utf-8")
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for file in sorted(folder.glob("model*.safetensors")) for k, v in load_file(file).items()}


def _quantize(command: list[str], model: Path, output: Path, calib: Path, *extra) -> None:
    options = ["--dataset", calib, "--num-samples", "8", "--seq-len", "64", "-q", *extra]
    assert main([*command, str(model), str(output), *map(str, options)]) == 0


@pytest.mark.parametrize(
    ("arch", "command"),
    [
        ("llama", ["quantize", "gptq", "--bits", "4", "--group-size", "32", "--sym"]),
        ("llama", ["quantize", "w8a8", "--smoothquant", "0.5"]),  # int8 weights from the packed codes
        ("mixtral", ["quantize", "gptq", "--bits", "4", "--group-size", "32", "--sym"]),  # per expert, w1/w3 split
        ("llama", ["quantize", "awq", "--bits", "4", "--group-size", "32"]),  # asymmetric: packed zero points
        ("mixtral", ["quantize", "w8a8"]),  # int8 experts: vLLM and hfcompress read them, transformers does not
    ],
    ids=["gptq", "w8a8", "mixtral", "awq-asymmetric", "mixtral-w8a8"],
)
def test_a_streamed_checkpoint_exports_the_files_memory_writes(tmp_path, calib, arch, command, capsys):
    save_tiny_model(tmp_path / "model", arch=arch)
    _quantize(command, tmp_path / "model", tmp_path / "streamed", calib, "--offload", "disk")
    _quantize(command, tmp_path / "model", tmp_path / "memory", calib, "--format", "compressed-tensors")
    assert main(["export", "compressed-tensors", str(tmp_path / "streamed"), str(tmp_path / "exported")]) == 0
    # the same in one command: streamed in hfcompress's format, rewritten before OUTPUT is published
    both = (
        "--offload",
        "disk",
        "--format",
        "compressed-tensors",
        "--eval-dataset",
        calib,
        "--eval-max-windows",
        "2",
        "--eval-seq-len",
        "64",
    )
    _quantize(command, tmp_path / "model", tmp_path / "one-command", calib, *both)

    memory = _tensors(tmp_path / "memory")
    for folder in ("exported", "one-command"):
        exported = _tensors(tmp_path / folder)
        assert len(list((tmp_path / folder).glob("model-*.safetensors"))) > 1  # shard for shard
        assert exported.keys() == memory.keys() and all(torch.equal(exported[k], memory[k]) for k in exported)
        configs = [json.loads((tmp_path / f / "config.json").read_text()) for f in (folder, "memory")]
        assert configs[0]["quantization_config"] == configs[1]["quantization_config"]
        assert configs[0]["quantization_config"]["quant_method"] == "compressed-tensors"
        assert (tmp_path / folder / "tokenizer.json").is_file()
    # the export carries the quantization's record and card on, with its own step and the new files
    record = json.loads((tmp_path / "exported" / "hfcompress_record.json").read_text())
    assert [s["technique"] for s in record["steps"]] == ["quantization", "export"]
    asymmetric = "--sym" not in command and "w8a8" not in command
    int8_experts = arch == "mixtral" and "w8a8" in command
    expected = {"requires_hfcompress": False, **({"packed_zero_points": True} if asymmetric else {})}
    if int8_experts:
        expected["not_in_transformers"] = (
            "its experts are W8A8 int8 linears; transformers decompresses weight-only experts only"
        )
    assert record["loading"] == expected
    assert set(record["files"]) == {p.name for p in (tmp_path / "exported").glob("model*.safetensors")}
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "export (compressed-tensors)" in card
    if int8_experts:  # the card loads it with hfcompress's reader
        assert "transformers does not load it" in card and "hfcompress.load_compressed_tensors(" in card
        assert "from transformers import" not in card
    else:
        assert "\nimport hfcompress" not in card  # a comment may name it
        assert ("pip install 'compressed-tensors==0.17.0'" if asymmetric else "pip install compressed-tensors") in card
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "exported"), "-q"]) == 0
    if int8_experts or (asymmetric and not installed_reads_zero_points()[0]):  # transformers would fail
        assert "read by hfcompress" in capsys.readouterr().out

    record = json.loads((tmp_path / "one-command" / "hfcompress_record.json").read_text())
    assert record["loading"]["requires_hfcompress"] is False and record["steps"][-1]["config"]["offload"] == "disk"
    assert record["loading"].get("packed_zero_points", False) is asymmetric
    if asymmetric or int8_experts:  # evaluated as exported: through hfcompress's reader where transformers cannot
        capsys.readouterr()
        window = ["--dataset", str(calib), "--seq-len", "64", "--max-windows", "2"]
        assert main(["evaluate", str(tmp_path / "one-command"), *window, "--latency-runs", "0", "--json", "-q"]) == 0
        measured = json.loads(capsys.readouterr().out)["perplexity"]
        assert measured == pytest.approx(record["metrics"]["after"]["perplexity"], rel=1e-4)
    assert set(record["files"]) == {p.name for p in (tmp_path / "one-command").glob("model*.safetensors")}
    assert record["metrics"]["after"]["perplexity"] > 1  # measured streaming the hfcompress shards before the rewrite
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing partial left


@pytest.mark.parametrize("sym", [True, False], ids=["symmetric", "asymmetric"])
def test_a_pruned_and_quantized_model_exports_dense_codes_of_the_same_weights(tmp_path, calib, sym):
    """compressed-tensors has no bitmask: a pruned layer's codes are written dense, each pruned weight the zero
    point's code, in memory and rewritten from a streamed run alike; the model loads with the same weights."""
    save_tiny_model(tmp_path / "model")
    prune = ["prune", "oneshot", "--method", "sparsegpt", "--sparsity", "0.5", "--storage", "dense"]
    _quantize(prune, tmp_path / "model", tmp_path / "pruned", calib)
    gptq = ["quantize", "gptq", "--bits", "4", "--group-size", "32", *(["--sym"] if sym else [])]
    _quantize(gptq, tmp_path / "pruned", tmp_path / "bitmask", calib)
    _quantize(gptq, tmp_path / "pruned", tmp_path / "memory", calib, "--format", "compressed-tensors")
    _quantize(
        gptq, tmp_path / "pruned", tmp_path / "streamed", calib, "--offload", "disk", "--format", "compressed-tensors"
    )

    assert any(key.endswith(".weight_bitmask") for key in _tensors(tmp_path / "bitmask"))  # SparseQuantLinear
    memory, streamed = _tensors(tmp_path / "memory"), _tensors(tmp_path / "streamed")
    assert streamed.keys() == memory.keys() and all(torch.equal(streamed[k], memory[k]) for k in memory)
    assert not any("bitmask" in key for key in memory)
    assert memory["model.layers.0.mlp.down_proj.weight_packed"].shape == (64, 128 * 4 // 32)  # every code

    bitmask = AutoModelForCausalLM.from_pretrained(tmp_path / "bitmask", dtype=torch.float32)
    read = load_compressed_tensors(tmp_path / "memory", torch.float32)  # QuantLinear: weights to compare
    name = "model.layers.1.mlp.down_proj"
    pruned = bitmask.get_submodule(name)
    weight, held = pruned.dequantize_weight(torch.float32), read.get_submodule(name).dequantize_weight(torch.float32)
    assert torch.equal(held, weight) and torch.equal(held == 0, ~pruned.mask() | (weight == 0))
    ids = torch.tensor([[5, 9, 30, 7, 2, 11]])
    with torch.no_grad():
        expected = bitmask(ids).logits
        torch.testing.assert_close(read(ids).logits, expected, rtol=0, atol=1e-5)
        if sym or installed_reads_zero_points()[0]:  # plain transformers, compressed-tensors' own layers
            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "memory", dtype=torch.float32)
            torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-4)


def test_what_compressed_tensors_cannot_hold_is_refused_before_writing(tmp_path, calib, capsys, caplog):
    save_tiny_model(tmp_path / "model")
    _quantize(["quantize", "gptq", "--bits", "3", "--group-size", "32"], tmp_path / "model", tmp_path / "asym", calib)
    assert main(["export", "compressed-tensors", str(tmp_path / "asym"), str(tmp_path / "out")]) == 2
    assert "is quantized on an asymmetric 3-bit grid: no program reads" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    # what the settings alone show is refused before any block streams
    dynamic = ["quantize", "gptq", "--bits", "4", "--group-size", "32", "--sym", "--no-static-groups"]
    _refused = main([*dynamic, str(tmp_path / "model"), str(tmp_path / "out"), "--dataset", str(calib), "--offload",
                     "disk", "--format", "compressed-tensors", "-q"])  # fmt: skip
    assert _refused == 2 and "cannot store act-order with dynamic groups" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()

    # what the model's structure shows, before it loads: GPT-2's Conv1D linears
    save_tiny_model(tmp_path / "gpt2", arch="gpt2")
    conv1d = ["quantize", "rtn", str(tmp_path / "gpt2"), str(tmp_path / "out"), "--bits", "4", "--group-size", "32"]
    assert main([*conv1d, "--sym", "--offload", "disk", "--format", "compressed-tensors", "-q"]) == 2
    assert "would quantize ['Conv1D'] layers" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["asym", "gpt2", "model"]

    # what only the quantized layers show, when the streamed run ends, its hfcompress checkpoint kept: q, k and v
    # (one matmul in a server) on different grids
    mixed = RTNConfig(bits=4, group_size=32, sym=True, layer_bits={"re:.*k_proj": 8})
    with pytest.raises(ValueError, match="into one matmul") as refused:
        compress_folder(tmp_path / "model", tmp_path / "out", mixed, OutputOptions(offload="disk"),
                        format="compressed-tensors")  # fmt: skip
    kept = tmp_path / ".out.partial" / ".hfcompress-streamed"
    assert f"is kept in {kept}" in str(refused.value) and not (tmp_path / "out").exists()
    assert "--resume to continue" not in caplog.text  # resuming would fail the same way: no such advice
    assert json.loads((kept / "config.json").read_text())["quantization_config"]["quant_method"] == "hfcompress"
    shutil.rmtree(tmp_path / ".out.partial")

    assert main(["export", "compressed-tensors", str(tmp_path / "model"), str(tmp_path / "out")]) == 2
    assert "is not quantized; export compressed-tensors reads hfcompress checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_export_reads_a_checkpoint_of_any_head(tmp_path, capsys):
    """A token classifier exports shard by shard and loads in plain transformers with its head (before: refused,
    the export reading *ForCausalLM and *ForSequenceClassification only)."""
    import transformers
    from architectures import SMALL
    from helpers import VOCAB, token_windows

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=128, num_labels=2, **SMALL)
    model = transformers.BertForTokenClassification(config).eval()
    model.save_pretrained(tmp_path / "model")
    rtn = ["quantize", "rtn", str(tmp_path / "model"), str(tmp_path / "rtn"), "--group-size", "32", "--sym", "-q"]
    assert main(rtn) == 0
    assert main(["export", "compressed-tensors", str(tmp_path / "rtn"), str(tmp_path / "ct"), "-q"]) == 0
    exported = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "ct")
    assert type(exported) is type(model)
    ids = token_windows(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, rtol=0, atol=0.05)
