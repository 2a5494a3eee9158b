"""Calibration activations kept on disk: a block's inputs (or outputs) whose hidden states are written to one
safetensors file per batch as they are produced and read back one batch at a time, so a streamed run holds one
batch of them in memory instead of every calibration token's.

    store = SpilledActivations(folder / "activations-0003")
    for item in outputs: store.append(item)          # written at once
    for item in store: block(*item.args, **item.kwargs)   # read back batch by batch

Only the hidden states go to disk; a batch's other arguments (position embeddings, masks) are small and stay
in memory. Files are written to a temporary name and renamed, so a file that exists is complete.
`SpilledList` does the same for any module's outputs (tensors inside tuples, lists, dicts), for the
submodule outputs and linear inputs a block's staged calibration keeps between its stages.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils._pytree import tree_flatten, tree_unflatten

from .capture import BlockInputs, hidden_states_of, with_hidden_states

__all__ = [
    "INPUTS",
    "OUTPUTS",
    "SCRATCH",
    "SpilledActivations",
    "SpilledList",
    "check_spill_space",
    "hidden_of",
    "require_space",
]

_KEY = "hidden_states"
# how the folders of a walk's spilled activations begin (`core.walk`): a block's inputs, its outputs
INPUTS, OUTPUTS = "inputs-", "outputs-"
# how the folders a block's staged calibration keeps its records in begin (`core.calibration`)
SCRATCH = "scratch-"


def check_spill_space(folder: str | os.PathLike, tokens: int, hidden: int, intermediate: int) -> int:
    """Refuse, before any work, a `folder` without room for a walk's spilled activations: `tokens` calibration
    tokens through blocks of width `hidden` and MLP width `intermediate`; returns the bytes set aside.

    A block's inputs and outputs, what its staged calibration records (norm, attention and MLP outputs, the
    activation's output) and the inputs it keeps take at most about 6 hidden-sized and 3 intermediate-sized
    float32 values per token at once (measured on a Llama: 12 hidden-sized values with intermediate = 2.7 x
    hidden, where this estimate gives 14)."""
    needed = tokens * (6 * hidden + 3 * intermediate) * 4
    require_space(
        folder, needed, "the calibration activations kept on disk",
        f"{tokens:,} tokens (hidden size {hidden}, intermediate size {intermediate})",
        "use fewer calibration tokens, or load the model whole (--offload none)",
    )  # fmt: skip
    return needed


def require_space(folder: str | os.PathLike, needed: int, what: str, amount: str, advice: str) -> None:
    """Refuse a `folder` with fewer than `needed` bytes free for `what`, saying what they hold (`amount`) and
    what else to do (`advice`)."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(
            f"not enough free space in {os.fspath(folder)!r} for {what}: about {needed / 1e6:,.0f} MB for {amount}, "
            f"{free / 1e6:,.0f} MB free; free some space, {advice}"
        )


def hidden_of(item: BlockInputs):
    """The hidden states among a block call's arguments."""
    return hidden_states_of(item.args) if item.args else item.kwargs[_KEY]


class SpilledActivations(Sequence):
    """Block inputs whose hidden states live in `folder`, one file per batch. The folder is created empty
    (whatever an abandoned attempt or a killed run left there is removed)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self._others: list[BlockInputs] = []  # each batch's arguments, its hidden states left out

    @classmethod
    def spill(cls, folder: str | os.PathLike, items) -> SpilledActivations:
        """A store in `folder` holding `items` (block inputs)."""
        store = cls(folder)
        for item in items:
            store.append(item)
        return store

    @classmethod
    def reopen(cls, folder: str | os.PathLike, others: list[BlockInputs]) -> SpilledActivations:
        """The store an earlier process wrote into `folder`, the batches' other arguments taken from `others`
        (block inputs recomputed from the same calibration data: their own hidden states are ignored)."""
        store = cls.__new__(cls)
        store.folder = Path(folder)
        found = len(list(store.folder.glob("*.safetensors")))
        if found != len(others):
            raise ValueError(
                f"the block inputs saved in {os.fspath(folder)!r} hold {found} batches, the calibration data "
                f"{len(others)}"
            )
        store._others = [with_hidden_states(item, None) for item in others]
        return store

    def append(self, item: BlockInputs) -> None:
        _save({_KEY: hidden_of(item)}, _path(self.folder, len(self._others)))
        self._others.append(with_hidden_states(item, None))

    def __len__(self) -> int:
        return len(self._others)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        index %= len(self)
        return with_hidden_states(self._others[index], load_file(_path(self.folder, index))[_KEY])

    def remove(self) -> None:
        """Delete the files (the store cannot be read afterwards)."""
        shutil.rmtree(self.folder, ignore_errors=True)


class SpilledList(Sequence):
    """A list of module outputs whose tensors live in `folder` (created empty), one file per item; what is not a
    tensor (None, numbers, the nesting) stays in memory. Each read returns new tensors: an item changed in
    place after it was appended, or after it was read, is still read back as it was appended."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self._items: list[tuple] = []  # (leaves with tensors replaced by None, which leaves are tensors, spec)

    def append(self, item) -> None:
        leaves, spec = tree_flatten(item)
        tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        _save({str(i): leaves[i] for i in tensors}, _path(self.folder, len(self._items)))
        self._items.append(([None if i in tensors else leaf for i, leaf in enumerate(leaves)], tensors, spec))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        index %= len(self)
        leaves, tensors, spec = self._items[index]
        stored = load_file(_path(self.folder, index)) if tensors else {}
        leaves = [stored[str(i)] if i in tensors else leaf for i, leaf in enumerate(leaves)]
        return tree_unflatten(leaves, spec)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.safetensors"


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` (each with storage of its own, as safetensors requires) to a temporary name, renamed."""
    owned = {k: t.detach().contiguous() for k, t in tensors.items()}
    if len({t.untyped_storage().data_ptr() for t in owned.values()}) < len(owned) or any(
        t.untyped_storage().nbytes() != t.numel() * t.element_size() for t in owned.values()
    ):
        owned = {k: t.clone() for k, t in owned.items()}
    temporary = path.with_name(path.name + ".tmp")
    save_file(owned, temporary)
    os.replace(temporary, path)
