"""The Fisher pass of `core.fisher.output_fisher` on a model streamed from its checkpoint, one block in memory at a
time, for models that memory would not hold.

A backward pass needs every block's input, and a block's weights, in reverse order. Forward, block by block, each
block's inputs are written to disk (`core.activations.SpilledActivations`); the output layer then turns the last
hidden states into logits, draws the tokens and gives the gradient at the stack's output; backward, block by
block from the last, each block is read again, run on its inputs from disk with their gradient tracked, and the
gradient at its output is carried through it to its input, the next block's starting point. Each block's weights
are read twice, and peak memory is one block (its weights, and their float32 copies that autograd keeps for one
batch), the embeddings and output layer, and one batch of activations; the disk holds every block's inputs
(`4 x tokens x hidden size` bytes per block).

The draws, and the sums, are those of `output_fisher` on the model loaded whole: the same generator draws per
batch in the same order, and the same operations run on the same values (the tests compare both).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .activations import SpilledList, hidden_of, require_space
from .capture import hidden_states_of, with_hidden_states
from .fisher import OutputGradients, sampled_log_likelihood
from .memory import trim_heap
from .precision import maths_for
from .streamed_forward import after_stack_inputs, embeddings_left_out, forward_blocks, standing_aside
from .streamed_run import free_large_allocations_for, stored_outside
from .streaming import ShardedCheckpoint, release, stored_names
from .structure import find_layer_stack
from .walk import block_prefixes

__all__ = ["streamed_output_fisher"]

logger = logging.getLogger(__name__)


def streamed_output_fisher(
    model_path: str | os.PathLike,
    windows: torch.Tensor,
    names: list[str],
    batch_size: int = 2,
    seed: int = 0,
    task: str = "causal-lm",
    folder: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """What `core.fisher.output_fisher` returns for the model at `model_path` (a local folder of safetensors
    weights, see `core.streaming.streaming_obstacle`), computed with one block in memory at a time. Block inputs
    and gradients are kept on disk in a temporary folder inside `folder` (default: the system's), removed at the
    end. Weights stored in bfloat16 or float16 take part in the maths as float32 (`core.precision`)."""
    checkpoint = ShardedCheckpoint(model_path)
    dtype = checkpoint.stored_dtype()
    model = checkpoint.skeleton(task, dtype)
    for p in model.parameters():  # loaded weights take this flag: no gradient of any weight is computed
        p.requires_grad_(False)
    _, blocks = find_layer_stack(model)
    prefixes = block_prefixes(model, blocks)
    free_large_allocations_for(blocks)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"{type(model).__name__} has no modules {unknown[:3]} (of {len(unknown)} asked for)")
    batches = list(windows.split(batch_size))
    folder = Path(folder if folder is not None else tempfile.gettempdir())
    _check_space(folder, windows.numel(), model.config.get_text_config().hidden_size, len(blocks))
    sums = OutputGradients(names)
    with tempfile.TemporaryDirectory(prefix="hfcompress-fisher-", dir=folder) as scratch:
        scratch = Path(scratch)
        outside = stored_outside(model, prefixes)
        inputs, returns_tuple = forward_blocks(
            model, checkpoint, blocks, prefixes, outside, batches, scratch, dtype, desc="Fisher: forward"
        )
        model_names = [n for n in names if not any(n.startswith(p + ".") for p in prefixes)]
        embeds = embeddings_left_out(model)
        checkpoint.materialize(model, [n for n in outside if n not in embeds], dtype)
        model.tie_weights()
        gradients = _output_gradients(model, blocks, inputs.pop(), batches, returns_tuple, seed, scratch,
                                      sums.watch({n: model.get_submodule(n) for n in model_names}), bool(embeds))  # fmt: skip
        release(model)
        trim_heap()
        for index in tqdm(reversed(range(len(blocks))), total=len(blocks), desc="Fisher: backward"):
            block, prefix = blocks[index], prefixes[index]
            checkpoint.materialize(model, stored_names(model, prefix), dtype)
            handles = sums.watch({n: model.get_submodule(n) for n in names if n.startswith(prefix + ".")})
            store = inputs.pop()
            following = SpilledList(scratch / f"gradients-{index}") if index else None
            try:
                _backward_through(block, store, gradients, following)
            finally:
                for handle in handles:
                    handle.remove()
            store.remove()
            gradients.remove()
            gradients = following
            release(block)
            trim_heap()
    sums.tokens = windows.numel()
    logger.info("Fisher information of %d layers: %d blocks streamed from %s", len(names), len(blocks), model_path)
    return sums.means()


def _output_gradients(model, blocks, last, batches, returns_tuple: bool, seed: int, scratch: Path, handles,
                      zero_embeddings: bool):  # fmt: skip
    """The gradient of the sampled log-likelihood at the stack's output, batch by batch, on disk: the model's own
    forward runs with its blocks standing aside (`core.streamed_forward.standing_aside`), so whatever follows the
    stack (final norm, output layer, logit soft-capping) is the model's own code. With `zero_embeddings` the
    model is given zeros for embeddings (`embeddings_left_out`). `handles` (the hooks watching layers outside the
    stack) are removed at the end."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gradients = SpilledList(scratch / "gradients-out")
    try:
        with standing_aside(blocks, returns_tuple) as current:
            for index, batch in enumerate(tqdm(batches, desc="Fisher: output layer")):
                hidden = hidden_of(last[index]).requires_grad_(True)
                current["hidden"] = hidden
                with torch.enable_grad(), maths_for(model):
                    logits = model(**after_stack_inputs(model, batch, hidden, zero_embeddings)).logits
                    sampled_log_likelihood(logits, generator).backward()
                gradients.append(hidden.grad)
    finally:
        for handle in handles:
            handle.remove()
    last.remove()
    return gradients


def _backward_through(block: nn.Module, inputs, gradients, following) -> None:
    """Run `block` on each of its `inputs` and carry the gradient at its output (`gradients`) back through it,
    appending the gradient at its input to `following` (None: not needed, the first block)."""
    for item, gradient in zip(inputs, gradients, strict=True):
        hidden = hidden_of(item)
        if following is not None:
            hidden.requires_grad_(True)
        with torch.enable_grad(), maths_for(block):
            tracked = with_hidden_states(item, hidden)
            hidden_states_of(block(*tracked.args, **tracked.kwargs)).backward(gradient)
        if following is not None:
            following.append(hidden.grad)


def _check_space(folder: Path, tokens: int, hidden: int, n_blocks: int) -> None:
    """Refuse, before any work, a `folder` without room for every block's inputs and two blocks' gradients."""
    amount = f"{tokens:,} tokens through {n_blocks} blocks of width {hidden}"
    require_space(folder, (n_blocks + 3) * tokens * hidden * 4, "the Fisher pass's activations", amount,
                  "use fewer windows, or give another folder")  # fmt: skip
