"""How resized (structured-pruned) and bitmask-stored layers are rebuilt when a checkpoint loads
(registered in `techniques.py`)."""

from __future__ import annotations

import torch

from ..core.structure import linear_to_replace, linear_weight, set_submodule
from .sparse import LegacySparseLinear, SparseLinear

# the format version from which a bitmask layer stores its values as `weight`
VALUES_NAMED_WEIGHT = 6

__all__ = ["convert_legacy_sparse", "rebuild_resized", "rebuild_sparse"]


def rebuild_resized(model, manifest) -> None:
    """Shrink the linears (and attention attributes) that structured pruning made smaller than the config."""
    for name, (out_features, in_features) in manifest.resized.get("linears", {}).items():
        module = linear_to_replace(model, name, "resizes")
        layer = torch.nn.Linear(
            in_features, out_features, module.bias is not None, dtype=module.weight.dtype, device=module.weight.device
        )
        set_submodule(model, name, layer)
    for name, attributes in manifest.resized.get("attributes", {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"the checkpoint resizes {name!r}, which {type(model).__name__} does not have") from e
        for attribute, value in attributes.items():
            if not hasattr(module, attribute):
                raise ValueError(f"the checkpoint sets {name}.{attribute}, which {type(module).__name__} lacks")
            setattr(module, attribute, value)


def rebuild_sparse(model, manifest) -> None:
    for name, nnz in manifest.sparse.items():
        if name in manifest.modules:
            continue  # pruned and quantized: a SparseQuantLinear, rebuilt with the quantized layers
        module = linear_to_replace(model, name, "stores sparse")
        out_features, in_features = linear_weight(module).shape
        layer = (SparseLinear if manifest.version >= VALUES_NAMED_WEIGHT else LegacySparseLinear)(
            in_features, out_features, nnz, module.bias is not None, module.weight.dtype, module.weight.device
        )
        set_submodule(model, name, layer)


def convert_legacy_sparse(model, manifest) -> None:
    """After loading: bitmask layers of an older checkpoint become current ones (values named `weight`)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LegacySparseLinear):
            layer = SparseLinear(
                module.in_features, module.out_features, module.nnz, module.bias is not None,
                module.values.dtype, module.values.device,
            )  # fmt: skip
            layer.weight_bitmask = module.weight_bitmask
            layer.weight = module.values
            layer.bias = module.bias
            set_submodule(model, name, layer)
