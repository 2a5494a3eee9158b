"""A model's forward pass streamed from its checkpoint, one block in memory at a time: the pieces the streamed
Fisher pass (`core.streamed_fisher`) and the streamed perplexity (`evaluation.streamed_perplexity`) share.

    stores, returns_tuple = forward_blocks(model, checkpoint, blocks, prefixes, batches, scratch, dtype)
    with standing_aside(blocks, returns_tuple) as current:
        current["hidden"] = stores[-1][i] ...     # the model's own forward from the stack's output on
        logits = model(**after_stack_inputs(model, batch, hidden, zero_embeddings)).logits

Each block's inputs are written to disk (`core.activations.SpilledActivations`) as they are computed; the part of
the model after the stack (final norm, output layer, soft-capping) then runs as the model's own code, with its
blocks standing aside: the first returns the stored last hidden states, the others pass them on.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .activations import SpilledActivations
from .capture import forward_inputs, hidden_states_of, with_hidden_states
from .memory import trim_heap
from .precision import maths_for
from .streamed_run import capture_first_inputs
from .streaming import release, stored_names, tied_keys

__all__ = ["after_stack_inputs", "embeddings_left_out", "forward_blocks", "standing_aside"]


def forward_blocks(
    model, checkpoint, blocks, prefixes, outside: list[str], batches, scratch: Path, dtype, keep: bool = True,
    desc: str = "forward",
):  # fmt: skip
    """Run `batches` of token ids through the stack, one block read from `checkpoint` at a time: the stores on
    disk of every block's inputs and then of the stack's output (with `keep` False, the stack's output alone:
    each block's inputs are deleted once its outputs are written), and whether a block returns a tuple.
    `outside`: the stored tensors outside the stack; `dtype`: floating tensors are read as that (None: as
    stored, then cast to the skeleton's dtype)."""
    first = SpilledActivations(scratch / "inputs-0")
    stores = [capture_first_inputs(model, checkpoint, blocks[0], outside, batches, first, dtype)]
    returns_tuple = False
    for index, (block, prefix) in enumerate(zip(tqdm(blocks, desc=desc), prefixes, strict=True)):
        checkpoint.materialize(model, stored_names(model, prefix), dtype)
        store = SpilledActivations(scratch / f"inputs-{index + 1}")
        with torch.no_grad(), maths_for(block):
            for item in stores[-1]:
                output = block(*item.args, **item.kwargs)
                returns_tuple = isinstance(output, (tuple, list))
                store.append(with_hidden_states(item, hidden_states_of(output)))
        release(block)
        trim_heap()
        if not keep:
            stores.pop().remove()
        stores.append(store)
    return stores, returns_tuple


def embeddings_left_out(model: nn.Module) -> set[str]:
    """The stored tensors of the input embeddings, which a pass from the stack's output on can do without (it is
    given zeros as embeddings, which the first block ignores): none when the output layer shares their weight,
    or when the model takes no `inputs_embeds`."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None or tied_keys(model) or "inputs_embeds" not in inspect.signature(model.forward).parameters:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    return set(stored_names(model, names[id(embeddings)]))


@contextlib.contextmanager
def standing_aside(blocks, returns_tuple: bool):
    """Within it, the model's forward runs no block: the first returns `current["hidden"]` (set it before each
    call), the others pass it on, so what follows the stack is the model's own code."""
    current = {}

    def shaped(hidden):
        return (hidden,) if returns_tuple else hidden

    def first(*args, **kwargs):
        return shaped(current["hidden"])

    def passing(*args, **kwargs):
        return shaped(args[0] if args else kwargs["hidden_states"])

    for block in blocks:
        block.forward = passing
    blocks[0].forward = first
    try:
        yield current
    finally:
        for block in blocks:
            del block.forward


def after_stack_inputs(model, batch: torch.Tensor, hidden: torch.Tensor, zero_embeddings: bool) -> dict:
    """The keyword arguments of the model's forward for one batch when its blocks stand aside: zeros for the
    input embeddings with `zero_embeddings` (see `embeddings_left_out`), else the batch's own inputs."""
    if zero_embeddings:
        return {"inputs_embeds": torch.zeros(*batch.shape, hidden.shape[-1]), "use_cache": False}
    return forward_inputs(model, batch)
