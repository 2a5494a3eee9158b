"""Other ways out of a quantized model: the compressed-tensors format, and back to dense layers."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn as nn

from ..core.packing import pack_codes
from ..core.stored_layout import SavedNames
from ..core.structure import set_submodule
from .ct_readers import ZERO_POINT_READERS, installed_reads_zero_points
from .expert_layout import expert_checkpoint_names, plain_expert_patterns, split_rows
from .int8_linear import int8_weight
from .modules import QuantLinear, zero_point_codes
from .sparse_quant import SparseQuantLinear, dense_codes

__all__ = [
    "check_compressed_tensors_compatible",
    "compressed_tensors_config",
    "compressed_tensors_renaming",
    "compressed_tensors_state_dict",
    "dequantize_model",
]

logger = logging.getLogger(__name__)


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
    if qconfig.experts:
        _check_experts(model, layers)
    if qconfig.compensation:
        raise ValueError(
            f"{len(qconfig.compensation)} layers (e.g. {next(iter(qconfig.compensation))!r}) carry a low-rank correction "
            "of their quantization error, which compressed-tensors cannot express; save with --format hfcompress"
        )
    unquantized_sparse = sorted(set(qconfig.sparse or {}) - set(layers))
    if unquantized_sparse or qconfig.lowrank or qconfig.resized:
        what = f"pruned layers it did not quantize (e.g. {unquantized_sparse[0]!r})" if unquantized_sparse else None
        raise ValueError(
            f"the model also has {what or 'factorized or resized layers'}, which this compressed-tensors export does "
            "not write; save with --format hfcompress"
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
    uneven = [name for name, layer in layers.items() if not layer.sym and 32 % layer.bits]
    if uneven:
        raise ValueError(
            f"{uneven[0]} ({len(uneven)} layers) is quantized on an asymmetric {layers[uneven[0]].bits}-bit grid: "
            f"{ASYMMETRIC_UNEVEN}"
        )
    mixed = _mixed_siblings(layers)
    if mixed:
        raise ValueError(
            f"servers fuse {', '.join(mixed[0])} into one matmul with one grid, but they were quantized on different "
            f"grids ({'; '.join(mixed[1])}); give linears that share an input the same bits and group size, or save "
            "with --format hfcompress"
        )


def _check_experts(model: nn.Module, layers: dict[str, QuantLinear]) -> None:
    """Refuse quantized experts that the per-expert tensors cannot hold as their readers take them: quantized
    linears without biases, all on one scheme (transformers decompresses weight-only ones while loading with the one
    scheme it finds for the experts; W8A8 ones only vLLM and hfcompress read: `compressed_tensors_config` warns)."""
    names = expert_checkpoint_names(model)
    for name, parts in names.items():
        layer = layers.get(name)
        if layer is None or layer.bias is not None or layer.out_features % len(parts):
            what = type(model.get_submodule(name)).__name__ if layer is None else _describe(_scheme(layer))
            raise ValueError(
                f"expert linear {name} is {what}{' with a bias' if layer is not None and layer.bias is not None else ''}; "
                "compressed-tensors checkpoints hold quantized experts only as quantized linears without biases. Save "
                "with --format hfcompress"
            )
    asymmetric = [name for name in names if not layers[name].sym]
    if asymmetric:
        raise ValueError(
            f"expert linear {asymmetric[0]} is quantized on an asymmetric grid; transformers 5.25 does not pass the "
            "experts' zero points to their decompression (huggingface/transformers#47430, open). Quantize with "
            "sym=True (--sym), or save with --format hfcompress"
        )
    schemes = sorted({_describe(_scheme(layers[name])) for name in names})
    if len(schemes) > 1:
        raise ValueError(
            f"the model's experts are quantized on several grids ({', '.join(schemes)}); transformers applies one "
            "config group to every expert of a compressed-tensors checkpoint. Give the experts one grid, or save "
            "with --format hfcompress"
        )


ASYMMETRIC_UNEVEN = (
    "no program reads its checkpoint back: compressed-tensors 0.17, the last whose transformers loader reads packed "
    "zero points, cannot read densely packed 3-bit codes, the later ones cannot read the zero points, and vLLM has no "
    "3-bit kernel. Quantize with sym=True (--sym), or save in format hfcompress (--format hfcompress)"
)
_INIT = "its weight initialization reads the `.weight` of linears that compressed-tensors replaces (transformers 5.24)"
# model types whose compressed-tensors checkpoints transformers fails to load, with the reason
UNLOADABLE = {"t5": _INIT, "mt5": _INIT, "umt5": _INIT, "modernbert": _INIT}

# linears that serving engines fuse into one matmul (vLLM's `packed_modules_mapping`: qkv_proj, gate_up_proj),
# which therefore must share one scheme: vLLM applies the first one's to all
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _scheme(layer: QuantLinear) -> tuple:
    """What compressed-tensors must know of a layer: (bits, group size or -1, symmetric, int8 activations)."""
    group_size = -1 if layer.group_size == layer.in_features else layer.group_size
    return layer.bits, group_size, layer.sym, not layer.EXACT_WHEN_DEQUANTIZED


def _describe(scheme: tuple) -> str:
    bits, group_size, sym, activations = scheme
    grid = f"w{bits}{'a8' if activations else ''} {'per-channel' if group_size == -1 else f'g{group_size}'}"
    return grid + ("" if sym else " asymmetric")


def _mixed_siblings(layers: dict[str, QuantLinear]) -> tuple[list[str], list[str]] | None:
    """The first set of fused siblings quantized on different schemes: (names, their schemes described)."""
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if leaf != siblings[0]:
                continue
            names = [f"{parent}.{s}" for s in siblings if f"{parent}.{s}" in layers]
            schemes = [_scheme(layers[n]) for n in names]
            if len(set(schemes)) > 1:
                return names, [f"{n.rpartition('.')[2]} {_describe(s)}" for n, s in zip(names, schemes, strict=True)]
    return None


def compressed_tensors_config(model: nn.Module) -> dict:
    """`quantization_config` of a compressed-tensors checkpoint holding the model's grids: one config group per
    scheme (bits, group size, symmetry; int8 activations for W8A8), targeting `Linear` when every quantized layer
    shares one, else the layers by name (mixed precision). Weight-only layers are `pack-quantized`, W8A8 ones
    `int-quantized` (int8 weights, per-token dynamic int8 activations)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    layers = _quantized_layers(model)
    saved = SavedNames.of(model)
    # as the checkpoint stores them (Mixtral's `block_sparse_moe.experts.3.w1`), which vLLM matches targets against
    experts = {
        name: parts if saved is None else [saved.saved_module(part) for part in parts]
        for name, parts in expert_checkpoint_names(model).items()
    }
    # transformers takes the experts' scheme from the first group that targets layers by name or class
    # (`get_experts_scheme`): theirs goes first; in it, they are named as the checkpoint names them
    first = next(iter(experts), None)
    by_scheme: dict[tuple, list[str]] = {} if first is None else {_scheme(layers[first]): []}
    for name, layer in layers.items():
        by_scheme.setdefault(_scheme(layer), []).extend(experts.get(name, [name]))
    act_order = "weight" if model.config.quantization_config.recipe.get("act_order") else None
    formats = {"int-quantized" if activations else "pack-quantized" for *_, activations in by_scheme}
    if len(formats) > 1:
        raise ValueError("the model mixes W8A8 and weight-only layers, which one compressed-tensors format cannot hold")
    groups = {}
    for i, ((bits, group_size, sym, activations), names) in enumerate(by_scheme.items()):
        weights = QuantizationArgs(
            num_bits=bits, type="int", symmetric=sym, strategy="channel" if group_size == -1 else "group",
            group_size=None if group_size == -1 else group_size, actorder=None if activations else act_order,
        )  # fmt: skip
        inputs = None
        if activations:
            inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
        targets = ["Linear"] if len(by_scheme) == 1 else sorted(names)
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=weights, input_activations=inputs)
    uneven = sorted({bits for bits, *_ in by_scheme if 32 % bits})
    if uneven:
        logger.warning(
            "%s-bit codes are written densely packed (a code may straddle two int32 words), as compressed-tensors 0.20 "
            "and vLLM's kernels read them; compressed-tensors 0.17 and older unpack %s codes per word and cannot read "
            "them (checked: transformers with compressed-tensors 0.17 fails on a shape mismatch)",
            "/".join(map(str, uneven)), "/".join(str(32 // b) for b in uneven),
        )  # fmt: skip
    asymmetric = sum(not layer.sym for layer in layers.values())
    if asymmetric:
        reads, version = installed_reads_zero_points()
        logger.warning(
            "%d of the %d quantized layers are on asymmetric grids: %s%s", asymmetric, len(layers), ZERO_POINT_READERS,
            "" if reads else f" (installed here: compressed-tensors {version or 'none'})",
        )  # fmt: skip
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in layers]
    plain_experts = plain_expert_patterns(model)
    if plain_experts:
        logger.warning(
            "%d mixture-of-experts layers are written unquantized, named in `ignore`: vLLM serves such a checkpoint "
            "(0.32 CPU checked) and hfcompress.load_compressed_tensors reads it%s", len(plain_experts),
            "; transformers does not load it as written (5.25's compressed-tensors loading decompresses every expert "
            "stored one per expert and drops plain ones; 5.19 with compressed-tensors 0.17 fails or leaves them newly "
            "initialized)" if any(plain_experts.values()) else "",
        )  # fmt: skip
    ignore += list(plain_experts)
    if first is not None and not layers[first].EXACT_WHEN_DEQUANTIZED:
        logger.warning(
            "the experts are written as W8A8 int8 linears: vLLM serves such a checkpoint (0.32 CPU checked: its int8 "
            "experts kernel needs AMX) and hfcompress.load_compressed_tensors reads it; transformers does not load it "
            "(it decompresses weight-only experts only). For one transformers loads, quantize the experts with GPTQ "
            "or RTN, or leave them in float (--modules-to-not-convert 're:.*experts.*')"
        )
    config = QuantizationConfig(
        config_groups=groups, format=formats.pop(), quantization_status="compressed", ignore=ignore
    )
    return config.model_dump(exclude_none=True)


def compressed_tensors_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each quantized layer under compressed-tensors' tensor names
    (`compressed_tensors_renaming`)."""
    return compressed_tensors_renaming(model)(model.state_dict())


def compressed_tensors_renaming(model: nn.Module) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A function taking stored tensors of `model` (its state dict, or one shard of its checkpoint after another)
    to the same with each quantized layer's under compressed-tensors' names. Of `model` only the layers' shapes
    are read, once (they may be on the meta device).

    Weight-only layers keep their packing bit for bit (our codes and zero points are its unsigned, offset
    values): `weight` becomes `weight_packed`, and `weight_shape` is added. A pruned layer (`SparseQuantLinear`:
    codes of its non-zeros and a bitmask) is written dense, each pruned weight the zero point's code, which
    dequantizes to exactly 0: the same weights, without the bitmask's saving, which the format cannot express.
    W8A8 layers store `weight` as int8 (the code less 128) and one scale per output channel [out, 1]. Mixture-of-experts layers held as one linear
    per expert go under their per-expert checkpoint names (`expert_layout`), gate and up split apart, their scales
    in the model's dtype: transformers 5.25 decompresses experts into their scales' dtype and does not cast them
    (from float16 scales, a float32 model's eager experts fail on the dtype mismatch).
    """
    layers = _quantized_layers(model)
    experts = expert_checkpoint_names(model)
    expert_scale_dtype = model.get_input_embeddings().weight.dtype if experts else None  # experts: language models

    def layer_tensors(layer: QuantLinear, leaf: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not layer.EXACT_WHEN_DEQUANTIZED:  # W8A8
            if leaf == "weight":
                return {leaf: int8_weight(tensor, layer.in_features)}
            return {leaf: tensor.reshape(-1, 1) if leaf == "weight_scale" else tensor}
        if leaf == "weight":
            return {"weight_packed": tensor, "weight_shape": torch.tensor([layer.out_features, layer.in_features])}
        return {leaf: tensor}

    pruned = {name: layer for name, layer in layers.items() if isinstance(layer, SparseQuantLinear)}
    if pruned:
        logger.info(
            "%d pruned layers are written with dense codes (compressed-tensors' packed format has no bitmask): the same "
            "weights, without the bitmask's saving", len(pruned),
        )  # fmt: skip

    def rename(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors = _densified(tensors, pruned)
        renamed = {}
        for key, tensor in tensors.items():
            module_name, _, leaf = key.rpartition(".")
            layer = layers.get(module_name)
            if layer is None:
                renamed[key] = tensor
                continue
            converted = layer_tensors(layer, leaf, tensor)
            parts = experts.get(module_name)
            if parts is None:
                renamed.update({f"{module_name}.{name}": value for name, value in converted.items()})
                continue
            if "weight_scale" in converted:
                converted["weight_scale"] = converted["weight_scale"].to(expert_scale_dtype)
            renamed.update(split_rows(converted, parts))
        return renamed

    return rename


def _densified(tensors: dict[str, torch.Tensor], pruned: dict[str, SparseQuantLinear]) -> dict[str, torch.Tensor]:
    """`tensors` with each pruned layer's kept codes and bitmask replaced by the packed dense codes a `QuantLinear`
    stores (all of a layer's tensors are in one shard: a block's are written together)."""
    held = {key.rpartition(".")[0] for key in tensors} & pruned.keys()
    if not held:
        return tensors
    tensors = dict(tensors)
    for name in held:
        layer = pruned[name]
        needed = ["weight", "weight_bitmask", "weight_scale", *([] if layer.sym else ["weight_zero_point"])]
        missing = [f"{name}.{leaf}" for leaf in needed if f"{name}.{leaf}" not in tensors]
        if missing:
            raise ValueError(
                f"the tensors of pruned layer {name} are split across shards: {missing} are not with the rest"
            )
        zeros = zero_point_codes(tensors.get(f"{name}.weight_zero_point"), tensors[f"{name}.weight_scale"], layer.bits)
        g_idx = tensors.get(f"{name}.weight_g_idx")
        group_index = g_idx.long() if g_idx is not None else torch.arange(layer.in_features) // layer.group_size
        codes = dense_codes(
            tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_bitmask"), zeros, group_index, layer.nnz,
            layer.bits,
        )  # fmt: skip
        tensors[f"{name}.weight"] = pack_codes(codes, layer.bits)
    return tensors


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
