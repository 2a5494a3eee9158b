"""The streamed run's driver (`core.streamed_run`), beyond what each technique's streaming tests check."""

from __future__ import annotations

import pytest
from torch import nn

import hfcompress  # noqa: F401  (registers the checkpoint format)
from hfcompress.core.activations import SpilledActivations, hidden_of
from hfcompress.core.streamed_run import StreamedTechnique, stream_compress
from hfcompress.core.structure import candidate_linears, set_submodule
from hfcompress.quantization import GPTQConfig
from hfcompress.steps import OutputOptions, compress_folder
from tests.helpers import failing_at_shard, read_safetensors, save_sharded_model, token_windows


def test_a_resumed_run_recomputes_only_the_other_arguments_of_the_first_inputs(tmp_path, monkeypatch):
    """The hidden states of a resumed block come from disk; the first block's, recomputed to get the position
    embeddings and masks, are not held (for a large calibration set they are what spilling saves)."""
    model = save_sharded_model(tmp_path / "model")
    config = GPTQConfig(bits=4, group_size=32, dataset=token_windows(8, 32))
    whole = compress_folder(model, tmp_path / "whole", config, OutputOptions(offload="disk"))

    with failing_at_shard(1), pytest.raises(RuntimeError, match="killed"):
        compress_folder(model, tmp_path / "out", config, OutputOptions(offload="disk"))

    reopen, given = SpilledActivations.reopen.__func__, []

    def recording_reopen(cls, folder, others):
        given.extend(others)
        return reopen(cls, folder, others)

    monkeypatch.setattr(SpilledActivations, "reopen", classmethod(recording_reopen))
    resumed = compress_folder(model, tmp_path / "out", config, OutputOptions(offload="disk", resume=True))
    assert len(given) == 2 and all(hidden_of(item) is None for item in given)  # 8 windows in batches of 4
    expected, written = read_safetensors(whole), read_safetensors(resumed)
    assert written.keys() == expected.keys() and all((written[k] == v).all() for k, v in expected.items())


def test_targets_swapped_for_their_compressed_form_are_freed_with_their_block(tmp_path):
    """A technique that swaps a layer for a new module leaves the old one outside the block that is released
    after writing: the run frees it all the same (else each block's weights stayed resident: 360 MB a block
    on a 1.47B Llama pruned to bitmask + values)."""
    model = save_sharded_model(tmp_path / "model")
    swapped = {}

    class Swapping(StreamedTechnique):
        def targets(self, model):
            return candidate_linears(model, ["lm_head"])

        def compress_layer(self, model, name, module):
            swapped[name] = module
            replacement = nn.Linear(module.in_features, module.out_features, bias=False)
            replacement.weight.data = module.weight.detach().clone()
            set_submodule(model, name, replacement)

    (tmp_path / "out").mkdir()
    stream_compress(model, tmp_path / "out", Swapping(GPTQConfig(bits=4)))
    assert swapped and all(m.weight.device.type == "meta" for m in swapped.values())
