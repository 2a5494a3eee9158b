"""The sensitivity pass of the GPTQ search (`search_gptq.py`) on a model streamed from its checkpoint, for models
that memory would not hold: each layer's GPTQ output errors at every width from one walk over the blocks read
from disk (`quantization.gptq_streams.quantize_streams` with a `core.block_stream.ReadingStream`), weighted by the
Fisher information from a backward pass streamed the same way (`core.streamed_fisher`). The scores are those the
search computes on the model loaded whole; the knapsack (`search_gptq.allocate_bits`) then needs only them.

    scores = streamed_gptq_scores("Llama-3.1-70B", GPTQConfig(group_size=128, dataset="calib.txt"), [2, 3, 4, 8],
                                  fisher_windows=windows[:8])
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from ..core.activations import SpilledActivations
from ..core.block_stream import ReadingStream
from ..core.streamed_fisher import streamed_output_fisher
from ..core.streamed_run import capture_first_inputs, free_large_allocations_for, stored_outside
from ..core.streaming import ShardedCheckpoint
from ..core.structure import find_layer_stack
from ..core.walk import block_prefixes
from ..data import calibration_data
from ..quantization.api import select_targets
from ..quantization.config import GPTQConfig
from ..quantization.gptq_streams import quantize_streams
from .sensitivity import fisher_scores

__all__ = ["streamed_gptq_scores"]

logger = logging.getLogger(__name__)


def streamed_gptq_scores(
    model_path: str | os.PathLike,
    config: GPTQConfig,
    bits_options: list[int],
    fisher_windows: torch.Tensor,
    tokenizer=None,
    batches: list[torch.Tensor] | None = None,
    folder: str | os.PathLike | None = None,
    task: str = "causal-lm",
) -> dict[str, dict[str, float]]:
    """`{layer: {"<b>bit": score}}` for every target of `config` in the block stack and every width of
    `bits_options`: the estimated KL divergence the layer costs alone at that width (`sensitivity.fisher_scores`),
    the model at `model_path` (a local folder of safetensors weights) read one block at a time. GPTQ calibrates on
    `batches` (default: `config.dataset`, tokenized by `tokenizer`), the Fisher information on `fisher_windows`
    [n, seq_len]. Activations are kept on disk in temporary folders inside `folder` (default: the system's)."""
    if config.layer_bits:
        raise ValueError("the sensitivity pass measures every layer at every width: pass a config without layer_bits")
    checkpoint = ShardedCheckpoint(model_path)
    dtype = checkpoint.stored_dtype()
    model = checkpoint.skeleton(task, dtype)
    _, blocks = find_layer_stack(model)
    prefixes = block_prefixes(model, blocks)
    free_large_allocations_for(blocks)
    targets = select_targets(model, config)
    inside = [n for n in targets if any(n.startswith(p + ".") for p in prefixes)]
    if batches is None:
        batches = calibration_data(model, config, tokenizer)
    streams = {f"{b}bit": dict.fromkeys(targets, b) for b in bits_options}
    with tempfile.TemporaryDirectory(prefix="hfcompress-sensitivity-", dir=folder) as scratch:
        spilled = SpilledActivations(Path(scratch) / "inputs-0")
        outside = stored_outside(model, prefixes)
        first = capture_first_inputs(model, checkpoint, blocks[0], outside, batches, spilled, dtype)
        results = quantize_streams(
            model, config, streams, batches=batches, disk=ReadingStream(model, checkpoint, dtype), inputs=first,
            spill=scratch, keep_codes=False,
        )  # fmt: skip
    errors = {setting: {n: r.row_error for n, r in layers.items()} for setting, layers in results.items()}
    fisher = streamed_output_fisher(model_path, fisher_windows, inside, task=task, folder=folder)
    logger.info("sensitivities of %d layers at %d widths, streamed from %s", len(inside), len(streams), model_path)
    return fisher_scores(fisher, errors)
