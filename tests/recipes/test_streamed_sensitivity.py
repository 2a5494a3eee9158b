"""The GPTQ search's sensitivity pass streamed from a checkpoint (`recipes.streamed_sensitivity`) against the pass
on the model loaded whole, as `search_gptq.gptq_candidates` runs it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfcompress.core.fisher import output_fisher
from hfcompress.data import calibration_data
from hfcompress.quantization import GPTQConfig
from hfcompress.quantization.gptq_streams import quantize_streams
from hfcompress.recipes.sensitivity import fisher_scores
from hfcompress.recipes.streamed_sensitivity import streamed_gptq_scores
from tests.helpers import save_sharded_model, token_windows


@pytest.mark.parametrize("prune, true_sequential", [(False, True), (True, True), (False, False)])
def test_streamed_scores_are_the_whole_models(tmp_path, prune, true_sequential):
    """Float16 shards streamed with float32 maths against the model loaded in float32; with `prune` half of every
    block weight is zero, which GPTQ keeps (the streamed pass plans each layer once its weights are read). Streamed,
    solved layers run on their codes until the stream ends; two passes per block run the block on its original
    weights first, which each stream must find again."""
    folder = save_sharded_model(tmp_path / "model", prune=prune)
    config = GPTQConfig(
        bits=4, group_size=32, dataset=token_windows(8, 32), num_samples=8, true_sequential=true_sequential
    )
    windows = token_windows(4, 16, seed=3)
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    batches = calibration_data(whole, config)
    results = quantize_streams(whole, config, _streams(whole, config), batches=batches)
    errors = {s: {n: r.row_error for n, r in layers.items()} for s, layers in results.items()}
    names = sorted(n for n in results["2bit"] if results["2bit"][n].row_error is not None)
    expected = fisher_scores(output_fisher(whole, windows, names), errors)

    (tmp_path / "scratch").mkdir()
    scores = streamed_gptq_scores(folder, config, [2, 4], windows, batches=batches, folder=tmp_path / "scratch")
    assert scores.keys() == expected.keys() and len(scores) == 14  # 2 blocks of 7 linears
    for name, row in expected.items():
        assert row.keys() == {"2bit", "4bit"}
        for setting, value in row.items():
            assert scores[name][setting] == pytest.approx(value, rel=1e-4), (name, setting)
    assert not any((tmp_path / "scratch").iterdir())


def _streams(model, config):
    from hfcompress.quantization.api import select_targets

    targets = select_targets(model, config)
    return {f"{b}bit": dict.fromkeys(targets, b) for b in (2, 4)}
