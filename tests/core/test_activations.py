"""Calibration activations kept on disk (`core.activations`) and the walk that spills them."""

from __future__ import annotations

import pytest
import torch

from hfcompress.core.activations import SpilledActivations, SpilledList, check_spill_space, hidden_of
from hfcompress.core.capture import BlockInputs
from hfcompress.core.structure import find_layer_stack
from hfcompress.quantization.api import select_targets
from hfcompress.quantization.config import GPTQConfig
from hfcompress.quantization.gptq_blocks import quantize_blocks
from tests.helpers import tiny_model, token_windows


def _items(n: int, positional: bool) -> list[BlockInputs]:
    torch.manual_seed(0)
    items = []
    for _ in range(n):
        hidden, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
        if positional:
            items.append(BlockInputs((hidden, mask), {"position_ids": torch.arange(5)}))
        else:
            items.append(BlockInputs((), {"hidden_states": hidden, "attention_mask": mask}))
    return items


def _others(item: BlockInputs) -> str:
    """Everything but the hidden states, as text (tensors compared by value)."""
    return repr((item.args[1:], {k: v for k, v in item.kwargs.items() if k != "hidden_states"}))


@pytest.mark.parametrize("positional", [True, False])
def test_spilled_inputs_read_back_what_was_written(tmp_path, positional):
    items = _items(3, positional)
    store = SpilledActivations.spill(tmp_path / "inputs", items)
    assert len(store) == 3 and len(list((tmp_path / "inputs").glob("*.safetensors"))) == 3
    for got, want in zip(store, items, strict=True):
        assert torch.equal(hidden_of(got), hidden_of(want))
        assert _others(got) == _others(want)
    assert torch.equal(hidden_of(store[-1]), hidden_of(items[2]))
    with pytest.raises(IndexError, match="batch 3 of 3"):
        store[3]

    reopened = SpilledActivations.reopen(tmp_path / "inputs", _items(3, positional))
    assert all(torch.equal(hidden_of(a), hidden_of(b)) for a, b in zip(reopened, items, strict=True))
    with pytest.raises(ValueError, match="hold 3 batches, the calibration data 2"):
        SpilledActivations.reopen(tmp_path / "inputs", _items(2, positional))

    again = SpilledActivations(tmp_path / "inputs")  # a new store where an abandoned one was: starts empty
    assert len(again) == 0 and not list((tmp_path / "inputs").iterdir())
    again.remove()
    assert not (tmp_path / "inputs").exists()


def test_a_spilled_list_reads_back_each_output_as_it_was_appended(tmp_path):
    attention = (torch.randn(2, 3, 4), None)
    shared = torch.randn(4, 6)
    items = [attention, torch.randn(5), {"a": shared[:2], "b": shared, "n": 3}, [None, 1.5]]
    store = SpilledList(tmp_path / "records")
    for item in items:
        store.append(item)
    expected = [(attention[0].clone(), None), items[1].clone(), {"a": shared[:2].clone(), "b": shared.clone(), "n": 3}]
    attention[0].add_(1)  # changed in place after it was recorded (some blocks do): the record keeps the output
    shared.zero_()
    assert len(store) == 4
    got = store[0]
    assert isinstance(got, tuple) and got[1] is None and torch.equal(got[0], expected[0][0])
    assert torch.equal(store[1], expected[1])
    assert (
        store[2]["n"] == 3
        and torch.equal(store[2]["a"], expected[2]["a"])
        and torch.equal(store[2]["b"], expected[2]["b"])
    )
    assert store[-1] == [None, 1.5]
    store[1].mul_(0)  # a read is a fresh tensor
    assert torch.equal(store[1], expected[1])
    with pytest.raises(IndexError, match="item 4 of 4"):
        store[4]
    store.remove()
    assert not (tmp_path / "records").exists()


def test_a_walk_that_keeps_its_activations_on_disk_solves_the_same_and_cleans_up(tmp_path):
    config = GPTQConfig(bits=4, group_size=32)
    batches = list(token_windows(8, 32).split(2))
    results = []
    for spill in (None, tmp_path / "spill"):
        model = tiny_model("llama")
        _, blocks = find_layer_stack(model)
        targets = select_targets(model, config)
        if spill is not None:
            spill.mkdir()
        done = quantize_blocks(model, blocks, batches, targets, config, torch.float16, spill=spill)
        results.append((done, model.state_dict()))
    (done_memory, memory), (done_disk, disk) = results
    assert done_disk == done_memory and len(done_disk) > 0
    assert memory.keys() == disk.keys()
    for key, tensor in memory.items():
        assert torch.equal(disk[key], tensor), key
    assert not list((tmp_path / "spill").iterdir()), "every block's spilled inputs and outputs are deleted"


def test_too_little_disk_for_the_activations_is_refused_naming_the_bytes(tmp_path):
    assert check_spill_space(tmp_path, tokens=1000, hidden=64, intermediate=128) == 1000 * (6 * 64 + 3 * 128) * 4
    with pytest.raises(OSError, match=r"about 2,949,120,000,000 MB for 10,000,000,000,000 tokens \(hidden size 4096"):
        check_spill_space(tmp_path, tokens=10**13, hidden=4096, intermediate=16384)
