"""Reading a compressed-tensors checkpoint of integer grids into hfcompress's own `QuantLinear`s (`Int8Linear`s for W8A8).

Our packing is compressed-tensors' `pack-quantized` bit for bit (codes and zero points as its unsigned, offset
values; `export.py` only renames), so reading one back is renaming the other way: `weight_packed` becomes
`weight`, `weight_shape` is dropped. That loads what transformers cannot with compressed-tensors 0.18 to 0.20.1:
asymmetric grids, whose packed zero points its loader refuses (`ct_readers`), from hfcompress's exports and from
llm-compressor's `W4A16_ASYM` checkpoints alike, and runs them on hfcompress's kernels.
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

from ..core.packing import pack_codes
from ..core.structure import set_submodule
from .int8_linear import Int8Linear
from .modules import QuantLinear

__all__ = ["CompressedTensorsLayout", "load_compressed_tensors"]

logger = logging.getLogger(__name__)

_BITS = (2, 3, 4, 8)


def load_compressed_tensors(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of the compressed-tensors checkpoint in `folder`, a local folder or a Hub repo id (its config and
    safetensors files are downloaded), as the class its config's `architectures` names: each quantized linear a
    `QuantLinear` holding the stored codes, scales and zero points as they are, the rest in `dtype` (default: the
    dtype the config names). Reads `pack-quantized` integer weights, per group or per channel, symmetric or not,
    without act-order indices, and `int-quantized` W8A8 (int8 per-channel weights, dynamic per-token int8
    activations: `Int8Linear`); anything else the checkpoint holds is refused, naming it."""
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
    state = {layout.model_name(k): layout.as_loaded(k, t) for k, t in stored.items() if layout.model_name(k)}
    expected = model.state_dict().keys()
    unexpected = sorted(k for k in state if k not in expected)
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


class CompressedTensorsLayout:
    """How the stored tensors of a compressed-tensors checkpoint become hfcompress's layers, for the whole model
    (`load_compressed_tensors`) and one block at a time (`core.streaming.ShardedCheckpoint`, which reads a
    compressed-tensors folder through it to evaluate the model as stored).

    Building it puts in `model` (on the meta device, its `quantization_config` already taken out of the config)
    a `QuantLinear` or `Int8Linear` on the meta device for each linear the checkpoint's `quantization` targets,
    refusing what hfcompress's layers cannot hold; `stored_dtypes` gives each stored tensor's dtype (the layers
    keep their scales' dtype). Then `stored_name(model tensor)`, `model_name(stored tensor)` (None for what
    hfcompress does not keep) and `as_loaded(stored name, tensor)` map between the two."""

    def __init__(self, folder: Path, model: nn.Module, quantization: dict, stored_dtypes: dict[str, torch.dtype]):
        self.packed: set[str] = set()  # QuantLinear: `weight` is stored as `weight_packed`
        self.int8: set[str] = set()  # Int8Linear: int8 weights repacked as 8-bit codes
        groups = _weight_schemes(folder, quantization)
        ignore = quantization.get("ignore") or []
        for name, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or _matches(name, module, ignore):
                continue
            scheme = next((s for targets, s in groups if _matches(name, module, targets)), None)
            if scheme is None:
                continue
            bits, group_size, sym, w8a8 = scheme
            scale_dtype = stored_dtypes.get(f"{name}.weight_scale")
            if scale_dtype is None:
                raise ValueError(
                    f"{os.fspath(folder)} has no weight_scale for {name}, which its quantization_config targets"
                )
            dtype = module.weight.dtype
            kwargs = dict(bias=module.bias is not None, scale_dtype=scale_dtype, dtype=dtype, device="meta")
            if w8a8:
                layer = Int8Linear(module.in_features, module.out_features, **kwargs)
                self.int8.add(name)
            else:
                layer = QuantLinear(module.in_features, module.out_features, bits, group_size, sym, **kwargs)
                self.packed.add(name)
            set_submodule(model, name, layer)

    @property
    def layers(self) -> set[str]:
        return self.packed | self.int8

    def stored_name(self, name: str) -> str:
        layer, _, leaf = name.rpartition(".")
        return f"{layer}.weight_packed" if leaf == "weight" and layer in self.packed else name

    def model_name(self, key: str) -> str | None:
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight_shape":
            return None
        return f"{layer}.weight" if leaf == "weight_packed" else key

    def as_loaded(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """The stored tensor `key` in the layout hfcompress's layer holds it: a W8A8 layer's int8 weights as 8-bit
        codes (the int8 value plus 128) packed in int32 words, its scales [out, 1]; the rest as stored."""
        layer, _, leaf = key.rpartition(".")
        if layer in self.int8 and leaf == "weight":
            return pack_codes(tensor.to(torch.int16) + 128, 8)
        if layer in self.int8 and leaf == "weight_scale":
            return tensor.reshape(-1, 1)
        return tensor


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
