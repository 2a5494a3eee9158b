"""A checkpoint `save_pretrained` wrote under the names transformers converts on loading (GPT-NeoX's `embed_out`,
ViT's `encoder.layer`, LLaVA's `language_model.model`: what a run in memory writes) streams as one written under
the model's own names (what a streamed run writes): every pass that reads a compressed checkpoint block by block
finds its tensors under either."""

import re

import pytest
import torch
from architectures import BUILDERS
from helpers import python_text, read_safetensors, tiny_tokenizer

from hfcompress.commands.cli import main

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
    return folders


def test_the_two_write_the_names_their_savers_write(quantized):
    memory, streamed = (read_safetensors(quantized["GPT-NeoX"][o]) for o in ("none", "disk"))
    assert "embed_out.weight" in memory and "lm_head.weight" in streamed  # save_pretrained reverts the renaming


@pytest.mark.parametrize("arch", ["GPT-NeoX", "ViT", "LLaVA (language model)"])
def test_either_exports_to_the_same_compressed_tensors_files(quantized, tmp_path, arch):
    exported = {}
    for offload, folder in quantized[arch].items():
        assert main(["export", "compressed-tensors", str(folder), str(tmp_path / offload), "-q"]) == 0
        exported[offload] = read_safetensors(tmp_path / offload)
    memory, streamed = exported["none"], exported["disk"]
    assert memory.keys() == streamed.keys() and all(torch.equal(memory[k], streamed[k]) for k in memory)
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
