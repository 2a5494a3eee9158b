"""`Int8Linear`: a W8A8 linear layer, 8-bit weights per output channel and 8-bit activations per token."""

from __future__ import annotations

import torch

from ..core.packing import unpack_codes
from .modules import QuantLinear
from .smoothquant import int8_matmul, quantize_per_token

__all__ = ["Int8Linear", "int8_weight"]


def int8_weight(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """A W8A8 layer's stored weight (8-bit codes packed in int32 words) as int8 [out, in]: the codes less the middle
    code 128."""
    return (unpack_codes(packed, 8, in_features).to(torch.int16) - 128).to(torch.int8)


class Int8Linear(QuantLinear):
    """A `QuantLinear` with 8-bit symmetric per-channel weights (the same stored tensors, so it saves, loads and
    exports as one) whose forward also quantizes its input: each token to int8 with its own scale, computed
    on the fly (dynamic), then an int8 x int8 matmul accumulated in int32 (`smoothquant.int8_matmul`) and
    rescaled by the token's and the output channel's scales.

    Its outputs are not those of the dequantized weight on the float input, so evaluation must not replace it
    with a dense matmul (`EXACT_WHEN_DEQUANTIZED`)."""

    EXACT_WHEN_DEQUANTIZED = False

    def __init__(self, in_features: int, out_features: int, bias: bool = False, scale_dtype=torch.float32, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("bits", "group_size", "sym", "act_order")}
        super().__init__(in_features, out_features, 8, -1, True, bias=bias, scale_dtype=scale_dtype, **kwargs)
        self._int8_weight = None

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> Int8Linear:
        """The W8A8 layer of an 8-bit symmetric per-channel `QuantLinear` (its tensors are shared, not copied)."""
        if (layer.bits, layer.group_size, layer.sym) != (8, layer.in_features, True) or layer.weight_g_idx is not None:
            raise ValueError(
                f"W8A8 needs 8-bit symmetric per-channel weights; the layer has bits={layer.bits}, "
                f"group_size={layer.group_size} (of {layer.in_features} inputs), sym={layer.sym}"
            )
        int8 = cls(
            layer.in_features, layer.out_features, bias=layer.bias is not None, scale_dtype=layer.weight_scale.dtype,
            device=layer.weight.device,
        )  # fmt: skip
        int8.weight, int8.weight_scale = layer.weight, layer.weight_scale
        if layer.bias is not None:
            int8.bias = layer.bias
        return int8

    def int8_weight(self) -> torch.Tensor:
        """The weight as int8 [out, in] (`int8_weight`)."""
        return int8_weight(self.weight, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = x.device
        if self._kernel_key != key:  # unpacked once per device, and again after new codes are loaded
            self._int8_weight = self.int8_weight().contiguous()
            self._kernel_key = key
        codes, scale = quantize_per_token(x.reshape(-1, self.in_features))
        y = int8_matmul(codes, self._int8_weight).float() * scale * self.weight_scale.float().reshape(1, -1)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8 (per-token dynamic activations)"
