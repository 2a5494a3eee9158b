"""Checkpoints written before the core/checkpoint redesign (format version 4, hfcompress at af9150c) still load
with the logits they had. The fixtures and how they were made: `legacy/generate.py`."""

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import hfcompress  # noqa: F401  (registers the hfcompress quantization method)
from hfcompress.checkpoint import manifest_of

LEGACY = Path(__file__).parent / "legacy"
CASES = sorted(p.name for p in LEGACY.iterdir() if (p / "config.json").is_file())


def test_every_kind_of_legacy_checkpoint_is_covered():
    assert set(CASES) == {
        "conv-tucker2", "factorized", "factorized-rtn", "gptq", "gptq-act-order", "kmeans", "rtn",
        "sparse-bitmask", "sparse-gptq", "structured-bert", "student", "vq",
    }  # fmt: skip
    assert sum(f.stat().st_size for f in LEGACY.rglob("*") if f.is_file()) < 2 * 1024 * 1024


@pytest.mark.parametrize("name", CASES)
def test_legacy_checkpoint_loads_with_identical_logits(name, tmp_path):
    folder = LEGACY / name
    config = transformers.AutoConfig.from_pretrained(folder)
    model_cls = getattr(transformers, config.architectures[0])
    model = model_cls.from_pretrained(folder).eval()
    expected = load_file(folder / "expected.safetensors")
    inputs = {k: v for k, v in expected.items() if k != "logits"}
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=1e-5, atol=1e-5)
    manifest = manifest_of(model)  # the facts format 4 kept as config attributes read into the manifest
    if name == "student":
        assert manifest.student_layers == [0] and not manifest.needs_hfcompress()
    if name.startswith("sparse"):
        assert manifest.pruning["method"] == "magnitude" and manifest.sparse
    # loaded, it is in the current format: saved again, it reloads with the same logits
    model.save_pretrained(tmp_path)
    reloaded = model_cls.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected["logits"], rtol=1e-5, atol=1e-5)
