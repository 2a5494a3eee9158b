"""`quantize(model, config)`: the verb that turns a transformers model into a quantized one in place."""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..checkpoint import HfcompressQuantizationConfig, manifest_of, update_manifest
from ..core.experts import expert_tokens
from ..core.registry import stored_tensors, technique_for
from ..core.structure import candidate_linears, find_layer_stack, is_plain_linear, linear_weight, set_submodule
from ..core.walk import stacks_holding
from ..data import calibration_data
from ..pruning.sparse import SparseLinear, decompress_sparse
from .compensated_linear import attach_corrections, compensation_plan
from .config import GPTQConfig, RTNConfig
from .decode_linear import use_decode_loop
from .gptq_blocks import quantize_blocks
from .grid import SCALE_TORCH_DTYPES, rtn_quantize
from .layers import quantized_layer
from .plan import LayerPlan, plan_layers

__all__ = [
    "attach_quantization_config",
    "quantize",
    "quantize_uniform",
    "quantized_layer",
    "select_targets",
    "stores_g_idx",
]

logger = logging.getLogger(__name__)


def select_targets(model: nn.Module, config: RTNConfig) -> dict[str, nn.Module]:
    """The linear layers `config` quantizes (the factors of factorized layers included)."""
    targets = candidate_linears(model, config.modules_to_not_convert)
    if not targets:
        raise ValueError(
            f"no linear layers to quantize in {type(model).__name__} (excluded: {config.modules_to_not_convert})"
            + bitmask_hint(model)
        )
    tied = _tied_weights(model, targets)
    if tied:
        raise ValueError(
            f"cannot quantize {tied}: the weight is tied to an embedding; add it to modules_to_not_convert"
        )
    return targets


def bitmask_hint(model: nn.Module) -> str:
    """What to do when a model's linears are all stored as bitmask + values (a model pruned with `--storage
    bitmask`), which only GPTQ and round-to-nearest read dense; "" otherwise."""
    stored = sum(isinstance(m, SparseLinear) for m in model.modules())
    if not stored:
        return ""
    return (
        f": its {stored} pruned linears are stored as bitmask + values (pruned with --storage bitmask), which only "
        "gptq and rtn quantize (zeros kept); prune with --storage dense to use this method"
    )


def _tied_weights(model: nn.Module, targets: dict[str, nn.Module]) -> list[str]:
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [name for name, m in targets.items() if id(m.weight) in embedding_weights]


def quantize(model: nn.Module, config, tokenizer=None) -> nn.Module:
    """Quantize the linear layers of `model` in place and return it, ready for `save_pretrained`.

    `config` is the config of a registered quantization technique: `RTNConfig` (no data), `GPTQConfig`, whose
    `dataset` is a list of strings, a text file, a `datasets` folder, a Hub dataset name or a tensor of token ids
    [n, seq_len], `KMeansConfig` / `VQConfig`, or one registered with `register_technique(kind="quantize")`.
    What was quantized and what was left out (with the reason) is logged; a model where more than a quarter of
    the linear-like weights stay in full precision for no chosen reason is refused unless `allow_partial=True`.
    Text needs `tokenizer`; without one it is loaded from `model.name_or_path`. A `BnbConfig` returns a new,
    bitsandbytes-quantized model (bitsandbytes quantizes while loading) and leaves `model` as it was.
    In a model quantized by hfcompress, the output layer, where it stays a plain `nn.Linear`, decodes through
    hfcompress's dense loop (`decode_linear.DecodeLinear`), as it does when the checkpoint is loaded again.
    """
    quantized = technique_for(config, kind="quantize").run(model, config, tokenizer)
    if isinstance(getattr(quantized.config, "quantization_config", None), HfcompressQuantizationConfig):
        use_decode_loop(quantized, output_layer_only=True)
    return quantized


def quantize_uniform(model: nn.Module, config: RTNConfig, tokenizer=None) -> nn.Module:
    """Round-to-nearest (`RTNConfig`) or GPTQ (`GPTQConfig`) onto uniform integer grids, in place."""
    previous = _combinable_config(model)
    sparse_config = dict(previous.sparse) if previous is not None else {}
    sparse_before = _densify_sparse_layers(model)
    try:
        if isinstance(config, GPTQConfig):
            find_layer_stack(model)  # a model without blocks is refused first, naming what was looked for
        targets = select_targets(model, config)
        stacks = stacks_holding(model, targets) if isinstance(config, GPTQConfig) else []
        plans = plan_layers(model, targets, config)
    except Exception:  # refused before any work: the model goes back to how it was
        _recompress_untouched(model, sparse_before)
        if previous is not None:
            previous.sparse = sparse_config
        raise
    scale_dtype = SCALE_TORCH_DTYPES[config.scale_dtype]

    compensated: dict[str, int] = {}
    if isinstance(config, GPTQConfig):
        batches = _calibration_batches(model, config, tokenizer)
        was_training = model.training
        model.eval()
        rows: dict[str, int] = {}
        done: set[str] = set()
        errors, ranks, budget = compensation_plan(config, targets)
        for _, blocks in stacks:  # an encoder-decoder's decoder calibrates on the quantized encoder's outputs
            done |= quantize_blocks(
                model, blocks, batches, targets, config, scale_dtype, plans, rows=rows, errors=errors, max_ranks=ranks
            )
        if errors is not None:
            compensated = attach_corrections(model, errors, budget, scale_dtype)
        model.hfcompress_expert_tokens = expert_tokens(model, rows)
        model.train(was_training)
        remaining = {n: m for n, m in targets.items() if n not in done}
    else:
        remaining = targets
    if remaining and isinstance(config, GPTQConfig):
        logger.warning(
            "%d layers outside the block stack are quantized with round-to-nearest: %s", len(remaining), list(remaining)
        )
    for name, module in tqdm(remaining.items(), desc="round-to-nearest", disable=not remaining):
        replace_with_rtn(model, name, module, config, scale_dtype, plans[name])
    _recompress_untouched(model, sparse_before)

    attach_quantization_config(model, config, plans, sorted({type(m).__name__ for m in targets.values()}), compensated)
    return model


def _combinable_config(model: nn.Module) -> HfcompressQuantizationConfig | None:
    """The hfcompress manifest of a factorized, pruned or resized model, which quantization extends; refuses a
    model whose weights are already quantized."""
    try:
        manifest = manifest_of(model)
    except ValueError as e:
        raise ValueError(f"{e}; quantize the full-precision model instead") from None
    if manifest is not None and (manifest.modules or manifest.codebooks):
        raise ValueError(
            f"the model is already quantized ({manifest.method}, {len(manifest.modules) + len(manifest.codebooks)} "
            "layers); quantize the full-precision model instead"
        )
    return manifest


def extend_read_manifest(model: nn.Module) -> None:
    """For a skeleton whose bitmask layers are read dense (`ShardedCheckpoint.skeleton(dense_bitmask=True)`): the
    manifest its config holds as `AutoConfig` read it (a dict) becomes the manifest quantization extends, its
    bitmask layers dropped, as `quantize_uniform` leaves it in memory; an already quantized model is refused."""
    qconfig = getattr(model.config, "quantization_config", None)
    if isinstance(qconfig, dict) and qconfig.get("quant_method") == "hfcompress":
        manifest = HfcompressQuantizationConfig.from_dict(qconfig)
        manifest.sparse = {}
        model.config.quantization_config = manifest
    _combinable_config(model)


def _densify_sparse_layers(model: nn.Module) -> set[str]:
    """Bitmask-stored layers become plain linears (zeros included) so they can be quantized; their names."""
    names = {name for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    if names:
        decompress_sparse(model)
    return names


def _recompress_untouched(model: nn.Module, names: set[str]) -> None:
    """Layers that were bitmask-stored and stayed in full precision go back to bitmask storage."""
    for name in names:
        module = model.get_submodule(name)
        if is_plain_linear(module):
            set_submodule(model, name, SparseLinear.from_linear(module))


def replace_with_rtn(
    model: nn.Module, name: str, module: nn.Module, config: RTNConfig, scale_dtype, plan: LayerPlan
) -> None:
    weight = linear_weight(module).detach()
    quantized = rtn_quantize(
        weight, plan.bits, plan.group_size, config.sym, config.searches_clip(plan.bits), plan.mask, scale_dtype
    )
    # every layer of a checkpoint has the same buffers: with act-order, a (trivial) g_idx too
    layer = quantized_layer(quantized, plan, config.sym, stores_g_idx(config), module.bias, scale_dtype)
    set_submodule(model, name, layer)


def stores_g_idx(config: RTNConfig) -> bool:
    """Whether the layers `config` writes store each column's group (act-order without static groups)."""
    return bool(getattr(config, "act_order", False) and not getattr(config, "static_groups", False))


def _calibration_batches(model, config: GPTQConfig, tokenizer) -> list[torch.Tensor]:
    if config.dataset is None:
        raise ValueError("GPTQConfig needs calibration data: pass `dataset=` (texts, a text file or a dataset)")
    return calibration_data(model, config, tokenizer)


def attach_quantization_config(
    model: nn.Module,
    config: RTNConfig,
    plans: dict[str, LayerPlan],
    layer_types: list[str],
    compensated: dict[str, int] | None = None,
) -> None:
    """Record the quantization in the model's manifest; a layer in `compensated` ({name: rank}) holds its
    quantized weight at `<name>.base` (`CompensatedLinear`)."""
    compensated = compensated or {}
    stored = {name: f"{name}.base" if name in compensated else name for name in plans}
    overrides = {
        stored[name]: {"bits": plan.bits, "group_size": plan.group_size}
        for name, plan in plans.items()
        if (plan.bits, plan.group_size) != (config.bits, config.group_size)
    }
    # every layer stored as a bitmask (SparseLinear, SparseQuantLinear) with its non-zeros
    sparse = {name: m.nnz for name, m in model.named_modules() if hasattr(m, "nnz") and stored_tensors(m)}
    update_manifest(
        model,
        config.method,
        bits=config.bits,
        group_size=config.group_size,
        sym=config.sym,
        act_order=stores_g_idx(config),
        modules=list(stored.values()),
        layer_types=layer_types,
        scale_dtype=config.scale_dtype,
        method=config.method,
        recipe=config.to_dict(),
        overrides=overrides,
        sparse=sparse,
        compensation=compensated,
    )
