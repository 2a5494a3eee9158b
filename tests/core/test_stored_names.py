"""A checkpoint `save_pretrained` wrote under the names transformers converts on loading (GPT-NeoX's `embed_out`,
ViT's `encoder.layer`, LLaVA's `language_model.model`) is what a run in memory and a streamed run both write, and
it streams as one written under the model's own names (what a streamed run wrote before): every pass that reads a
compressed checkpoint block by block finds its tensors under either."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from architectures import BUILDERS
from helpers import python_text, read_safetensors, tiny_tokenizer
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from hfcompress.commands.cli import main
from hfcompress.core.shard_writer import ShardWriter
from hfcompress.core.stored_layout import SavedNames

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """Each model quantized in memory and streamed, in hfcompress's format: {arch: {offload: folder}}."""
    root = tmp_path_factory.mktemp("stored-names")
    folders = {}
    for arch in ("GPT-NeoX", "ViT", "LLaVA (language model)"):
        torch.manual_seed(0)
        model = root / arch.split()[0]
        BUILDERS[arch][1]().save_pretrained(model)
        tiny_tokenizer().save_pretrained(model)
        folders[arch] = {}
        for offload in ("none", "disk"):
            out = root / f"{model.name}-{offload}"
            assert (
                main(["quantize", "rtn", str(model), str(out), "--group-size", "32", "--offload", offload, "-q"]) == 0
            )
            folders[arch][offload] = out
        folders[arch]["own names"] = _under_model_names(folders[arch]["disk"], root / f"{model.name}-own")
    return folders


def _under_model_names(folder: Path, into: Path) -> Path:
    """A copy of the checkpoint in `folder` with its tensors under the model's own names, as streamed runs wrote
    them before they took `save_pretrained`'s."""
    shutil.copytree(folder, into)
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        names = SavedNames.of(getattr(transformers, config.architectures[0])(config))
    weight_map, renamed = {}, 0
    for file in into.glob("*.safetensors"):
        tensors = {names.model_name(key): value for key, value in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file.name))
        renamed += len(set(tensors) - set(load_file(folder / file.name)))
    assert renamed  # the names differ
    index = into / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    return into


@pytest.mark.parametrize("arch", ["GPT-NeoX", "ViT", "LLaVA (language model)"])
def test_a_streamed_run_writes_the_names_and_tensors_a_run_in_memory_writes(quantized, arch):
    memory, streamed = (read_safetensors(quantized[arch][o]) for o in ("none", "disk"))
    assert streamed.keys() == memory.keys()
    assert all(torch.equal(streamed[k], memory[k]) for k in memory)
    saved = {
        "GPT-NeoX": "embed_out.weight",
        "ViT": "attention.attention.query",
        "LLaVA (language model)": "language_model.model.",
    }
    assert any(saved[arch] in key for key in streamed)  # save_pretrained's names, not the model's


@pytest.mark.parametrize("arch", ["GPT-NeoX", "ViT", "LLaVA (language model)"])
def test_either_exports_to_the_same_compressed_tensors_files(quantized, tmp_path, arch):
    exported = {}
    for offload, folder in quantized[arch].items():
        assert main(["export", "compressed-tensors", str(folder), str(tmp_path / offload), "-q"]) == 0
        exported[offload] = read_safetensors(tmp_path / offload)
    memory = exported.pop("none")
    for other in exported.values():
        assert memory.keys() == other.keys() and all(torch.equal(memory[k], other[k]) for k in memory)
    assert any(k.endswith(".weight_packed") for k in memory)


def test_either_streams_its_perplexity(quantized, tmp_path, capsys):
    text = tmp_path / "val.txt"
    text.write_text(python_text()[:8_000], encoding="utf-8")
    found = []
    for folder in quantized["GPT-NeoX"].values():
        for offload in ("none", "disk"):
            options = ["--dataset", str(text), "--seq-len", "32", "--offload", offload, "-q"]
            assert main(["evaluate", str(folder), *options]) == 0
            found.append(float(re.search(r"perplexity\s+([\d.]+)", capsys.readouterr().out).group(1)))
    assert len(set(found)) == 1, found


def test_saved_names_are_save_pretrained_renamings_and_back(tmp_path):
    with torch.device("meta"):
        neox = BUILDERS["GPT-NeoX"][1]()
        names = SavedNames.of(neox)
        assert SavedNames.of(BUILDERS["Llama"][1]()) is None  # saved under its own names
    assert names.saved_name("lm_head.weight") == "embed_out.weight"
    assert names.saved_name("lm_head.qweight") == "embed_out.qweight"  # a compressed layer's tensors too
    for key in neox.state_dict():
        assert names.model_name(names.saved_name(key)) == key
    writer = ShardWriter(tmp_path, n_shards=1, names=names)
    writer.write(0, {"lm_head.weight": torch.ones(2, 2), "gpt_neox.final_layer_norm.weight": torch.ones(2)})
    assert set(read_safetensors(tmp_path)) == {"embed_out.weight", "gpt_neox.final_layer_norm.weight"}
    assert set(writer.read(0)) == set(writer.keys(0)) == {"lm_head.weight", "gpt_neox.final_layer_norm.weight"}


def test_a_block_of_fused_experts_is_written_as_save_pretrained_writes_it_and_rewritten_as_it_was(tmp_path):
    torch.manual_seed(0)
    mixtral = BUILDERS["Mixtral"][1]()
    mixtral.save_pretrained(tmp_path / "whole")
    whole = {k: v for k, v in read_safetensors(tmp_path / "whole").items() if k.startswith("model.layers.1.")}
    assert "model.layers.1.block_sparse_moe.experts.3.w1.weight" in whole  # one tensor per expert, renamed
    writer = ShardWriter(tmp_path / "shards", n_shards=1, names=SavedNames.of(mixtral))
    (tmp_path / "shards").mkdir()
    writer.write(0, {k: v for k, v in mixtral.state_dict().items() if k.startswith("model.layers.1.")})
    written = read_safetensors(tmp_path / "shards")
    assert written.keys() == whole.keys() and all(torch.equal(written[k], whole[k]) for k in whole)
    writer.write(0, writer.read(0))  # read back in that layout (as a compensated run rewrites its shards)
    again = read_safetensors(tmp_path / "shards")
    assert again.keys() == whole.keys() and all(torch.equal(again[k], whole[k]) for k in whole)


def test_a_compensated_streamed_run_rewrites_its_shards_under_the_saved_names(tmp_path):
    torch.manual_seed(0)
    model = tmp_path / "LLaVA"  # its language model's layers are saved under other names
    BUILDERS["LLaVA (language model)"][1]().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    text = tmp_path / "calib.txt"
    text.write_text(python_text()[:20_000], encoding="utf-8")
    written = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        options = [
            "--group-size",
            "32",
            "--lowrank-compensation",
            "4",
            "--dataset",
            str(text),
            "--num-samples",
            "4",
            "--seq-len",
            "32",
        ]
        assert main(["quantize", "gptq", str(model), str(out), *options, "--offload", offload, "-q"]) == 0
        written[offload] = read_safetensors(out)
    memory, streamed = written["none"], written["disk"]
    assert streamed.keys() == memory.keys() and any(".up." in key for key in streamed)
    assert all(torch.allclose(streamed[k].float(), memory[k].float(), atol=1e-5) for k in memory)


def test_a_pruned_checkpoint_under_the_saved_names_streams_its_bitmask_layers(tmp_path):
    """A bitmask-stored pruned LLaVA (its language model's layers saved as `language_model.model.`) is read densely
    block by block by the next technique, as loading it whole reads it."""
    torch.manual_seed(0)
    model = tmp_path / "LLaVA"
    BUILDERS["LLaVA (language model)"][1]().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    written = {}
    for offload in ("none", "disk"):
        pruned = tmp_path / f"pruned-{offload}"
        assert (
            main(["prune", "oneshot", str(model), str(pruned), "--method", "magnitude", "--offload", offload, "-q"])
            == 0
        )
        written[f"pruned-{offload}"] = read_safetensors(pruned)
        out = tmp_path / f"quantized-{offload}"
        assert main(["quantize", "rtn", str(pruned), str(out), "--group-size", "32", "--offload", offload, "-q"]) == 0
        written[f"quantized-{offload}"] = read_safetensors(out)
    assert any(k.startswith("language_model.model.") and k.endswith(".weight_bitmask") for k in written["pruned-disk"])
    for step in ("pruned", "quantized"):
        memory, streamed = written[f"{step}-none"], written[f"{step}-disk"]
        assert streamed.keys() == memory.keys() and all(torch.equal(streamed[k], memory[k]) for k in memory), step
