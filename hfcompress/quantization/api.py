"""`quantize(model, config)`: the verb that turns a transformers model into a quantized one in place."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..data import calibration_batches, calibration_windows
from .config import GPTQConfig, HfcompressQuantizationConfig, RTNConfig
from .grid import rtn_quantize
from .modules import QuantLinear
from .sequential import quantize_blocks
from .structure import candidate_linears, find_layer_stack, linear_weight, set_submodule

__all__ = ["quantize", "select_targets"]

logger = logging.getLogger(__name__)

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def select_targets(model: nn.Module, config: RTNConfig) -> dict[str, nn.Module]:
    """The linear layers `config` quantizes, checked against its grid before any work starts."""
    targets = candidate_linears(model, config.modules_to_not_convert)
    if not targets:
        raise ValueError(f"no linear layers to quantize in {type(model).__name__} (excluded: {config.modules_to_not_convert})")
    if config.group_size != -1:
        for name, module in targets.items():
            in_features = linear_weight(module).shape[1]
            if in_features % config.group_size:
                raise ValueError(
                    f"`group_size` {config.group_size} does not divide the {in_features} input features of "
                    f"{name!r}; use a divisor of every layer's input size, or -1 for per-channel"
                )
    tied = _tied_weights(model, targets)
    if tied:
        raise ValueError(
            f"cannot quantize {tied}: the weight is tied to an embedding; add it to modules_to_not_convert"
        )
    return targets


def _tied_weights(model: nn.Module, targets: dict[str, nn.Module]) -> list[str]:
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [name for name, m in targets.items() if id(m.weight) in embedding_weights]


def quantize(model: nn.Module, config: RTNConfig, tokenizer=None) -> nn.Module:
    """Quantize the linear layers of `model` in place and return it, ready for `save_pretrained`.

    `config` is an `RTNConfig` (no data) or a `GPTQConfig`, whose `dataset` is a list of strings, a text file,
    a `datasets` folder, a Hub dataset name or a tensor of token ids [n, seq_len]. Text needs `tokenizer`;
    without one it is loaded from `model.name_or_path`. A `BnbConfig` returns a new, bitsandbytes-quantized
    model (bitsandbytes quantizes while loading) and leaves `model` as it was.
    """
    from .bnb import BnbConfig, quantize_bnb
    from .codebook_api import quantize_codebook
    from .codebook_config import KMeansConfig, VQConfig

    if isinstance(config, BnbConfig):
        return quantize_bnb(model, config)  # a new model: bitsandbytes quantizes while loading
    if isinstance(config, (KMeansConfig, VQConfig)):
        if getattr(model, "hf_quantizer", None) is not None and getattr(model.config.quantization_config, "modules", None):
            raise ValueError("the model is already quantized")
        return quantize_codebook(model, config, tokenizer)
    if not isinstance(config, RTNConfig):
        raise TypeError(
            f"`config` must be an hfcompress RTNConfig, GPTQConfig, BnbConfig, KMeansConfig or VQConfig, "
            f"got {type(config).__name__}"
        )
    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError("the model is already quantized")
    blocks = find_layer_stack(model)[1] if isinstance(config, GPTQConfig) else None
    targets = select_targets(model, config)
    scale_dtype = _SCALE_DTYPES[config.scale_dtype]

    if isinstance(config, GPTQConfig):
        batches = _calibration_batches(model, config, tokenizer)
        was_training = model.training
        model.eval()
        done = quantize_blocks(model, blocks, batches, targets, config, scale_dtype)
        model.train(was_training)
        remaining = {n: m for n, m in targets.items() if n not in done}
    else:
        remaining = targets
    if remaining and isinstance(config, GPTQConfig):
        logger.warning(
            "%d layers outside the block stack are quantized with round-to-nearest: %s", len(remaining), list(remaining)
        )
    for name, module in tqdm(remaining.items(), desc="round-to-nearest", disable=not remaining):
        replace_with_rtn(model, name, module, config, scale_dtype)

    _attach_config(model, config, list(targets), sorted({type(m).__name__ for m in targets.values()}))
    return model


def replace_with_rtn(model: nn.Module, name: str, module: nn.Module, config: RTNConfig, scale_dtype) -> None:
    quantized = rtn_quantize(
        linear_weight(module).detach(), config.bits, config.group_size, config.sym, config.clip_search
    )
    # every layer of a checkpoint has the same buffers: with act-order, a (trivial) g_idx too
    act_order = _stores_g_idx(config)
    layer = QuantLinear.from_quantized(quantized, config.group_size, config.sym, act_order, module.bias, scale_dtype)
    set_submodule(model, name, layer)


def _stores_g_idx(config: RTNConfig) -> bool:
    return bool(getattr(config, "act_order", False) and not getattr(config, "static_groups", False))


def _calibration_batches(model, config: GPTQConfig, tokenizer) -> list[torch.Tensor]:
    if config.dataset is None:
        raise ValueError("GPTQConfig needs calibration data: pass `dataset=` (texts, a text file or a dataset)")
    windows = calibration_windows(model, config.dataset, config.seq_len, tokenizer)
    return calibration_batches(windows, config.num_samples, batch_size=config.batch_size)


def _attach_config(model: nn.Module, config: RTNConfig, modules: list[str], layer_types: list[str]) -> None:
    from .hf_quantizer import attach_config

    qconfig = HfcompressQuantizationConfig(
        bits=config.bits,
        group_size=config.group_size,
        sym=config.sym,
        act_order=_stores_g_idx(config),
        modules=modules,
        layer_types=layer_types,
        scale_dtype=config.scale_dtype,
        method=config.method,
        recipe=config.to_dict(),
    )
    attach_config(model, qconfig)
