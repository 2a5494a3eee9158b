"""Reading a compressed-tensors checkpoint of integer grids into hfcompress's own `QuantLinear`s (`Int8Linear`s for W8A8).

Our packing is compressed-tensors' `pack-quantized` bit for bit (codes and zero points as its unsigned, offset
values; `export.py` only renames), so reading one back is renaming the other way: `weight_packed` becomes
`weight`, `weight_shape` is dropped. That loads what transformers cannot with compressed-tensors 0.18 to 0.20.1:
asymmetric grids, whose packed zero points its loader refuses (`ct_readers`), from hfcompress's exports and from
llm-compressor's `W4A16_ASYM` checkpoints alike, and runs them on hfcompress's kernels. Experts, stored one
linear each, come back as the packed layers of an `ExpertLinears` (transformers decompresses them to dense).
The same layout reads such a folder one block at a time for the streamed perplexity (`core.stored_formats`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key

from ..core.experts import is_fused_experts, unfuse_experts
from ..core.packing import pack_codes
from ..core.structure import set_submodule
from .ct_readers import experts_transformers_cannot_load, stored_expert_tensors, zero_points_unreadable
from .expert_layout import expert_checkpoint_names
from .int8_linear import Int8Linear
from .modules import QuantLinear

__all__ = ["CompressedTensorsLayout", "load_compressed_tensors", "reader_obstacle", "why_hfcompress_reads"]

logger = logging.getLogger(__name__)

_BITS = (2, 3, 4, 8)


def load_compressed_tensors(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of the compressed-tensors checkpoint in `folder`, a local folder or a Hub repo id (its config and
    safetensors files are downloaded), as the class its config's `architectures` names: each quantized linear a
    `QuantLinear` holding the stored codes, scales and zero points as they are, the rest in `dtype` (default: the
    dtype the config names). Reads `pack-quantized` integer weights, per group or per channel, symmetric or not,
    without act-order indices, and `int-quantized` W8A8 (int8 per-channel weights, dynamic per-token int8
    activations: `Int8Linear`), experts included (`CompressedTensorsLayout`); anything else the checkpoint holds
    is refused, naming it."""
    if not os.path.isdir(folder):
        folder = snapshot_download(os.fspath(folder), allow_patterns=["*.json", "*.safetensors"])
    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    quantization = getattr(config, "quantization_config", None)
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{os.fspath(folder)} is not a compressed-tensors checkpoint (no such quantization_config)")
    delattr(config, "quantization_config")
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    architecture = getattr(transformers, (getattr(config, "architectures", None) or ["AutoModel"])[0], None)
    with init_empty_weights(include_buffers=False):
        if architecture is None or architecture.__name__.startswith("Auto"):
            model = transformers.AutoModel.from_config(config, dtype=dtype)
        else:
            model = architecture._from_config(config, dtype=dtype)
    stored = _stored_tensors(folder)
    layout = CompressedTensorsLayout(folder, model, quantization, {k: t.dtype for k, t in stored.items()})
    filled = layout.filled(stored)
    state = {name: layout.as_loaded(name, [stored[s] for s in layout.sources[name]]) for name in filled}
    used = {s for name in filled for s in layout.sources[name]}
    unexpected = sorted(k for k in stored if k not in used and not k.endswith(".weight_shape"))
    if unexpected:
        raise ValueError(f"{os.fspath(folder)} holds tensors {type(model).__name__} has no place for: {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    model.to(dtype)  # the unquantized weights; QuantLinear keeps its codes and its scales' dtype
    model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise ValueError(
            f"{os.fspath(folder)} does not hold {len(missing)} tensors of {type(model).__name__}: {missing[:5]}"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    model.config._name_or_path = os.fspath(folder)
    logger.info("read %d quantized linears of %s from %s", len(layout.layers), type(model).__name__, folder)
    return model.eval()


def why_hfcompress_reads(folder: str | os.PathLike, quantization_config) -> str | None:
    """Why `load_compressed_tensors` rather than transformers loads the checkpoint in `folder` (a model config's
    `quantization_config`; None: transformers does): the installed compressed-tensors cannot read its packed zero
    points in transformers, the local folder holds experts transformers does not load as written (W8A8 ones, plain
    ones stored one per expert), or quantized experts, which transformers decompresses into dense weights as it
    loads (the memory of the float experts) and hfcompress's reader keeps packed."""
    if zero_points_unreadable(quantization_config):
        return "the compressed-tensors installed cannot read its zero points in transformers"
    if (
        not isinstance(quantization_config, dict)
        or quantization_config.get("quant_method") != "compressed-tensors"
        or not os.path.isdir(folder)
        or reader_obstacle(Path(folder), quantization_config) is not None
    ):
        return None
    experts = stored_expert_tensors(folder)
    unloadable = experts_transformers_cannot_load(experts, quantization_config)
    if unloadable:
        return f"transformers does not load it: {unloadable}"
    if any("weight_packed" in found for found in experts.values()):
        return "transformers would decompress its quantized experts to dense weights"
    return None


def reader_obstacle(folder: Path, quantization: dict) -> str | None:
    """Why `CompressedTensorsLayout` cannot read the compressed-tensors checkpoint in `folder`, whole or one block
    at a time (None when it can), from its `quantization` config alone: a scheme hfcompress's layers do not hold.
    The stored format's obstacle (`core.stored_formats`), which `core.streaming.streaming_obstacle` asks."""
    try:
        _weight_schemes(folder, quantization)
    except ValueError as refusal:
        return str(refusal)
    return None


class CompressedTensorsLayout:
    """How the stored tensors of a compressed-tensors checkpoint become hfcompress's layers, for the whole model
    (`load_compressed_tensors`) and one block at a time (`core.streaming.ShardedCheckpoint`, which reads a
    compressed-tensors folder through it to evaluate the model as stored).

    Building it puts in `model` (on the meta device, its `quantization_config` already taken out of the config)
    a `QuantLinear` or `Int8Linear` on the meta device for each linear the checkpoint's `quantization` targets,
    refusing what hfcompress's layers cannot hold; `stored_dtypes` gives each stored tensor's dtype (the layers
    keep their scales' dtype). Experts the checkpoint stores one linear each (`<experts>.3.w1`, as transformers'
    conversion mapping and vLLM read them) are held as `ExpertLinears` (`core.experts`), each expert's gate and up
    rows put back together. Then `sources[model tensor]` lists the stored tensors it is made of (several for an
    expert's gate and up), `filled(stored names)` says which model tensors a checkpoint holds, and
    `as_loaded(model tensor, stored tensors)` makes it."""

    def __init__(self, folder: Path, model: nn.Module, quantization: dict, stored_dtypes: dict[str, torch.dtype]):
        self.packed: set[str] = set()  # QuantLinear: `weight` is stored as `weight_packed`
        self.int8: set[str] = set()  # Int8Linear: int8 weights repacked as 8-bit codes
        self.parts: dict[str, list[str]] = {}  # an expert's linear: the stored linears of its rows, in order
        # stored names as loading renames them (Mixtral's `block_sparse_moe` is the model's `mlp`) -> as stored
        self._stored = _renamed_keys(model, stored_dtypes)
        if any(is_fused_experts(m) and f"{n}.down_proj" not in stored_dtypes for n, m in model.named_modules()):
            unfuse_experts(model)
            self.parts = expert_checkpoint_names(model)
        groups = _weight_schemes(folder, quantization)
        ignore = quantization.get("ignore") or []
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            parts = self.parts.get(name, [name])
            schemes = {_scheme_of([part, self._stored_linear(part)], module, groups, ignore) for part in parts}
            if len(schemes) > 1:
                raise ValueError(
                    f"{os.fspath(folder)} quantizes {', '.join(map(self._stored_linear, parts))} on different "
                    f"schemes, which the one layer {name} cannot hold"
                )
            scheme = schemes.pop()
            if scheme is None:
                continue
            bits, group_size, sym, w8a8 = scheme
            scale = self._stored_linear(parts[0]) + ".weight_scale"
            if scale not in stored_dtypes:
                raise ValueError(f"{os.fspath(folder)} has no {scale}, which its quantization_config targets")
            scale_dtype = stored_dtypes[scale]
            dtype = module.weight.dtype
            kwargs = dict(bias=module.bias is not None, scale_dtype=scale_dtype, dtype=dtype, device="meta")
            if w8a8:
                layer = Int8Linear(module.in_features, module.out_features, **kwargs)
                self.int8.add(name)
            else:
                layer = QuantLinear(module.in_features, module.out_features, bits, group_size, sym, **kwargs)
                self.packed.add(name)
            set_submodule(model, name, layer)
        self.sources = {name: self._sources_of(name) for name in model.state_dict()}

    def _stored_linear(self, part: str) -> str:
        """The stored name of the linear loading names `part`."""
        for leaf in ("weight_scale", "weight_packed", "weight"):
            key = self._stored.get(f"{part}.{leaf}")
            if key is not None:
                return key.rpartition(".")[0]
        return part

    @property
    def layers(self) -> set[str]:
        return self.packed | self.int8

    def _sources_of(self, name: str) -> list[str]:
        layer, _, leaf = name.rpartition(".")
        stored_leaf = "weight_packed" if leaf == "weight" and layer in self.packed else leaf
        return [
            self._stored.get(key, key) for key in (f"{part}.{stored_leaf}" for part in self.parts.get(layer, [layer]))
        ]

    def filled(self, stored) -> set[str]:
        """The model tensors whose every source is among the `stored` names."""
        return {name for name, sources in self.sources.items() if all(s in stored for s in sources)}

    def as_loaded(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Model tensor `name` from its stored `tensors` (`sources[name]`, read in that order): an expert's rows
        stacked; a W8A8 layer's int8 weights as 8-bit codes (the int8 value plus 128) packed in int32 words, its
        scales [out, 1]; the rest as stored."""
        tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors)
        layer, _, leaf = name.rpartition(".")
        if layer in self.int8 and leaf == "weight":
            return pack_codes(tensor.to(torch.int16) + 128, 8)
        if layer in self.int8 and leaf == "weight_scale":
            return tensor.reshape(-1, 1)
        return tensor


def _renamed_keys(model: nn.Module, stored) -> dict[str, str]:
    """{the name loading gives a stored tensor (transformers' renamings of the model's checkpoints): its stored
    name}, for the names that change."""
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return {}
    prefix, expected = getattr(model, "base_model_prefix", None), model.state_dict()
    renamed = {rename_source_key(key, renamings, [], prefix, expected)[0]: key for key in stored}
    return {new: old for new, old in renamed.items() if new != old}


def _scheme_of(names: list[str], module: nn.Module, groups, ignore: list[str]) -> tuple[int, int, bool, bool] | None:
    """The scheme of the first config group whose targets match the linear (by any of its `names`: as the model
    and as the checkpoint name it), None if none does or it is ignored."""
    if any(_matches(name, module, ignore) for name in names):
        return None
    return next((s for targets, s in groups if any(_matches(name, module, targets) for name in names)), None)


def _weight_schemes(folder: Path, quantization: dict) -> list[tuple[list[str], tuple[int, int, bool, bool]]]:
    """[(targets, (bits, group size or -1, symmetric, W8A8))] of the config groups, refusing what hfcompress's
    layers cannot hold."""
    format = quantization.get("format")
    if format not in ("pack-quantized", "int-quantized"):
        raise ValueError(
            f"{os.fspath(folder)} is compressed-tensors format {format!r}; pack-quantized (weight-only integer grids) "
            "and int-quantized (W8A8) are read"
        )
    schemes = []
    for name, group in (quantization.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        inputs = group.get("input_activations")
        problem = None
        if format == "int-quantized":
            w8a8 = (weights.get("num_bits"), weights.get("type"), weights.get("strategy"), weights.get("symmetric"))
            if (
                w8a8 != (8, "int", "channel", True)
                or (inputs or {}).get("strategy") != "token"
                or not inputs.get("dynamic")
            ):
                problem = "is not W8A8 with per-channel symmetric weights and dynamic per-token activations"
        elif inputs or group.get("output_activations"):
            problem = "quantizes activations in a pack-quantized checkpoint"
        elif weights.get("type") != "int" or weights.get("num_bits") not in _BITS:
            problem = f"is {weights.get('num_bits')}-bit {weights.get('type')} (int of {', '.join(map(str, _BITS))} bits read)"
        elif weights.get("strategy") not in ("group", "channel"):
            problem = f"has strategy {weights.get('strategy')!r} (group and channel are read)"
        elif weights.get("actorder") == "group":
            problem = "stores act-order indices (actorder='group')"
        if problem:
            raise ValueError(f"{os.fspath(folder)}: config group {name!r} {problem}, which hfcompress does not read")
        group_size = weights["group_size"] if weights["strategy"] == "group" else -1
        scheme = (weights["num_bits"], group_size, bool(weights.get("symmetric")), format == "int-quantized")
        schemes.append((group.get("targets") or [], scheme))
    return schemes


def _matches(name: str, module: nn.Module, targets: list[str]) -> bool:
    """compressed-tensors' target matching: a class name, a module name, or `re:` and a pattern matched at the
    start of the module name."""
    for target in targets:
        if target.startswith("re:"):
            if re.match(target[3:], name):
                return True
        elif target in (name, type(module).__name__):
            return True
    return False


def _stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint's safetensors files, as stored."""
    stored = {}
    for file in sorted(folder.glob("*.safetensors")):
        stored.update(load_file(file))
    if not stored:
        raise ValueError(f"{os.fspath(folder)} holds no safetensors weights")
    return stored
