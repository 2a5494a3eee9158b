"""What a streaming run has finished, kept in its partial output folder so that a killed run can continue
(`--resume`): the settings it runs with, how many blocks are written, what each written layer became, and the
next block's inputs. Only the hidden states are kept: the block's other arguments (position embeddings, masks)
are recomputed from the calibration data, which the settings pin.

Each file is written to a temporary name and renamed, the progress file last: whatever moment a run is killed
at, the progress file names blocks whose shards and inputs are complete on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .capture import BlockInputs, hidden_states_of, with_hidden_states

__all__ = ["ACTIVATIONS_FILE", "PROGRESS_FILE", "RunProgress", "settings_digest"]

PROGRESS_FILE = "hfcompress_progress.json"
ACTIVATIONS_FILE = "hfcompress_activations.safetensors"


def settings_digest(batches: list[torch.Tensor]) -> str:
    """A digest of the calibration token ids (the data a resumed run must calibrate on again)."""
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(batch.to(torch.int64).contiguous().numpy().tobytes())
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


def _hidden(item: BlockInputs) -> torch.Tensor:
    return hidden_states_of(item.args) if item.args else item.kwargs["hidden_states"]


class RunProgress:
    """The progress of one streaming run in `folder`, for `settings` (a JSON-able dict)."""

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings, sort_keys=True))

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
        return state

    def save(self, blocks_done: int, layers: dict, next_inputs: list[BlockInputs] | None) -> None:
        """Record `blocks_done` blocks written, `layers` (per written layer, what rebuilds its module), and the
        inputs of the next block."""
        if next_inputs is not None:
            hidden = {str(i): _hidden(item).contiguous() for i, item in enumerate(next_inputs)}
            temporary = self.folder / (ACTIVATIONS_FILE + ".tmp")
            save_file(hidden, temporary)
            os.replace(temporary, self.folder / ACTIVATIONS_FILE)
        state = {"settings": self.settings, "blocks_done": blocks_done, "layers": layers}
        temporary = self.folder / (PROGRESS_FILE + ".tmp")
        temporary.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, self.folder / PROGRESS_FILE)

    def next_inputs(self, first: list[BlockInputs]) -> list[BlockInputs]:
        """`first` (the first block's inputs, recomputed) with the saved hidden states in place of their own."""
        hidden = load_file(self.folder / ACTIVATIONS_FILE)
        if len(hidden) != len(first):
            raise ValueError(f"the saved block inputs hold {len(hidden)} batches, the calibration data {len(first)}")
        return [with_hidden_states(item, hidden[str(i)]) for i, item in enumerate(first)]

    def clear(self) -> None:
        for name in (PROGRESS_FILE, ACTIVATIONS_FILE):
            (self.folder / name).unlink(missing_ok=True)
