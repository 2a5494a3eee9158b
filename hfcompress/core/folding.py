"""Per-input-channel scales that change no output: a group of linears sharing an input computes the same with its
input columns multiplied by `s` when the module that produced that input has its output divided by `s`.

AWQ and SmoothQuant both move scale between a group and its producer. Which module produced a group's input is
found by the block's structure and checked, not looked up in a table of families: the candidates are the modules
called before the group (`BlockTrace.order`) that hold a per-channel weight of the input's width (a norm) or
output that width (a linear: `v_proj` before `o_proj`, `up_proj` before `down_proj`); a candidate is taken only
if folding random scales into it and the group leaves the block's output unchanged on a calibration sample.
Gemma's `1 + weight` norms, a gate before an activation or a grouped-query `v_proj` fail that check, and their
groups are left unscaled.
"""

from __future__ import annotations

import torch
from torch import nn

from .capture import BlockInputs, hidden_states_of
from .distributed import chosen_by_main
from .experts import counting_every_expert
from .precision import maths_for
from .structure import LINEAR_TYPES, linear_weight

__all__ = ["block_output", "find_producer", "fold_scales"]


@torch.no_grad()
def find_producer(block: nn.Module, named: dict, order: list[str], names: list[str], sample: BlockInputs) -> str | None:
    """The module before the group `names` (in call order `order`) into which scales of the group's input fold
    exactly, checked on the block's output on `sample`; None if none does. The check folds random powers of two,
    which multiply and divide exactly in any floating dtype, into copies of the candidate's and the group's
    weights in their stored dtype: a bfloat16 or float16 checkpoint's rounding cannot pass for (or hide) a wrong
    structure, and no float32 copy of a group's weights is made (an MLP's up and down projections are 0.36 GB in
    float32 at hidden 4096). The weights are left as they were."""
    group = [named[n] for n in names]
    width = linear_weight(group[0]).shape[1]
    start = min(order.index(n) for n in names)
    candidates = [n for n in reversed(order[:start]) if n not in names and _folds_into(named[n], width)]
    generator = torch.Generator().manual_seed(0)
    found = -1
    for index, name in enumerate(candidates):
        exponents = torch.randint(1, 3, (width,), generator=generator)  # 2, 4, 1/2 or 1/4: never 1
        s = torch.where(torch.rand(width, generator=generator) < 0.5, 2.0**exponents, 0.5**exponents)
        params = [p for m in (named[name], *group) for p in m.parameters(recurse=False)]
        stored = [p.data for p in params]
        for p in params:
            p.data = p.data.clone()  # folded in place below
        try:
            with counting_every_expert(block):  # an expert the sample routes nothing to is checked too
                reference = block_output(block, sample)
                fold_scales(named[name], group, s)
                output = block_output(block, sample)
        finally:
            for p, data in zip(params, stored, strict=True):
                p.data = data
        if torch.allclose(output, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max())):
            found = index
            break
    found = chosen_by_main(found)  # across processes, each rank checked its own sample: rank 0's holds for all
    return candidates[found] if found >= 0 else None


def _folds_into(module: nn.Module, width: int) -> bool:
    """A norm with a per-channel weight of `width`, or a linear with `width` outputs."""
    if isinstance(module, LINEAR_TYPES):
        return linear_weight(module).shape[0] == width
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == width


@torch.no_grad()
def fold_scales(producer: nn.Module, group: list[nn.Module], s: torch.Tensor) -> None:
    """`producer`'s output divided by `s` (its weight's rows, or its per-channel weight, and its bias), the
    group's input columns multiplied by `s`: the block computes the same."""
    if isinstance(producer, LINEAR_TYPES):
        linear_weight(producer).div_(s.to(producer.weight.dtype).unsqueeze(1))  # in place: no temporary copy
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))
    for module in group:
        linear_weight(module).mul_(s.to(module.weight.dtype))


@torch.no_grad()
def block_output(block: nn.Module, sample: BlockInputs) -> torch.Tensor:
    """The block's hidden-states output on `sample`, in float32."""
    with maths_for(block):
        return hidden_states_of(block(*sample.args, **sample.kwargs)).float()
