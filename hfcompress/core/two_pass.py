"""A compression streamed from disk in two passes (`stream_twice`): the first pass's output kept as a checkpoint
inside the output folder, the second streamed from it, for a technique that changes the whole model before it
calibrates it again (AWQ or SmoothQuant scales folded, then GPTQ on the smoothed model)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from .activations import SCRATCH
from .distributed import barrier, decided_by_main, is_main, path_of_main
from .resume import PROGRESS_FILE
from .shard_writer import INDEX_FILE
from .streamed_run import StreamedTechnique, stream_compress
from .streaming import ShardedCheckpoint

__all__ = ["FIRST_PASS", "stream_twice"]

# where `stream_twice` keeps the first pass's checkpoint (removed with the run's other scratch files at the end)
FIRST_PASS = f"{SCRATCH}first-pass"


def stream_twice(
    model_path: str | os.PathLike,
    folder: str | os.PathLike,
    first: StreamedTechnique,
    second: StreamedTechnique,
    task: str = "causal-lm",
    resume: bool = False,
    format: str = "hfcompress",
) -> nn.Module:
    """`first` streamed from `model_path` into a checkpoint kept inside `folder`, then `second` streamed from that
    checkpoint into `folder`: for a technique that, in memory too, changes the whole model before it calibrates
    it again (AWQ or SmoothQuant scales folded, then GPTQ on the smoothed model). The kept checkpoint costs a copy
    of the model on disk (in its stored dtype, as the run in memory holds it) until the second pass completes.
    Each pass resumes where it stopped; the returned skeleton is the second's. Across processes, every rank runs
    both passes on its share of the data (its progress in its own `folder`), rank 0 alone writes the first pass's
    checkpoint, and every rank streams the second pass from it."""
    between = Path(folder) / FIRST_PASS
    written = path_of_main(between)  # rank 0's: the copy every rank's second pass reads
    complete = (written / INDEX_FILE).is_file() and not (written / PROGRESS_FILE).is_file()
    if not decided_by_main(complete):  # rank 0's copy is the one that counts
        if is_main():
            _check_room_for_copy(model_path, folder)
        between.mkdir(exist_ok=True)
        stream_compress(model_path, between, first, task, resume, format)
        barrier()  # rank 0's copy is complete before any rank reads it
    # text is tokenized as the first pass tokenized it: the kept checkpoint has no tokenizer of its own
    if second.tokenizer is None and not isinstance(getattr(second.config, "dataset", None), torch.Tensor):
        second.tokenizer = first.tokenizer or AutoTokenizer.from_pretrained(model_path)
    model = stream_compress(written, folder, second, task, resume, format)
    model.config._name_or_path = os.fspath(model_path)
    return model


def _check_room_for_copy(model_path, folder) -> None:
    """Refuse, before any work, a `folder` without room for a copy of the checkpoint at `model_path`."""
    files = set(ShardedCheckpoint(model_path).weight_map.values())
    needed = sum((Path(model_path) / file).stat().st_size for file in files)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(
            f"not enough free space in {os.fspath(folder)!r} for the first pass's copy of the model: "
            f"{needed / 1e6:,.0f} MB needed, {free / 1e6:,.0f} MB free; free some space or load the model whole "
            "(--offload none)"
        )
