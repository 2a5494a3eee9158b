"""The progress a streamed run keeps for `--resume`: what a rank that a kill left one block ahead of the others
steps back to (`RunProgress.step_back`, used across processes by `core.streamed_run`)."""

import pytest

from hfcompress.core.activations import SpilledActivations
from hfcompress.core.resume import RunProgress


def _run_three_blocks(folder) -> RunProgress:
    progress = RunProgress(folder, {"config": {"bits": 4}})
    layers = {}
    for block in range(3):
        layers[f"model.layers.{block}.mlp.up_proj"] = block
        progress.save(block + 1, dict(layers), SpilledActivations(folder / f"outputs-model.layers.{block}"))
    return progress


def test_stepping_back_names_the_inputs_the_save_before_named_and_forgets_the_block(tmp_path):
    _run_three_blocks(tmp_path)
    progress = RunProgress(tmp_path, {"config": {"bits": 4}})
    state = progress.load()
    assert state["blocks_done"] == 3 and progress.inputs == "outputs-model.layers.2"
    back = progress.step_back(state, "model.layers.2")
    assert back["blocks_done"] == 2 and progress.inputs == back["inputs"] == "outputs-model.layers.1"
    assert back["layers"] == {"model.layers.0.mlp.up_proj": 0, "model.layers.1.mlp.up_proj": 1}
    progress.save(3, {}, SpilledActivations(tmp_path / "outputs-model.layers.2"))  # block 2 done again
    assert RunProgress(tmp_path, {"config": {"bits": 4}}).load()["previous"] == "outputs-model.layers.1"


@pytest.mark.parametrize("calibrated", [True, False])
def test_stepping_back_to_the_first_block(tmp_path, calibrated):
    progress = RunProgress(tmp_path, {})
    progress.save(1, {"model.layers.0.mlp.up_proj": 0}, SpilledActivations(tmp_path / "outputs-model.layers.0"))
    state = RunProgress(tmp_path, {}).load()
    back = progress.step_back(state, "model.layers.0", calibrated)
    if calibrated:  # the first block's inputs are captured again
        assert back is None
    else:  # no inputs to go back to
        assert back["blocks_done"] == 0 and back["layers"] == {}
