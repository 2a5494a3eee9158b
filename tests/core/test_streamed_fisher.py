"""The Fisher pass streamed from a checkpoint (`core.streamed_fisher`) against the same pass on the model loaded
whole (`core.fisher`)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfcompress.core.fisher import output_fisher
from hfcompress.core.streamed_fisher import streamed_output_fisher
from tests.helpers import save_sharded_model, tiny_model, token_windows

NAMES = {
    "llama": ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"],
    "gpt2": ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"],  # blocks that return tuples
}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_fisher_is_the_whole_models(tmp_path, arch):
    tiny_model(arch).save_pretrained(tmp_path / "model", max_shard_size="40KB")  # float32, several shards
    windows = token_windows(6, 16)
    expected = output_fisher(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), windows, NAMES[arch], 4, seed=5)
    (tmp_path / "scratch").mkdir()
    streamed = streamed_output_fisher(tmp_path / "model", windows, NAMES[arch], 4, seed=5, folder=tmp_path / "scratch")
    assert streamed.keys() == expected.keys()
    for name, values in expected.items():
        assert torch.allclose(streamed[name], values, rtol=1e-5, atol=1e-12), name
    assert not any((tmp_path / "scratch").iterdir())  # the block inputs and gradients are removed


def test_half_precision_weights_take_part_as_float32(tmp_path):
    """A float16 checkpoint streams in its own dtype, its maths in float32: the whole model loaded in float32
    (an exact upcast) gives the same information."""
    folder = save_sharded_model(tmp_path / "model")
    windows = token_windows(4, 16)
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = output_fisher(whole, windows, NAMES["llama"], 2, seed=1)
    streamed = streamed_output_fisher(folder, windows, NAMES["llama"], 2, seed=1)
    for name, values in expected.items():
        assert torch.allclose(streamed[name], values, rtol=1e-4, atol=1e-12), name
    seeded = streamed_output_fisher(folder, windows, NAMES["llama"], 2, seed=2)
    assert not torch.equal(seeded["lm_head"], streamed["lm_head"])  # other draws, other information


def test_a_layer_the_model_lacks_is_refused_before_any_work(tmp_path):
    folder = save_sharded_model(tmp_path / "model")
    with pytest.raises(ValueError, match=r"no modules \['model.layers.9.mlp.up_proj'\]"):
        streamed_output_fisher(folder, token_windows(2, 8), ["model.layers.9.mlp.up_proj"])


def test_a_folder_without_room_for_the_activations_is_refused_before_any_work(tmp_path, monkeypatch):
    from collections import namedtuple

    from hfcompress.core import activations

    folder = save_sharded_model(tmp_path / "model")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=r"for the Fisher pass's activations: about 0 MB for 16 tokens through 2 blocks"):
        streamed_output_fisher(folder, token_windows(2, 8), NAMES["llama"], folder=tmp_path)
    assert not any(p.name.startswith("hfcompress-fisher-") for p in tmp_path.iterdir())
