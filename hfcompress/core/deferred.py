"""A linear's weight made for each of its forwards from a smaller form, a block of rows at a time.

After GPTQ solves a layer the rest of its block must run on the weight the codes give, until the block is done
and the layer becomes a quantized module. Held as float32 that weight costs 4 bytes a parameter; its codes
(uint8) and group parameters cost about one. `defer_weight` keeps only the small form: the module's forward
makes the rows of its [out, in] weight, exactly as `set_linear_weight(..., exact=True)` would hold them, a block
at a time (`core.rowwise`: the output is the held weight's), so not even one forward holds the whole float32
weight. The weight itself is on the meta device (its shape and dtype are right), so a caller that reads its
values gets an error instead of wrong numbers.

    defer_weight(linear, lambda start, stop: quantized.dequantize(torch.float32, start=start, stop=stop))
    y = linear(x)          # the same output as with the dequantized weight held
"""

from __future__ import annotations

import types

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .rowwise import Rows, conv1d_by_rows, linear_by_rows

__all__ = ["defer_weight", "restore_weight"]


def defer_weight(module: nn.Module, make_rows: Rows) -> None:
    """From now on `module` (a linear or `Conv1D`) holds no weight values: each forward computes with the rows
    `make_rows(start, stop)` gives of its [out, in] weight (used in their own dtype), a block at a time.
    `restore_weight` undoes it."""
    restore_weight(module)
    shape = module.weight.shape
    module.__dict__[_STORED_DTYPE] = module.weight.dtype
    module.weight = nn.Parameter(torch.empty(shape, dtype=torch.float32, device="meta"), requires_grad=False)
    if isinstance(module, Conv1D):
        out_features = shape[1]

        def forward(self, x):
            return conv1d_by_rows(x, make_rows, out_features, self.bias)
    else:
        out_features = shape[0]

        def forward(self, x):
            return linear_by_rows(x, make_rows, out_features, self.bias)

    module.forward = types.MethodType(forward, module)


def restore_weight(module: nn.Module) -> None:
    """Give `module` back its class's forward. A weight still deferred goes back to the meta device in the dtype
    the module held before `defer_weight`: a checkpoint read into it again (`ShardedCheckpoint.materialize`, which
    casts to the parameter's dtype as `load_state_dict` does) gives that dtype, not float32. A weight set since
    stays as it is."""
    module.__dict__.pop("forward", None)
    dtype = module.__dict__.pop(_STORED_DTYPE, None)
    if dtype is not None and module.weight.is_meta:
        shape = module.weight.shape
        module.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)


_STORED_DTYPE = "_hfcompress_stored_dtype"
