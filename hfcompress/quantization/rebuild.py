"""How quantized (`QuantLinear`, `SparseQuantLinear`) and codebook layers are rebuilt when a checkpoint loads
(registered in `techniques.py`)."""

from __future__ import annotations

from ..core.structure import linear_to_replace, linear_weight, set_submodule
from .codebook_linear import CodebookLinear
from .compensated_linear import CompensatedLinear
from .grid import SCALE_TORCH_DTYPES
from .int8_linear import Int8Linear
from .modules import QuantLinear
from .sparse_quant import SparseQuantLinear

__all__ = ["rebuild_codebooks", "rebuild_compensated", "rebuild_quantized"]


def rebuild_codebooks(model, manifest) -> None:
    for name, spec in manifest.codebooks.items():
        module = linear_to_replace(model, name, "stores as codebooks")
        out_features, in_features = linear_weight(module).shape
        layer = CodebookLinear(
            in_features, out_features, spec["bits"], spec["dim"], spec["books"], module.bias is not None,
            dtype=module.weight.dtype, device=module.weight.device,
        )  # fmt: skip
        set_submodule(model, name, layer)


def rebuild_compensated(model, manifest) -> None:
    """Each compensated layer becomes a `CompensatedLinear` around the linear it was (`<layer>.base`, which the
    quantized modules' rebuilder then replaces), with float16 factors of the recorded rank."""
    dtype = SCALE_TORCH_DTYPES[manifest.scale_dtype]
    for name, rank in manifest.compensation.items():
        module = linear_to_replace(model, name, "compensates")
        set_submodule(model, name, CompensatedLinear(module, rank, dtype))


def rebuild_quantized(model, manifest) -> None:
    scale_dtype = SCALE_TORCH_DTYPES[manifest.scale_dtype]
    for name in manifest.modules:
        module = linear_to_replace(model, name, "quantizes")
        out_features, in_features = linear_weight(module).shape
        bits, group_size = manifest.grid_of(name)
        kwargs = dict(
            act_order=manifest.act_order,
            bias=module.bias is not None,
            scale_dtype=scale_dtype,
            dtype=module.weight.dtype,
            device=module.weight.device,
        )
        if name in manifest.sparse:
            nnz = manifest.sparse[name]
            layer = SparseQuantLinear(in_features, out_features, nnz, bits, group_size, manifest.sym, **kwargs)
        elif manifest.activations:
            layer = Int8Linear(in_features, out_features, **kwargs)
        else:
            layer = QuantLinear(in_features, out_features, bits, group_size, manifest.sym, **kwargs)
        set_submodule(model, name, layer)
