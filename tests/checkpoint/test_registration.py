"""`import hfcompress` lets `from_pretrained` load hfcompress checkpoints whichever is imported first:
transformers' quantizer registry (registered at once) or hfcompress (registered when the registry loads)."""

import subprocess
import sys
from pathlib import Path

import pytest

RTN = Path(__file__).parent / "legacy" / "rtn"

LOAD = (
    "from transformers import AutoModelForCausalLM\n"
    f"model = AutoModelForCausalLM.from_pretrained({str(RTN)!r})\n"
    "print(type(model.get_submodule('model.layers.0.self_attn.q_proj')).__name__)\n"
)


@pytest.mark.parametrize(
    "order",
    [
        "import hfcompress\n",  # before transformers: registered when its quantizer registry is imported
        "import transformers.quantizers.auto\nimport hfcompress\n",  # after: registered at import
    ],
)
def test_from_pretrained_loads_hfcompress_checkpoints_in_either_import_order(order):
    result = subprocess.run([sys.executable, "-c", order + LOAD], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["QuantLinear"]


def test_without_import_hfcompress_the_checkpoint_is_refused():
    result = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True)
    assert result.returncode != 0
    assert "hfcompress" in result.stderr
