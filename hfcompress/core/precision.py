"""Float32 maths on weights stored in lower precision: a model (or one streamed block) can stay in its
checkpoint's bfloat16 or float16, half the memory of float32, while every matmul, convolution and
normalization that reads a weight computes in float32, the weight upcast for that one call (a large linear's a
block of rows at a time: `core.rowwise`). Upcasting is exact, so activations, Hessians and codes are those of the
model loaded in float32.

    with float32_maths():
        hidden = block(hidden)          # block weights bf16, hidden states and the maths float32

`exact_matmuls()` turns off the one shortcut hfcompress's own kernels take: on CPUs with native bfloat16 dot
products, quantized layers multiply prompts in bfloat16. Calibration and evaluation run inside it (through
`maths_for`), so codes and measured quality are the same on every CPU.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .rowwise import linear_by_rows, rows_per_block

__all__ = [
    "LOW_PRECISION",
    "exact_matmuls",
    "float32_maths",
    "maths_for",
    "matmuls_must_be_exact",
    "stores_low_precision",
]

LOW_PRECISION = (torch.bfloat16, torch.float16)

# the operations that combine activations with weights: their low-precision tensor arguments are upcast
_UPCAST = {
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.layer_norm, F.group_norm, F.rms_norm, F.batch_norm,
    torch.addmm, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.einsum,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm,
}  # fmt: skip
# lookups whose result is cast instead (the table itself would be a large temporary)
_CAST_RESULT = {F.embedding, torch.embedding}


def _upcast(value):
    if isinstance(value, torch.Tensor) and value.dtype in LOW_PRECISION:
        return value.float()
    if isinstance(value, (list, tuple)):
        return type(value)(_upcast(v) for v in value)
    return value


class _Float32Maths(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _large_low_precision(args[1] if len(args) > 1 else kwargs["weight"]):
            return _linear_by_rows(*args, **kwargs)
        if func in _UPCAST and "out" not in kwargs:  # a call writing into `out=` runs as written
            return func(*_upcast(args), **{k: _upcast(v) for k, v in kwargs.items()})
        if func in _CAST_RESULT:
            return _upcast(func(*args, **kwargs))
        return func(*args, **kwargs)


def _large_low_precision(weight) -> bool:
    """Whether upcasting the whole of `weight` would make a float32 copy worth making a block at a time."""
    return weight.dtype in LOW_PRECISION and weight.dim() == 2 and weight.shape[0] > rows_per_block(weight.shape[1])


def _linear_by_rows(input, weight, bias=None):
    # a block of rows upcast at a time (core.rowwise): a 4096 x 11008 bfloat16 weight is not copied whole
    if torch.is_grad_enabled() and input.requires_grad and not weight.requires_grad:
        if bias is None or not bias.requires_grad:
            return _InputGradientByRows.apply(input, weight, bias)
    return linear_by_rows(
        _upcast(input), lambda start, stop: weight[start:stop].float(), weight.shape[0], _upcast(bias)
    )


class _InputGradientByRows(torch.autograd.Function):
    """`_linear_by_rows` for a gradient of its input alone (a backward pass through frozen weights, as the Fisher
    pass takes): autograd would keep every float32 block of rows for the backward, the whole weight in float32;
    this keeps the stored weight and upcasts its rows again, a block at a time, for the input's gradient."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(weight)
        ctx.input_dtype = input.dtype
        with torch.no_grad():
            return linear_by_rows(
                _upcast(input), lambda start, stop: weight[start:stop].float(), weight.shape[0], _upcast(bias)
            )

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        rows = rows_per_block(weight.shape[1])
        total = None
        for start in range(0, weight.shape[0], rows):
            part = grad[..., start : start + rows] @ weight[start : start + rows].float()
            total = part if total is None else total.add_(part)
        return total.to(ctx.input_dtype), None, None


_EXACT = contextvars.ContextVar("hfcompress_exact_matmuls", default=False)


@contextlib.contextmanager
def exact_matmuls():
    """Inside it, quantized layers compute in float32 on every CPU: their outputs equal dequantize-then-matmul's up
    to float summation order (no bfloat16 prompts, see the module)."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


def matmuls_must_be_exact() -> bool:
    """Whether the caller is inside `exact_matmuls()`."""
    return _EXACT.get()


def float32_maths() -> contextlib.AbstractContextManager:
    """Inside it, weights stored in bfloat16/float16 take part in maths as float32 (see the module)."""
    return _Float32Maths()


def stores_low_precision(model: nn.Module) -> bool:
    """Whether any floating parameter of `model` (meta ones included) is bfloat16 or float16."""
    return any(p.dtype in LOW_PRECISION for p in model.parameters())


@contextlib.contextmanager
def maths_for(model: nn.Module):
    """`exact_matmuls()`, and `float32_maths()` for a model that stores weights in low precision (none otherwise:
    no overhead). For calibrating and measuring."""
    with exact_matmuls(), float32_maths() if stores_low_precision(model) else contextlib.nullcontext():
        yield
