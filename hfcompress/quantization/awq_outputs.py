"""AWQ's scale search scored as AutoAWQ and llm-compressor score it: by the output of the smallest module that
holds a group of linears sharing an input (the attention for q/k/v, the MLP for gate/up), with that group rounded
and everything else in full precision, on a fixed share of the calibration windows.

The Hessian objective (`awq.awq_scales`) weighs an error in q, k, v, gate or up alike; the module's output
weighs each by what the attention's softmax and the MLP's gate and down projection make of it, which is what
the next layers see. A group that is a module on its own (o_proj, down_proj) gains nothing from it: its output
error is exactly the Hessian's.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..core.capture import BlockInputs, hidden_states_of
from ..core.distributed import batch_place, summed_in_order
from ..core.precision import maths_for
from ..core.structure import linear_weight, set_linear_weight
from .awq import round_trip

__all__ = ["ModuleCalls", "holding_module", "search_batches"]


def holding_module(names: list[str]) -> str:
    """The name (relative to the block; "" for the block itself) of the smallest module holding every linear
    of `names`: their longest common dotted prefix, short of the linear itself."""
    paths = [name.split(".")[:-1] for name in names]
    common = []
    for pieces in zip(*paths, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def search_batches(inputs, windows: int) -> tuple[dict[int, BlockInputs], int]:
    """The block inputs of the first `windows` calibration windows of all ranks together, by their batch's
    place among all ranks' batches (`core.distributed.batch_place`; whole batches: the last one may hold more),
    and how many places there are: the same batches however many processes share them."""
    if len(inputs) == 0:
        return {}, 0
    first = inputs[0]  # a spilled list reads each item from disk: only kept ones are read
    width = _hidden_states(first).shape[0]
    places = [batch_place(j) for j in range(len(inputs))]
    chosen = {place: first if j == 0 else inputs[j] for j, place in enumerate(places) if place * width < windows}
    return chosen, math.ceil(windows / width)


def _hidden_states(item: BlockInputs) -> torch.Tensor:
    return item.args[0] if item.args else item.kwargs["hidden_states"]


class ModuleCalls:
    """Every call of `module` while `block` runs on the chosen batches (their arguments, copied, and the float32
    output), to score its output with other weights: `error()` reruns those calls and sums the squared
    difference, in the same order and to the same float however many processes hold the batches."""

    def __init__(self, block: nn.Module, module: nn.Module, batches: dict[int, BlockInputs], places: int):
        self.block, self.module, self.places = block, module, places
        self.calls: dict[int, list] = {}
        current: list = []

        def record_inputs(_, args, kwargs):
            current.append(tree_map(_copied, (args, kwargs)))

        def record_output(_, args, kwargs, output):
            current[-1] = (*current[-1], hidden_states_of(output).detach().float().clone())

        handles = [
            module.register_forward_pre_hook(record_inputs, with_kwargs=True),
            module.register_forward_hook(record_output, with_kwargs=True),
        ]
        try:
            with torch.no_grad(), maths_for(block):
                for place, item in batches.items():
                    current = self.calls.setdefault(place, [])
                    block(*item.args, **item.kwargs)
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def error(self) -> float:
        """The squared difference of the module's outputs now from those recorded, over every rank's calls."""
        errors = {}
        with maths_for(self.block):
            for place, calls in self.calls.items():
                errors[place] = math.fsum(
                    float((hidden_states_of(self.module(*args, **kwargs)).float() - reference).square().sum())
                    for args, kwargs, reference in calls
                )
        return summed_in_order(errors, self.places)

    def rounded_error(self, linears: list[nn.Module], s: torch.Tensor, bits, group_size, sym, scale_dtype) -> float:
        """`error()` with each of `linears` scaled by `s`, rounded to the grid and scaled back (as AWQ would
        leave it) for the time of the measurement."""
        originals = [linear_weight(linear).detach().clone() for linear in linears]
        try:
            for linear, weight in zip(linears, originals, strict=True):
                set_linear_weight(linear, round_trip(weight, s, bits, group_size, sym, scale_dtype))
            return self.error()
        finally:
            for linear, weight in zip(linears, originals, strict=True):
                set_linear_weight(linear, weight)


def _copied(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
