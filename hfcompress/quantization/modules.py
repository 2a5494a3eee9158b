"""`QuantLinear`: a linear layer whose weight lives as packed integer codes, scales and zero points."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.packing import pack_codes, packed_width, unpack_codes
from ..core.structure import cast_unquantized
from .grid import QuantizedWeight
from .kernels import select_kernel

__all__ = ["QuantLinear", "cast_unquantized", "dequantized_forward", "zero_point_codes"]


def zero_point_codes(packed: torch.Tensor | None, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """A layer's zero points [out, n_groups] as integers from its stored `weight_zero_point` (`packed`, codes packed
    along the output dimension), or the middle code where it stores none (a symmetric grid); `scales` is its
    `weight_scale` [out, n_groups]."""
    if packed is None:
        return torch.full_like(scales, 2 ** (bits - 1), dtype=torch.int32)
    return unpack_codes(packed, bits, scales.shape[0], dim=0)


class QuantLinear(nn.Module):
    """Weight-only quantized linear layer.

    State (all persistent buffers, so they are what `save_pretrained` writes):
    - `weight`: codes packed along the input dimension, int32 [out, ceil(in * bits / 32)]. It keeps the
      dense layer's name on purpose: a checkpoint loaded without hfcompress then fails with a shape
      mismatch instead of loading as random weights.
    - `weight_scale`: [out, n_groups].
    - `weight_zero_point`: asymmetric grids only, codes packed along the output dimension,
      int32 [ceil(out * bits / 32), n_groups].
    - `weight_g_idx`: act-order only, the group of each input column, int32 [in].
    The forward pass runs a fused low-bit kernel where one fits the layer (repacked once, see `kernels.py`) and
    otherwise unpacks into a transient dense weight; no dense copy is kept between calls.
    """

    STORED_TENSORS = ("weight", "weight_scale", "weight_zero_point", "weight_g_idx")
    KEEPS_DTYPE = True  # its scales/codebooks keep their storage dtype when the model is cast
    CODES_IN_WEIGHT = True  # `weight` holds every code densely packed (the fused CPU kernel's own layout)
    EXACT_WHEN_DEQUANTIZED = True  # its output is that of its dequantized weight (`dequantized_forward`)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        sym: bool,
        act_order: bool = False,
        bias: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = in_features if group_size == -1 else group_size
        self.sym = sym
        self.act_order = act_order
        n_groups = in_features // self.group_size
        self.register_buffer(
            "weight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.int32, device=device)
        )
        self.register_buffer("weight_scale", torch.zeros(out_features, n_groups, dtype=scale_dtype, device=device))
        if not sym:
            zp_shape = (packed_width(out_features, bits), n_groups)
            self.register_buffer("weight_zero_point", torch.zeros(zp_shape, dtype=torch.int32, device=device))
        else:
            self.weight_zero_point = None
        if act_order:
            self.register_buffer("weight_g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        else:
            self.weight_g_idx = None
        self._kernel = None
        self._kernel_key = None  # (device, dtype) the kernel was built for; repacked once per change
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_quantized(
        cls,
        quantized: QuantizedWeight,
        group_size: int,
        sym: bool,
        act_order: bool,
        bias: torch.Tensor | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> QuantLinear:
        out_features, in_features = quantized.codes.shape
        device = quantized.codes.device
        layer = cls(
            in_features,
            out_features,
            quantized.bits,
            group_size,
            sym,
            act_order=act_order,
            bias=bias is not None,
            scale_dtype=scale_dtype,
            dtype=None if bias is None else bias.dtype,
            device=device,
        )
        layer.weight.copy_(pack_codes(quantized.codes, quantized.bits))
        layer.weight_scale.copy_(quantized.scales.to(scale_dtype))
        if not sym:
            layer.weight_zero_point.copy_(pack_codes(quantized.zeros.to(torch.int32), quantized.bits, dim=0))
        if act_order:
            layer.weight_g_idx.copy_(quantized.g_idx)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def group_index(self) -> torch.Tensor:
        if self.weight_g_idx is not None:
            return self.weight_g_idx.long()
        return torch.arange(self.in_features, device=self.weight.device) // self.group_size

    def codes(self) -> torch.Tensor:
        if self.bits == 4 and self.in_features % 8 == 0:
            # two codes per byte, low nibble first: the bytes of the little-endian int32 words, in order
            packed = self.weight.contiguous().view(torch.uint8)
            return torch.stack([packed & 15, packed >> 4], dim=-1).view(self.out_features, self.in_features)
        return unpack_codes(self.weight, self.bits, self.in_features)

    def zero_points(self) -> torch.Tensor:
        """Zero points [out, n_groups] as integers (the middle code for symmetric grids)."""
        return zero_point_codes(self.weight_zero_point, self.weight_scale, self.bits)

    def dequantize_weight(
        self, dtype: torch.dtype | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """The weight [out, in] the codes stand for, in `dtype` (default: the scales'); rows `start:stop` only
        when given (unpacking codes of fewer than 32 bits takes several int64 copies of what it unpacks)."""
        dtype = dtype or self.weight_scale.dtype
        stop = self.out_features if stop is None else stop
        codes = self._code_rows(start, stop)
        scale = self.weight_scale[start:stop].to(dtype)
        zero = self.zero_points()[start:stop].to(dtype)
        if self.weight_g_idx is None:
            w = (codes.view(stop - start, -1, self.group_size).to(dtype) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
            return w.reshape(stop - start, self.in_features)
        g = self.group_index()
        return (codes.to(dtype) - zero[:, g]) * scale[:, g]

    def _code_rows(self, start: int, stop: int) -> torch.Tensor:
        if (start == 0 and stop == self.out_features) or not self.CODES_IN_WEIGHT:
            return self.codes()[start:stop]
        return unpack_codes(self.weight[start:stop], self.bits, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if self._kernel_key != key:
            self._kernel = select_kernel(self, x.device, x.dtype)
            self._kernel_key = key
        y = self._kernel(x)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def drop_kernel(self) -> None:
        """Forget the kernel built for the current codes, and the repacked copy of them it may hold (a streamed
        run calls it as it frees the block: `core.streaming.release`)."""
        self._kernel, self._kernel_key = None, None

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_key = None  # new codes: repack on the next call
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._kernel_key = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, sym={self.sym}, act_order={self.act_order}, bias={self.bias is not None}"
        )


@contextlib.contextmanager
def dequantized_forward(model: nn.Module, dtype: torch.dtype = torch.float32):
    """Within the block, every `QuantLinear` of `model` runs as a dense matmul on its weight dequantized once
    (to `dtype`): the same values the checkpoint stores, so the same outputs up to float rounding, and on CPU
    faster for long inputs than the low-bit kernels, which serve a few rows best. Holds a dense copy of every
    quantized weight meanwhile. For evaluating many tokens (perplexity), not for timing the model. Layers that
    also quantize their inputs (W8A8) keep their own forward."""
    patched = []
    for module in model.modules():
        if isinstance(module, QuantLinear) and module.EXACT_WHEN_DEQUANTIZED and "forward" not in vars(module):
            weight = module.dequantize_weight(dtype)
            bias = None if module.bias is None else module.bias.to(dtype)
            module.forward = lambda x, w=weight, b=bias: F.linear(
                x, w.to(x.dtype), None if b is None else b.to(x.dtype)
            )
            patched.append(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward
