"""The k-means / VQ driver: sensitivities block by block from calibration data (optional), then codebooks."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..checkpoint import manifest_of, update_manifest
from ..core.structure import candidate_linears, linear_weight, set_submodule
from ..core.walk import for_each_block_hessian
from ..data import calibration_data
from .api import bitmask_hint
from .codebook import kmeans_quantize, vq_quantize
from .codebook_config import KMeansConfig, VQConfig
from .codebook_linear import CodebookLinear

__all__ = ["attach_codebooks", "codebook_record", "codebook_targets", "encode_layer", "quantize_codebook"]

logger = logging.getLogger(__name__)


def encode_layer(module: nn.Module, config, sensitivity: torch.Tensor | None) -> CodebookLinear:
    """The `CodebookLinear` of `module` as `config` says (`sensitivity`: each input's weight in the k-means
    distance, the Hessian's diagonal; None: all alike)."""
    W = linear_weight(module).detach()
    if isinstance(config, KMeansConfig):
        codes, codebook = kmeans_quantize(W, config.bits, sensitivity, config.iters)
    else:
        codes, codebook = vq_quantize(W, config.bits, config.dim, config.groups, sensitivity, config.iters)
    layer = CodebookLinear.from_codes(codes, codebook, config.bits, module.bias)
    return layer.to(W.device)


def codebook_targets(model: nn.Module, config: KMeansConfig | VQConfig) -> dict[str, nn.Module]:
    """The linear layers `config` quantizes, by full name; refuses a model with none, or with layers VQ's vectors
    and books do not tile."""
    targets = candidate_linears(model, config.modules_to_not_convert)
    if not targets:
        raise ValueError(f"no linear layers to quantize in {type(model).__name__}" + bitmask_hint(model))
    _check_shapes(targets, config)
    return targets


def _check_shapes(targets: dict[str, nn.Module], config) -> None:
    if isinstance(config, VQConfig):
        for name, module in targets.items():
            out_features, in_features = linear_weight(module).shape
            if in_features % config.dim or out_features % config.groups:
                raise ValueError(
                    f"{name!r} ({out_features}x{in_features}): VQ needs in_features divisible by dim={config.dim} "
                    f"and out_features by groups={config.groups}"
                )


@torch.no_grad()
def quantize_codebook(model: nn.Module, config: KMeansConfig | VQConfig, tokenizer=None) -> nn.Module:
    """Replace the target linears of `model` by `CodebookLinear` layers, in place; returns the model."""
    manifest = manifest_of(model)
    if manifest is not None and (manifest.modules or manifest.codebooks):
        raise ValueError("the model is already quantized")
    targets = codebook_targets(model, config)
    encoded: list[str] = []
    if config.dataset is not None:
        batches = calibration_data(model, config, tokenizer)
        names = {id(module): name for name, module in targets.items()}

        def encode(block, name, module, diagonal):
            set_submodule(block, name, encode_layer(module, config, diagonal))
            encoded.append(names[id(module)])

        for_each_block_hessian(
            model, None, batches, targets, encode, f"{config.method} blocks", diagonal=True,
            hessian_dtype=getattr(torch, config.hessian_dtype),
        )  # fmt: skip
    rest = [(n, m) for n, m in targets.items() if n not in set(encoded)]  # outside the blocks, or no data
    for name, module in tqdm(rest, desc=config.method, disable=not rest):
        set_submodule(model, name, encode_layer(module, config, None))
        encoded.append(name)
    attach_codebooks(model, config, encoded)
    return model


def codebook_record(layer: CodebookLinear) -> dict:
    """What the manifest keeps of a codebook layer (what rebuilds its shape)."""
    return {"bits": layer.bits, "dim": layer.dim, "books": layer.books}


def attach_codebooks(model: nn.Module, config, names: list[str]) -> None:
    """Record the codebook layers `names` of `model` in its manifest."""
    encoded = {name: codebook_record(model.get_submodule(name)) for name in names}
    update_manifest(
        model, config.method, codebooks=encoded, **({} if manifest_of(model) else {"recipe": config.to_dict()})
    )
