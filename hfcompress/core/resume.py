"""What a streaming run has finished, kept in its partial output folder so that a killed run can continue
(`--resume`): the settings it runs with, how many blocks are written, what each written layer became, and
which folder holds the next block's inputs (the run keeps its activations on disk in the same folder,
`core.activations`). Only the hidden states are kept: the block's other arguments (position embeddings, masks)
are recomputed from the calibration data, which the settings pin.

Each file is written to a temporary name and renamed, the progress file last: whatever moment a run is killed
at, the progress file names blocks whose shards and inputs are complete on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .activations import INPUTS, OUTPUTS, SCRATCH, SpilledActivations
from .capture import BlockInputs

__all__ = ["PROGRESS_FILE", "RunProgress", "settings_digest"]

PROGRESS_FILE = "hfcompress_progress.json"


def settings_digest(batches: list[torch.Tensor]) -> str:
    """A digest of the calibration token ids or images (the data a resumed run must calibrate on again)."""
    digest = hashlib.sha256()
    for batch in batches:
        exact = batch.float() if batch.is_floating_point() else batch.to(torch.int64)
        digest.update(exact.contiguous().numpy().tobytes())
    return digest.hexdigest()


def _flat(settings: dict) -> dict:
    """`{"config": {"bits": 4}}` as `{"config.bits": 4}`, so a refusal names the one setting that changed."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


class RunProgress:
    """The progress of one streaming run in `folder`, for `settings` (a JSON-able dict)."""

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings, sort_keys=True))
        self.inputs: str | None = None  # the folder the last save named as the next block's inputs

    def load(self) -> dict | None:
        """What an earlier run in this folder finished (`blocks_done`, `layers`), or None if nothing; refuses a
        folder written with other settings, naming what differs."""
        path = self.folder / PROGRESS_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text(encoding="utf-8"))
        before, now = _flat(state.get("settings", {})), _flat(self.settings)
        differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if differ:
            details = "; ".join(f"{k} was {before.get(k)!r}, now {now.get(k)!r}" for k in differ)
            raise ValueError(
                f"cannot resume: the unfinished run in {os.fspath(self.folder)!r} used other settings ({details}); "
                "run the same command as before with --resume, or without --resume to start over"
            )
        self.inputs = state.get("inputs")
        return state

    def step_back(self, state: dict, prefix: str, calibrated: bool = True) -> dict | None:
        """`state` (as `load` gave it) one block earlier, the block `prefix` to be done again; a `calibrated` run
        from the inputs the save before named (kept until every rank had saved past them:
        `core.block_stream.BlockStream.offload`). None for the first block of a calibrated run (its inputs are
        captured again)."""
        if calibrated and (state["blocks_done"] == 1 or state.get("previous") is None):
            return None
        layers = {n: v for n, v in state["layers"].items() if not n.startswith(prefix + ".")}
        self.inputs = state.get("previous")
        return {**state, "blocks_done": state["blocks_done"] - 1, "layers": layers, "inputs": self.inputs}

    def save(self, blocks_done: int, layers: dict, next_inputs: SpilledActivations | None) -> None:
        """Record `blocks_done` blocks written, `layers` (per written layer, what rebuilds its module), and the
        inputs of the next block (kept on disk inside this run's folder)."""
        state = {"settings": self.settings, "blocks_done": blocks_done, "layers": layers, "previous": self.inputs}
        if next_inputs is not None:
            if next_inputs.folder.parent != self.folder:
                raise ValueError(f"the next block's inputs must be kept in {self.folder}, not {next_inputs.folder}")
            state["inputs"] = self.inputs = next_inputs.folder.name
        temporary = self.folder / (PROGRESS_FILE + ".tmp")
        temporary.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, self.folder / PROGRESS_FILE)

    def next_inputs(self, first: list[BlockInputs]) -> SpilledActivations:
        """The saved inputs of the next block (as `load` or `step_back` named them), with the other arguments of
        `first` (the first block's inputs, recomputed)."""
        return SpilledActivations.reopen(self.folder / self.inputs, first)

    def clear(self) -> None:
        """Remove the progress file and every kept activation (the run is complete)."""
        (self.folder / PROGRESS_FILE).unlink(missing_ok=True)
        for path in self.folder.iterdir():
            if path.is_dir() and path.name.startswith((INPUTS, OUTPUTS, SCRATCH)):
                shutil.rmtree(path)
