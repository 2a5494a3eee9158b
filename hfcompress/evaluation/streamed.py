"""Perplexity of a model that memory would not hold, streamed from its checkpoint one block at a time: the figure
`perplexity` gives for the model loaded whole, compressed checkpoints included (their packed layers run as
loaded)."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.utils.logging import tqdm

from ..core.activations import hidden_of, require_space
from ..core.memory import trim_heap
from ..core.precision import maths_for
from ..core.streamed_forward import after_stack_inputs, embeddings_left_out, forward_blocks, standing_aside
from ..core.streamed_run import free_large_allocations_for, stored_outside
from ..core.streaming import ShardedCheckpoint, release
from ..core.structure import find_layer_stack
from ..core.walk import block_prefixes

__all__ = ["streamed_perplexity"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def streamed_perplexity(
    model_path: str | os.PathLike,
    windows: torch.Tensor,
    batch_size: int = 4,
    folder: str | os.PathLike | None = None,
) -> float:
    """What `perplexity(model, windows, batch_size)` gives for the causal LM at `model_path` (a local folder of
    safetensors weights, see `core.streaming.streaming_obstacle`; an hfcompress checkpoint runs its compressed
    layers), with one block in memory at a time. Every window passes each block before the next block is read,
    so each block is read once; the hidden states between two blocks wait on disk in a temporary folder inside
    `folder` (default: the system's), `8 x tokens x hidden size` bytes at most, removed at the end. The output
    layer takes one window at a time (the logits of a batch of long windows over a large vocabulary would
    outweigh a block)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"`windows` must be [n_windows, seq_len >= 2], got {tuple(windows.shape)}")
    checkpoint = ShardedCheckpoint(model_path)
    model = checkpoint.skeleton("causal-lm", checkpoint.stored_dtype(), compressed=True)
    _, blocks = find_layer_stack(model, compressed=True)
    prefixes = block_prefixes(model, blocks)
    free_large_allocations_for(blocks)
    batches = list(windows.split(batch_size))
    folder = Path(folder if folder is not None else tempfile.gettempdir())
    hidden_size = model.config.get_text_config().hidden_size
    require_space(folder, 2 * windows.numel() * hidden_size * 4, "the streamed perplexity's activations",
                  f"{windows.numel():,} tokens of width {hidden_size}", "use fewer windows, or give another folder")  # fmt: skip
    total_nll, total_tokens = 0.0, 0
    with tempfile.TemporaryDirectory(prefix="hfcompress-perplexity-", dir=folder) as scratch:
        outside = stored_outside(model, prefixes)
        stores, returns_tuple = forward_blocks(model, checkpoint, blocks, prefixes, outside, batches, Path(scratch),
                                               None, keep=False, desc="perplexity: blocks")  # fmt: skip
        last = stores[-1]
        embeds = embeddings_left_out(model)
        checkpoint.materialize(model, [n for n in outside if n not in embeds], None)
        model.tie_weights()
        with standing_aside(blocks, returns_tuple) as current, maths_for(model):
            for index, batch in enumerate(tqdm(batches, desc="perplexity: output layer")):
                hidden = hidden_of(last[index])
                for row in range(len(batch)):  # a window at a time: its logits are the largest tensor of the pass
                    window = batch[row : row + 1]
                    current["hidden"] = hidden[row : row + 1]
                    inputs = after_stack_inputs(model, window, current["hidden"], bool(embeds))
                    logits = model(**inputs).logits[:, :-1].float()
                    targets = window[:, 1:]
                    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
                    total_nll += float(nll)
                    total_tokens += targets.numel()
                    del logits
        release(model)
        trim_heap()
    logger.info("perplexity of %d windows: %d blocks streamed from %s", len(windows), len(blocks), model_path)
    return math.exp(total_nll / total_tokens)
