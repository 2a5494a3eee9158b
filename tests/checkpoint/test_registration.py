"""`import hfcompress` lets `from_pretrained` load hfcompress checkpoints whichever is imported first:
transformers' quantizer registry (registered at once) or hfcompress (registered when the registry loads)."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_model

import hfcompress

LEGACY = Path(__file__).parent / "legacy"
RTN = LEGACY / "rtn"

LOAD = (
    "import torch\n"
    "from transformers import AutoModelForCausalLM\n"
    "for name in ('rtn', 'sparse-bitmask'):\n"
    f"    model = AutoModelForCausalLM.from_pretrained({str(LEGACY)!r} + '/' + name)\n"
    "    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()  # no layer left on the meta device\n"
    "    print(type(model.get_submodule('model.layers.0.self_attn.q_proj')).__name__)\n"
)


@pytest.mark.parametrize(
    "order",
    [
        "import hfcompress\n",  # before transformers: registered when its quantizer registry is imported
        "import transformers.quantizers.auto\nimport hfcompress\n",  # after: registered at import
        "import hfcompress.checkpoint.hf_quantizer\n",  # the quantizer module imports the registry itself
    ],
)
def test_from_pretrained_loads_hfcompress_checkpoints_in_either_import_order(order):
    result = subprocess.run([sys.executable, "-c", order + LOAD], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["QuantLinear", "SparseLinear"]
    assert "could not register" not in result.stderr


def test_without_import_hfcompress_the_checkpoint_is_refused():
    result = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True)
    assert result.returncode != 0
    assert "hfcompress" in result.stderr


def test_plain_transformers_refuses_a_bitmask_checkpoint_instead_of_loading_random_weights(tmp_path):
    model = tiny_model()
    hfcompress.prune_oneshot(model, hfcompress.OneShotPruningConfig(method="magnitude", sparsity=0.5))
    hfcompress.compress_sparse(model)
    model.save_pretrained(tmp_path)
    code = f"from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0  # a 1-D `weight` where a 2-D one belongs: transformers stops
    assert "weight" in result.stderr
