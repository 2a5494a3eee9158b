"""A compact checkpoint for sparse weights: a bitmask of the non-zeros plus their values, in safetensors.

`compress_sparse(model)` swaps every sparse enough linear layer for a `SparseLinear`, whose state is
`weight_bitmask` (uint8, one bit per weight, rows padded to whole bytes) and `weight` (the non-zeros in
row-major order, 1-D: named so that plain transformers, which expects a 2-D `weight`, refuses the checkpoint
instead of loading random weights in its place); `save_pretrained` then writes that, and `from_pretrained` (after `import hfcompress`)
rebuilds the layers from `quantization_config.sparse`, which records each layer's number of non-zeros. At
90% sparsity an fp32 weight takes 0.1 * 4 + 1/8 bytes instead of 4. A `SparseLinear` rebuilds its dense
weight for each forward (one layer at a time, never the whole model); `decompress_sparse` turns the model
back into ordinary linears for training or speed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..checkpoint import manifest_of, update_manifest
from ..core.experts import run_on_expert_linears
from ..core.packing import dense_from_bitmask, pack_bitmask, unpack_bitmask
from ..core.structure import find_linears, set_submodule

__all__ = [
    "LegacySparseLinear",
    "SparseLinear",
    "compress_sparse",
    "decompress_sparse",
    "pack_bitmask",
    "record_sparse",
    "sparsify_linears",
    "store_sparse",
    "unpack_bitmask",
]

logger = logging.getLogger(__name__)


class SparseLinear(nn.Module):
    """A linear layer stored as bitmask + non-zero values (`weight`, 1-D)."""

    VALUES = "weight"
    STORED_TENSORS = ("weight_bitmask", VALUES)
    KEEPS_DTYPE = False

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.nnz = in_features, out_features, nnz
        self.register_buffer(
            "weight_bitmask", torch.zeros(out_features, -(-in_features // 8), dtype=torch.uint8, device=device)
        )
        self.register_buffer(self.VALUES, torch.zeros(nnz, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        weight = linear.weight.detach()
        mask = weight != 0
        layer = cls(
            linear.in_features,
            linear.out_features,
            int(mask.sum()),
            linear.bias is not None,
            weight.dtype,
            weight.device,
        )
        layer.weight_bitmask.copy_(pack_bitmask(mask))
        layer.values.copy_(weight[mask])
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @property
    def values(self) -> torch.Tensor:
        """The non-zero weights, row-major."""
        return getattr(self, self.VALUES)

    def dense_weight(self) -> torch.Tensor:
        return dense_from_bitmask(self.weight_bitmask, self.values, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(
            x, self.dense_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
        )

    def extra_repr(self) -> str:
        density = self.nnz / max(1, self.in_features * self.out_features)
        return f"in_features={self.in_features}, out_features={self.out_features}, density={density:.3f}"


class LegacySparseLinear(SparseLinear):
    """A bitmask layer of a checkpoint written before format version 6, whose values were `weight_values`."""

    VALUES = "weight_values"
    STORED_TENSORS = ("weight_bitmask", VALUES)


def compress_sparse(model: nn.Module, min_sparsity: float = 0.25) -> dict[str, int]:
    """Swap every `nn.Linear` with at least `min_sparsity` zeros for a `SparseLinear` (below that the bitmask
    costs more than it saves) and record them in the model's hfcompress `quantization_config`, so
    `save_pretrained` writes the compact form. Returns {layer name: non-zeros}."""
    manifest_of(model)  # refuses a model quantized by another method before anything changes
    sparse = sparsify_linears(model, min_sparsity)
    record_sparse(model, sparse, min_sparsity)
    return sparse


def sparsify_linears(
    module: nn.Module, min_sparsity: float = 0.25, prefix: str = "", skip: str | None = None
) -> dict[str, int]:
    """Swap the `nn.Linear`s of `module` with at least `min_sparsity` zeros for `SparseLinear`s, recording
    nothing, except those inside its submodule `skip`; returns {full name (`prefix` first): non-zeros}."""
    if not 0.0 <= min_sparsity < 1.0:
        raise ValueError(f"`min_sparsity` must be in [0, 1), got {min_sparsity}")
    sparse = {}
    lead = f"{prefix}." if prefix else ""
    for name, child in find_linears(module).items():
        if type(child) is not nn.Linear or (skip and name.startswith(skip + ".")):
            continue
        weight = child.weight
        zeros = 1 - torch.count_nonzero(weight).item() / max(1, weight.numel())  # no float copy of a large weight
        if zeros >= min_sparsity:
            layer = SparseLinear.from_linear(child)
            set_submodule(module, name, layer)
            sparse[lead + name] = layer.nnz
    return sparse


def record_sparse(model: nn.Module, sparse: dict[str, int], min_sparsity: float = 0.25) -> None:
    """Record the layers `sparsify_linears` stored as bitmask + values ({name: non-zeros}) in `model`'s manifest,
    or warn that there were none."""
    if not sparse:
        logger.warning("no linear layer has %.0f%% or more zeros; nothing to compress", 100 * min_sparsity)
        return
    update_manifest(model, "sparse", sparse=sparse)
    logger.info("%d linear layers stored as bitmask + values", len(sparse))


def store_sparse(model: nn.Module, config=None, storage: str = "dense") -> None:
    """With `storage="bitmask"`, store the pruned layers as bitmask + values before saving (see `compress_sparse`;
    pruned experts of a mixture-of-experts layer too, each a `SparseLinear`)."""
    if storage == "bitmask":
        run_on_expert_linears(model, lambda: compress_sparse(model))


def decompress_sparse(model: nn.Module) -> nn.Module:
    """Turn every `SparseLinear` back into an `nn.Linear` (zeros included); drops them from the config."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseLinear):
            linear = nn.Linear(
                module.in_features, module.out_features, module.bias is not None,
                dtype=module.values.dtype, device=module.values.device,
            )  # fmt: skip
            with torch.no_grad():
                linear.weight.copy_(module.dense_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            set_submodule(model, name, linear)
    qconfig = getattr(model.config, "quantization_config", None)
    if qconfig is not None and getattr(qconfig, "sparse", None):
        qconfig.sparse = {}
    return model
