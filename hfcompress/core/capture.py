"""Running a model block by block: capture the first block's inputs, then replay blocks on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .precision import maths_for
from .samples import Samples

__all__ = [
    "BlockInputs",
    "capture_block_inputs",
    "capture_block_outputs",
    "forward_inputs",
    "hidden_states_of",
    "run_block",
    "with_hidden_states",
]


class _StopForward(Exception):
    pass


@dataclass
class BlockInputs:
    """Positional and keyword arguments of one block call, for one batch of calibration windows."""

    args: tuple
    kwargs: dict[str, Any]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[torch.Tensor], into=None):
    """Run `model` on each batch of token ids up to `first_block` and record that block's inputs, appended to
    `into` as each batch produces them (default: a new list; `core.activations.SpilledActivations` writes each
    to disk at once), which is returned.

    Nothing after the first block runs, so the cost is the embeddings alone. Weights stored in bfloat16 or
    float16 compute in float32 (`core.precision`), here and in `run_block`: the inputs are float32.
    """
    return _run_until(model, first_block, batches, outputs=False, captured=into)


@torch.no_grad()
def capture_block_outputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list:
    """What `block` returns for each batch of token ids, running `model` only up to it."""
    return _run_until(model, block, batches, outputs=True)


def _run_until(model: nn.Module, module: nn.Module, batches: list[torch.Tensor], outputs: bool, captured=None):
    captured = [] if captured is None else captured

    def pre_hook(_, args, kwargs):
        captured.append(BlockInputs(args, dict(kwargs)))
        raise _StopForward

    def hook(_, args, output):
        captured.append(output)
        raise _StopForward

    if outputs:
        handle = module.register_forward_hook(hook)
    else:
        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        with maths_for(model):
            for batch in batches:
                try:
                    model(**forward_inputs(model, batch.to(device)))
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise ValueError(
            f"{type(module).__name__} ran {len(captured)} times for {len(batches)} calibration batches: the data "
            "never reach it (text-only data and a vision tower? Leave the tower out, as by default, or calibrate "
            "on data it reads)"
        )
    return captured


def forward_inputs(model: nn.Module, batch: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments that run `model` on one calibration batch: images (a float tensor) as
    `pixel_values`; token ids as `input_ids`, and for an encoder-decoder (T5, BART) the same text shifted right
    as the decoder's input, so calibration runs the decoder on the encoder's outputs; samples of several inputs
    (`core.samples`: speech, captioned images) as they hold them."""
    if isinstance(batch, Samples):
        return batch.model_inputs()
    if batch.is_floating_point():
        return {"pixel_values": batch}
    inputs: dict[str, Any] = {"input_ids": batch, "use_cache": False}
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        start = next((t for t in (config.decoder_start_token_id, config.pad_token_id) if t is not None), 0)
        inputs["decoder_input_ids"] = torch.cat([torch.full_like(batch[:, :1], start), batch[:, :-1]], dim=1)
    return inputs


def hidden_states_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs, keep_outputs: bool = True, into=None):
    """Call `block` on every recorded input; the outputs become the next block's inputs, appended to `into`
    (default: a new list; `core.activations.SpilledActivations` writes them to disk) and returned."""
    outputs = [] if into is None else into
    with maths_for(block):
        for item in inputs:
            hidden = hidden_states_of(block(*item.args, **item.kwargs))
            if keep_outputs:
                outputs.append(with_hidden_states(item, hidden))
    return outputs


def with_hidden_states(item: BlockInputs, hidden: torch.Tensor) -> BlockInputs:
    if item.args:
        return BlockInputs((hidden, *tuple(item.args[1:])), item.kwargs)
    if "hidden_states" in item.kwargs:
        return BlockInputs((), {**item.kwargs, "hidden_states": hidden})
    raise ValueError(
        f"cannot tell which input of the block is the hidden state (keyword arguments: {list(item.kwargs)})"
    )
