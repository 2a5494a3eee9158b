"""Other ways out of a quantized model: the compressed-tensors format, and back to dense layers."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.structure import set_submodule
from .modules import QuantLinear

__all__ = [
    "check_compressed_tensors_compatible",
    "compressed_tensors_config",
    "compressed_tensors_state_dict",
    "dequantize_model",
]


def _quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def check_compressed_tensors_compatible(model: nn.Module) -> None:
    """Raise a ValueError naming what the compressed-tensors format cannot hold."""
    layers = _quantized_layers(model)
    if not layers:
        raise ValueError("the model has no hfcompress-quantized layers to export")
    qconfig = model.config.quantization_config
    if qconfig.act_order:
        raise ValueError(
            "compressed-tensors cannot store act-order with dynamic groups (a per-column g_idx): its actorder='group' "
            "was removed. Quantize with act_order=True and static_groups=True (--act-order --static-groups), "
            "or save in format hfcompress (--format hfcompress)"
        )
    if not qconfig.sym:
        raise ValueError(
            "compressed-tensors checkpoints with asymmetric grids (packed zero points) do not load in transformers "
            "today (vllm-project/llm-compressor#1618, #1704): quantize with sym=True (--sym), or save in format "
            "hfcompress (--format hfcompress)"
        )
    if qconfig.overrides:
        raise ValueError(
            f"this hfcompress export to compressed-tensors writes one grid for every layer; {len(qconfig.overrides)} "
            "layers use another (mixed precision, or factors with one group per row). Save with --format hfcompress"
        )
    if qconfig.experts:
        raise ValueError(
            f"the model's mixture-of-experts layers ({len(qconfig.experts)}, e.g. {next(iter(qconfig.experts))!r}) hold "
            "one quantized linear per expert; transformers builds the experts of this model as fused 3-D parameters, "
            "which a compressed-tensors checkpoint cannot fill (its experts would silently load as random weights). "
            "Save with --format hfcompress"
        )
    if qconfig.sparse or qconfig.lowrank or qconfig.resized:
        raise ValueError(
            "the model also has sparse, factorized or resized layers, which this compressed-tensors export does not "
            "write; save with --format hfcompress"
        )
    other_types = sorted(set(qconfig.layer_types) - {"Linear"})
    if other_types:
        raise ValueError(
            f"compressed-tensors targets layers of class Linear; {type(model).__name__} quantized {other_types} layers "
            "(GPT-2's Conv1D stores its weight transposed; Falcon's FalconLinear is a class of its own). Save with "
            "--format hfcompress"
        )
    model_type = getattr(model.config, "model_type", None)
    if model_type in UNLOADABLE:
        raise ValueError(
            f"transformers cannot load a compressed-tensors {model_type} checkpoint: {UNLOADABLE[model_type]}. "
            "Save with --format hfcompress"
        )


_INIT = "its weight initialization reads the `.weight` of linears that compressed-tensors replaces (transformers 5.24)"
# model types whose compressed-tensors checkpoints transformers fails to load, with the reason
UNLOADABLE = {"t5": _INIT, "mt5": _INIT, "umt5": _INIT, "modernbert": _INIT}


def compressed_tensors_config(model: nn.Module) -> dict:
    """`quantization_config` of a compressed-tensors `pack-quantized` checkpoint equal to the model's grid."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    qconfig = model.config.quantization_config
    per_channel = qconfig.group_size == -1
    args = QuantizationArgs(
        num_bits=qconfig.bits,
        type="int",
        symmetric=qconfig.sym,
        strategy="channel" if per_channel else "group",
        group_size=None if per_channel else qconfig.group_size,
        actorder="weight" if qconfig.recipe.get("act_order") else None,
    )
    quantized = set(_quantized_layers(model))
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in quantized]
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    return config.model_dump(exclude_none=True)


def compressed_tensors_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each `QuantLinear` renamed to compressed-tensors' tensor names.

    The packing is the same bit for bit: only names change, and `weight_shape` is added.
    """
    renamed = {}
    layers = _quantized_layers(model)
    for key, tensor in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        layer = layers.get(module_name)
        if layer is None:
            renamed[key] = tensor
            continue
        if leaf == "weight":
            renamed[f"{module_name}.weight_packed"] = tensor
            renamed[f"{module_name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        else:
            renamed[key] = tensor
    return renamed


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `QuantLinear` by a dense `nn.Linear` holding its dequantized weight."""
    for name, layer in _quantized_layers(model).items():
        weight = layer.dequantize_weight(dtype or torch.float32)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=weight.dtype)
        dense.weight.data.copy_(weight)
        if layer.bias is not None:
            dense.bias.data.copy_(layer.bias.to(weight.dtype))
        set_submodule(model, name, dense.to(layer.weight.device))
    return model
