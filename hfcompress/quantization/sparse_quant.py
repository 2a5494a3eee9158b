"""`SparseQuantLinear`: a pruned and quantized linear layer that stores only its non-zeros' codes."""

from __future__ import annotations

import torch

from ..core.packing import pack_codes, packed_width, unpack_codes
from ..pruning.sparse import pack_bitmask, unpack_bitmask
from .grid import QuantizedWeight
from .modules import QuantLinear

__all__ = ["SparseQuantLinear", "dense_codes"]


class SparseQuantLinear(QuantLinear):
    """A `QuantLinear` whose weight was pruned: `weight` packs the codes of the `nnz` kept weights (row-major
    order, int32 [ceil(nnz * bits / 32)]) and `weight_bitmask` ([out, ceil(in / 8)] uint8) says where they go;
    scales, zero points and `g_idx` are a `QuantLinear`'s. A pruned weight is the zero point's code, which
    dequantizes to exactly 0, so the dense codes the kernels see are rebuilt without loss and both savings
    show in the checkpoint: 1 bit of mask per weight plus `bits` per kept weight.
    """

    STORED_TENSORS = ("weight", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_bitmask")
    KEEPS_DTYPE = True  # its scales/codebooks keep their storage dtype when the model is cast
    CODES_IN_WEIGHT = False  # `weight` holds the codes of the kept weights only

    def __init__(self, in_features: int, out_features: int, nnz: int, bits: int, group_size: int, sym: bool, **kwargs):
        super().__init__(in_features, out_features, bits, group_size, sym, **kwargs)
        device = self.weight.device
        self.nnz = nnz
        self.weight = torch.zeros(packed_width(nnz, bits), dtype=torch.int32, device=device)
        self.register_buffer(
            "weight_bitmask", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8, device=device)
        )

    @classmethod
    def from_quantized_sparse(
        cls,
        quantized: QuantizedWeight,
        mask: torch.Tensor,
        group_size: int,
        sym: bool,
        act_order: bool,
        bias: torch.Tensor | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> SparseQuantLinear:
        """The layer for `quantized` with only the codes where `mask` is True (the others must be zero points)."""
        dense = QuantLinear.from_quantized(quantized, group_size, sym, act_order, bias, scale_dtype)
        mask = mask.to(dense.weight.device, torch.bool)
        out_features, in_features = mask.shape
        layer = cls(
            in_features, out_features, int(mask.sum()), quantized.bits, group_size, sym, act_order=act_order,
            bias=bias is not None, scale_dtype=scale_dtype, dtype=None if bias is None else bias.dtype,
            device=dense.weight.device,
        )  # fmt: skip
        kept = quantized.codes.to(mask.device)[mask]
        layer.weight.copy_(pack_codes(kept.unsqueeze(0), quantized.bits).squeeze(0))
        layer.weight_bitmask.copy_(pack_bitmask(mask))
        layer.weight_scale.copy_(dense.weight_scale)
        if not sym:
            layer.weight_zero_point.copy_(dense.weight_zero_point)
        if act_order:
            layer.weight_g_idx.copy_(dense.weight_g_idx)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def mask(self) -> torch.Tensor:
        return unpack_bitmask(self.weight_bitmask, self.in_features)

    def codes(self) -> torch.Tensor:
        """Dense codes [out, in]: the stored ones where the mask is set, the zero point elsewhere."""
        return dense_codes(
            self.weight, self.weight_bitmask, self.zero_points(), self.group_index(), self.nnz, self.bits
        )

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.in_features * self.out_features)
        return f"{super().extra_repr()}, density={density:.3f}"


def dense_codes(
    kept: torch.Tensor, bitmask: torch.Tensor, zeros: torch.Tensor, group_index: torch.Tensor, nnz: int, bits: int
) -> torch.Tensor:
    """Dense codes [out, in] of a pruned layer: the `nnz` codes packed in `kept` where `bitmask` ([out, ceil(in / 8)])
    is set, in row-major order, and elsewhere the zero point ([out, n_groups] integers) of the column's group
    (`group_index`, [in]), which dequantizes to exactly 0."""
    zero = zeros[:, group_index]
    codes = unpack_codes(kept.unsqueeze(0), bits, nnz).squeeze(0)
    return zero.masked_scatter_(unpack_bitmask(bitmask, group_index.numel()), codes.to(zero.dtype))
