"""Reading a compressed-tensors checkpoint of weight-only integer grids into hfcompress's own `QuantLinear`s.

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
from safetensors import safe_open
from torch import nn

from ..core.structure import set_submodule
from .modules import QuantLinear

__all__ = ["load_compressed_tensors"]

logger = logging.getLogger(__name__)

_BITS = (2, 3, 4, 8)


def load_compressed_tensors(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The model of the compressed-tensors checkpoint in `folder`, a local folder or a Hub repo id (its config and
    safetensors files are downloaded), as the class its config's `architectures` names: each quantized linear a
    `QuantLinear` holding the stored codes, scales and zero points as they are, the rest in `dtype` (default: the
    dtype the config names). Reads `pack-quantized` integer weights, per group or per channel, symmetric or not,
    without act-order indices; anything else the checkpoint holds is refused, naming it."""
    if not os.path.isdir(folder):
        folder = snapshot_download(os.fspath(folder), allow_patterns=["*.json", "*.safetensors"])
    folder = Path(folder)
    config = transformers.AutoConfig.from_pretrained(folder)
    quantization = getattr(config, "quantization_config", None)
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{os.fspath(folder)} is not a compressed-tensors checkpoint (no such quantization_config)")
    groups = _weight_schemes(folder, quantization)
    delattr(config, "quantization_config")
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    architecture = getattr(transformers, (getattr(config, "architectures", None) or ["AutoModel"])[0], None)
    with init_empty_weights(include_buffers=False):
        if architecture is None or architecture.__name__.startswith("Auto"):
            model = transformers.AutoModel.from_config(config, dtype=dtype)
        else:
            model = architecture._from_config(config, dtype=dtype)
    tensors = _stored_tensors(folder)
    ignore = quantization.get("ignore") or []
    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or _matches(name, module, ignore):
            continue
        scheme = next((s for targets, s in groups if _matches(name, module, targets)), None)
        if scheme is None:
            continue
        bits, group_size, sym = scheme
        scale = tensors.get(f"{name}.weight_scale")
        if scale is None:
            raise ValueError(
                f"{os.fspath(folder)} has no weight_scale for {name}, which its quantization_config targets"
            )
        layer = QuantLinear(module.in_features, module.out_features, bits, group_size, sym,
                            bias=module.bias is not None, scale_dtype=scale[1], dtype=dtype, device="meta")  # fmt: skip
        set_submodule(model, name, layer)
        replaced += 1
    state = _load_renamed(folder, tensors)
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
    logger.info("read %d quantized linears of %s from %s", replaced, type(model).__name__, folder)
    return model.eval()


def _weight_schemes(folder: Path, quantization: dict) -> list[tuple[list[str], tuple[int, int, bool]]]:
    """[(targets, (bits, group size or -1, symmetric))] of the config groups, refusing what QuantLinear cannot hold."""
    if quantization.get("format") != "pack-quantized":
        raise ValueError(
            f"{os.fspath(folder)} is compressed-tensors format {quantization.get('format')!r}; only pack-quantized "
            "weight-only integer grids are read"
        )
    schemes = []
    for name, group in (quantization.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        problem = None
        if group.get("input_activations") or group.get("output_activations"):
            problem = "quantizes activations"
        elif weights.get("type") != "int" or weights.get("num_bits") not in _BITS:
            problem = f"is {weights.get('num_bits')}-bit {weights.get('type')} (int of {', '.join(map(str, _BITS))} bits read)"
        elif weights.get("strategy") not in ("group", "channel"):
            problem = f"has strategy {weights.get('strategy')!r} (group and channel are read)"
        elif weights.get("actorder") == "group":
            problem = "stores act-order indices (actorder='group')"
        if problem:
            raise ValueError(f"{os.fspath(folder)}: config group {name!r} {problem}, which hfcompress does not read")
        group_size = weights["group_size"] if weights["strategy"] == "group" else -1
        schemes.append((group.get("targets") or [], (weights["num_bits"], group_size, bool(weights.get("symmetric")))))
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


def _stored_tensors(folder: Path) -> dict[str, tuple[str, torch.dtype]]:
    """{stored name: (file, dtype)} from the headers of the checkpoint's safetensors files."""
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(os.fspath(file), framework="pt") as handle:
            for key in handle.keys():
                found[key] = (os.fspath(file), handle.get_slice(key).get_dtype())
    if not found:
        raise ValueError(f"{os.fspath(folder)} holds no safetensors weights")
    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    return {k: (f, dtypes.get(d, torch.float16)) for k, (f, d) in found.items()}


def _load_renamed(folder: Path, tensors: dict[str, tuple[str, torch.dtype]]) -> dict[str, torch.Tensor]:
    """Every stored tensor under the name hfcompress's layers give it."""
    state = {}
    for file in sorted({f for f, _ in tensors.values()}):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight_shape"):
                    continue
                renamed = key[: -len("_packed")] if key.endswith(".weight_packed") else key
                state[renamed] = handle.get_tensor(key)
    return state
