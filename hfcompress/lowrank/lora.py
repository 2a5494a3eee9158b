"""Folding a peft LoRA adapter into a model whose layers may be factorized, without forming dense matrices.

Where the adapter sits decides the maths:
- on a whole `FactorizedLinear` (an adapter trained on the dense original model, or on the factorized model
  with the layer registered as a custom peft module): `U V + s B A` is a rank r + k sum, refactorized exactly
  by `lowrank_update` and truncated to the requested rank;
- on a factor (`<layer>.up` or `<layer>.down`, what peft targets on a factorized model by default): the
  update goes into that thin factor, `(U + s B_u A_u)(V + s B_d A_d)` keeps rank r and is exact;
- on an ordinary linear layer: `W + s B A`, as peft's `merge_and_unload`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Literal

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..core.structure import (
    LINEAR_TYPES,
    linear_weight,
    set_linear_weight,
    set_submodule,
)
from .modules import FactorizedLinear
from .svd import lowrank_update

__all__ = ["LoraUpdate", "adapt_factorized_layers", "load_lora_updates", "merge_lora"]

logger = logging.getLogger(__name__)

_PREFIX = "base_model.model."


class LoraUpdate:
    """One adapted module's update `scaling * B @ A` (`A` [k, in], `B` [out, k])."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, scaling: float):
        self.A, self.B, self.scaling = A, B, scaling

    @property
    def rank(self) -> int:
        return self.A.shape[0]


def _pattern_value(patterns: dict, name: str, default):
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def load_lora_updates(adapter: str | os.PathLike) -> tuple[dict[str, LoraUpdate], dict]:
    """The LoRA updates of a saved peft adapter (a folder, or a Hub id), by module name, and its config."""
    path = os.fspath(adapter)
    if not os.path.isdir(path):
        if os.path.exists(path) or path.startswith((".", "/", "~")):
            raise FileNotFoundError(f"adapter {path!r} is not a folder (expected a peft adapter folder or a Hub id)")

        try:
            path = snapshot_download(path, allow_patterns=["adapter_config.json", "adapter_model.safetensors"])
        except Exception as e:  # offline, unreachable, no such repo: huggingface_hub raises several kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(
                f"adapter {path!r} is no local folder, and fetching it from the Hub failed ({first}); give a peft "
                "adapter folder, or check the name and the network (HF_ENDPOINT, HF_HUB_OFFLINE)"
            ) from e
    config_file = os.path.join(path, "adapter_config.json")
    weights_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(config_file) or not os.path.isfile(weights_file):
        raise FileNotFoundError(
            f"{adapter!r} is not a peft adapter: it needs adapter_config.json and adapter_model.safetensors "
            "(adapters saved as .bin pickles are not read)"
        )
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"adapter config {config_file!r} is not valid JSON ({e}); is the adapter folder damaged?"
        ) from e
    if not isinstance(config, dict):
        raise ValueError(f"adapter config {config_file!r} must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"adapter {adapter!r} is a {config.get('peft_type')!r} adapter; only LORA adapters can be merged"
        )
    if config.get("use_dora"):
        raise ValueError(f"adapter {adapter!r} uses DoRA, whose magnitude vector does not fold into low-rank factors")
    try:
        state = load_file(weights_file)
    except SafetensorError as e:
        raise ValueError(
            f"adapter weights {weights_file!r} are not a readable safetensors file ({e}); the file is truncated or "
            "damaged: save the adapter again"
        ) from e
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name = key.removeprefix(_PREFIX)
        match = re.fullmatch(r"(.+)\.lora_(A|B)(?:\.[^.]+)?\.weight", name)
        if match is None:
            raise ValueError(
                f"adapter {adapter!r} holds {key!r}, which is not a LoRA A/B weight of a linear layer "
                "(embedding or convolution adapters and modules_to_save are not supported)"
            )
        by_module.setdefault(match.group(1), {})[match.group(2)] = tensor
    updates = {}
    for name, pair in by_module.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter {adapter!r} has only lora_{''.join(pair)} for {name!r}")
        A, B = pair["A"], pair["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"adapter {adapter!r}: {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, not a linear LoRA pair"
            )
        rank = A.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank))
        scaling = alpha / (rank**0.5 if config.get("use_rslora") else rank)
        updates[name] = LoraUpdate(A, B, scaling)
    if not updates:
        raise ValueError(f"adapter {adapter!r} holds no LoRA weights")
    return updates, config


def adapt_factorized_layers(lora_config):
    """Let peft put adapters on whole `FactorizedLinear` layers (e.g. `target_modules=["q_proj", "v_proj"]` on
    a factorized model), using peft's own LoRA linear layer; returns `lora_config`. Without it, target the
    factors (`"q_proj.up"`, ...) instead, which peft supports as plain linears."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    lora_config._register_custom_module({FactorizedLinear: LoraLinear})
    return lora_config


@torch.no_grad()
def merge_lora(
    model: nn.Module,
    adapter: str | os.PathLike,
    rank: int | Literal["original", "exact"] = "original",
) -> nn.Module:
    """Fold the LoRA adapter saved at `adapter` into `model` in place and return it; no adapter is left.

    `rank` applies to factorized layers adapted as a whole: "original" (default) keeps each layer's rank,
    truncating the sum to its best approximation of that rank; "exact" keeps rank r + k, so the merged model
    computes exactly what the adapted one did; an integer sets that rank everywhere.
    """
    if isinstance(rank, str) and rank not in ("original", "exact"):
        raise ValueError(f"`rank` must be a positive integer, 'original' or 'exact', got {rank!r}")
    if not isinstance(rank, str) and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"`rank` must be a positive integer, 'original' or 'exact', got {rank!r}")
    updates, adapter_config = load_lora_updates(adapter)
    _check_targets(model, updates, adapter, adapter_config)
    lowrank = _recorded_ranks(model)
    truncated = []
    for name, update in updates.items():
        module = model.get_submodule(name)
        if isinstance(module, FactorizedLinear):
            new_rank = {
                "original": module.rank,
                "exact": module.rank + update.rank,
            }.get(rank, rank)
            up, down = lowrank_update(
                module.up.weight.float(),
                module.down.weight.float(),
                update.scaling * update.B.float(),
                update.A.float(),
                new_rank,
            )
            dtype = module.up.weight.dtype
            bias = module.up.bias.detach() if module.up.bias is not None else None
            set_submodule(
                model,
                name,
                FactorizedLinear.from_factors(up.to(dtype), down.to(dtype), bias),
            )
            if new_rank < module.rank + update.rank:
                truncated.append(name)
            if lowrank is not None:
                lowrank[name] = new_rank
        else:
            W = linear_weight(module)
            delta = update.scaling * (update.B.float() @ update.A.float())
            set_linear_weight(module, (W.float() + delta).to(W.dtype))
    if truncated:
        logger.info(
            "truncated %d factorized layers back to rank %s after adding the adapter: %s",
            len(truncated),
            rank,
            truncated,
        )
    logger.info("merged %d LoRA updates from %s", len(updates), adapter)
    return model


def _recorded_ranks(model: nn.Module) -> dict[str, int] | None:
    config = getattr(model.config, "quantization_config", None)
    return getattr(config, "lowrank", None)


def _check_targets(model: nn.Module, updates: dict[str, LoraUpdate], adapter, adapter_config: dict) -> None:
    base = adapter_config.get("base_model_name_or_path")
    where = f" (trained on {base!r})" if base else ""
    missing = []
    for name, update in updates.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            missing.append(name)
            continue
        if not isinstance(module, (FactorizedLinear, *LINEAR_TYPES)):
            raise ValueError(
                f"adapter {adapter!r}{where} adapts {name!r}, a {type(module).__name__}; only linear and factorized layers can be merged"
            )
        out_features, in_features = (
            (module.out_features, module.in_features)
            if isinstance(module, FactorizedLinear)
            else linear_weight(module).shape
        )
        if update.A.shape[1] != in_features or update.B.shape[0] != out_features:
            raise ValueError(
                f"adapter {adapter!r}{where} does not fit this model: {name!r} is {out_features}x{in_features} but the "
                f"adapter's update is {update.B.shape[0]}x{update.A.shape[1]}"
            )
    if missing:
        raise ValueError(
            f"adapter {adapter!r}{where} adapts modules this {type(model).__name__} does not have: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}"
        )
