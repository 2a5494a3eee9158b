"""`merge_lora_folder`: fold a peft LoRA adapter into a (factorized) model folder and write the result with its
record and card (`hfcompress merge-lora`, and a recipe's `merge_lora` step)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..core.structure import cast_unquantized
from ..hub.record import Step
from ..io import claim_output
from ..lowrank import merge_lora
from ..lowrank.lora import load_lora_updates
from .loading import checkpoint_dtype, checkpoint_task, load_model, load_tokenizer, require_causal_lm
from .options import OutputOptions
from .recording import base_record, quality_metrics, write_output

__all__ = ["merge_lora_folder", "parse_rank"]


def parse_rank(rank) -> str | int:
    """'original', 'exact' or a positive integer (from the command line, a string)."""
    if rank in ("original", "exact"):
        return rank
    try:
        value = int(rank)
    except (TypeError, ValueError):
        value = 0
    if isinstance(rank, bool) or value < 1 or (isinstance(rank, float) and rank != value):
        raise ValueError(f"`rank` must be 'original', 'exact' or a positive integer, got {rank!r}")
    return value


def merge_lora_folder(
    model: str, adapter: str, output: str | os.PathLike, rank="original", options: OutputOptions | None = None
) -> Path:
    """Merge the peft adapter at `adapter` into the model at `model` (see `hfcompress.merge_lora` for `rank`)
    and write it to `output`."""
    options = options or OutputOptions()
    rank = parse_rank(rank)
    load_lora_updates(adapter)  # a missing or damaged adapter fails before the model loads
    if options.eval_dataset or options.eval_tasks:
        require_causal_lm(model, checkpoint_task(model), "--eval-dataset and --eval-tasks")
    with claim_output(output, options.overwrite, [model, adapter, options.eval_dataset]):
        return _merge(model, adapter, output, rank, options)


def _merge(model: str, adapter: str, output, rank, options: OutputOptions) -> Path:
    tokenizer = load_tokenizer(model, required=bool(options.eval_dataset or options.eval_tasks))
    loaded = load_model(model, options.dtype, task=None)  # with the head it was saved with
    record = base_record(loaded, model, options, tokenizer)  # continues the record of a compressed model
    start = time.perf_counter()
    merge_lora(loaded, adapter, rank=rank)
    cast_unquantized(loaded, checkpoint_dtype(model))  # what the merge touched goes back to the checkpoint's dtype
    step = Step("lora-merge", "lowrank-update", {"adapter": adapter, "rank": rank}, None, time.perf_counter() - start)
    quality = quality_metrics(loaded, options, tokenizer)
    return write_output(loaded, model, output, tokenizer, record, step, options, quality)
