"""A linear's weight made for each of its forwards from a smaller form, and dropped after.

After GPTQ solves a layer the rest of its block must run on the weight the codes give, until the block is done
and the layer becomes a quantized module. Held as float32 that weight costs 4 bytes a parameter; its codes
(uint8) and group parameters cost about one. `defer_weight` keeps only the small form: a forward pre-hook
makes the [out, in] weight, exactly as `set_linear_weight(..., exact=True)` would hold it, and a forward hook
puts a meta placeholder back. Outside a forward the weight is on the meta device (its shape and dtype are
right), so a caller that reads its values gets an error instead of wrong numbers.

    defer_weight(linear, lambda: quantized.dequantize(torch.float32))
    y = linear(x)          # the same output as with the dequantized weight held
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

__all__ = ["defer_weight", "restore_weight"]


def defer_weight(module: nn.Module, make: Callable[[], torch.Tensor]) -> None:
    """From now on `module` (a linear or `Conv1D`) holds no weight values: each forward uses `make()` (an [out,
    in] tensor, used in its own dtype) as its weight. `restore_weight` undoes it."""
    restore_weight(module)
    transposed = isinstance(module, Conv1D)
    sample = module.weight
    placeholder = nn.Parameter(torch.empty(sample.shape, dtype=torch.float32, device="meta"), requires_grad=False)

    def materialize(mod, args):
        weight = make()
        mod.weight = nn.Parameter((weight.t() if transposed else weight).contiguous(), requires_grad=False)

    def drop(mod, args, output):
        mod.weight = placeholder

    module.weight = placeholder
    module._deferred_weight = (
        module.register_forward_pre_hook(materialize),
        module.register_forward_hook(drop, always_call=True),
    )


def restore_weight(module: nn.Module) -> None:
    """Remove what `defer_weight` put on `module` (its weight stays whatever it is now)."""
    for handle in getattr(module, "_deferred_weight", ()):
        handle.remove()
    module.__dict__.pop("_deferred_weight", None)
