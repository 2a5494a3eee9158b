"""`factorize(model, config)`: replace linear layers by `FactorizedLinear`, in place.

Methods that need activations (asvd, whiten) calibrate block by block with the GPTQ driver's machinery:
the first block's inputs are captured once, each block's input Gram matrices are collected on them, its
layers are factorized, and the block's outputs (from the factorized block when `sequential`) become the
next block's inputs. With a `param_ratio` budget and sensitivity allocation, a first full-precision pass
measures how much the calibration loss rises when each layer alone is truncated, and the ranks are then
chosen to spend the budget where it costs least.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..checkpoint import manifest_of, update_manifest
from ..core.calibration import collect_hessians
from ..core.capture import capture_block_inputs, run_block
from ..core.structure import candidate_linears, find_layer_stack, linear_weight, set_submodule
from ..data import calibration_data
from .allocation import allocate_ranks, uniform_ranks
from .config import LowRankConfig
from .modules import FactorizedLinear
from .sensitivity import load_or_measure_sensitivity
from .svd import Decomposition, decompose, max_saving_rank, rank_for_energy

__all__ = [
    "attach_lowrank_config",
    "factorization_record",
    "factorize",
    "final_rank",
    "planned_ranks",
    "refuse_compressed",
    "replace_with_factors",
    "select_lowrank_targets",
]

logger = logging.getLogger(__name__)


def select_lowrank_targets(model: nn.Module, config: LowRankConfig) -> dict[str, nn.Module]:
    """The linear layers `config` may factorize, checked against a fixed `rank` before any work starts."""
    # a weight tied to an embedding cannot be replaced by factors without untying it: left alone
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    targets = {
        name: module
        for name, module in candidate_linears(model, config.modules_to_not_convert).items()
        if id(module.weight) not in embedding_weights
    }
    if not targets:
        raise ValueError(
            f"no linear layers to factorize in {type(model).__name__} (excluded: {config.modules_to_not_convert})"
        )
    if config.rank is not None:
        for name, module in targets.items():
            out_features, in_features = linear_weight(module).shape
            if config.rank >= min(out_features, in_features):
                raise ValueError(
                    f"`rank` {config.rank} is not below min(out, in) = {min(out_features, in_features)} of {name!r} "
                    f"({out_features}x{in_features}); a factorization of that rank cannot be smaller"
                )
    return targets


def refuse_compressed(model: nn.Module) -> None:
    """Factorization reads dense weights: a model already quantized, factorized or stored sparse is refused."""
    manifest = manifest_of(model)
    if manifest is not None and (manifest.modules or manifest.codebooks or manifest.lowrank or manifest.sparse):
        raise ValueError(
            "the model is already quantized or factorized (or stored sparse); factorize the original (or dense pruned) "
            "model instead"
        )


def factorize(model: nn.Module, config: LowRankConfig, tokenizer=None) -> nn.Module:
    """Factorize the linear layers of `model` in place and return it, ready for `save_pretrained`.

    `config.dataset` (needed by asvd, whiten and sensitivity allocation) is a list of strings, a text file, a
    `datasets` folder, a Hub dataset name or a tensor of token ids [n, seq_len]; text is tokenized with
    `tokenizer`, or the one saved with the model.
    """
    if not isinstance(config, LowRankConfig):
        raise TypeError(f"`config` must be an hfcompress LowRankConfig, got {type(config).__name__}")
    refuse_compressed(model)
    targets = select_lowrank_targets(model, config)
    shapes = {name: tuple(linear_weight(m).shape) for name, m in targets.items()}

    was_training = model.training
    model.eval()
    try:
        if config.needs_data:
            ranks = _factorize_calibrated(model, targets, shapes, config, tokenizer)
        else:
            ranks = _factorize_plain(model, targets, shapes, config)
    finally:
        model.train(was_training)
    if not ranks:
        logger.warning("no layer was factorized: at the requested target none would hold fewer parameters")
    attach_lowrank_config(model, config, ranks)
    kept = sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items()) + sum(
        o * i for n, (o, i) in shapes.items() if n not in ranks
    )
    logger.info(
        "factorized %d of %d layers: %.1f%% of their parameters kept",
        len(ranks),
        len(targets),
        100 * kept / sum(o * i for o, i in shapes.values()),
    )
    return model


def _factorize_plain(model, targets, shapes, config: LowRankConfig) -> dict[str, int]:
    planned = planned_ranks(shapes, config)
    done = {}
    for name, module in tqdm(targets.items(), desc="SVD"):
        if name in planned and planned[name] is None:
            continue
        decomposition = decompose(linear_weight(module), "svd")
        rank = final_rank(name, decomposition, shapes[name], planned, config)
        if rank is not None:
            replace_with_factors(model, name, module, decomposition, rank)
            done[name] = rank
    return done


def _factorize_calibrated(model, targets, shapes, config: LowRankConfig, tokenizer) -> dict[str, int]:
    prefix_of_stack, blocks = find_layer_stack(model)
    outside = [n for n in targets if not n.startswith(prefix_of_stack + ".")]
    if outside:
        logger.warning(
            "%d layers outside the block stack have no calibration statistics and stay dense: %s",
            len(outside),
            outside,
        )
        targets = {n: m for n, m in targets.items() if n not in outside}
        shapes = {n: s for n, s in shapes.items() if n not in outside}
    if config.dataset is None:
        reason = f"method {config.method!r}" if config.method != "svd" else "sensitivity allocation"
        raise ValueError(f"{reason} needs calibration data: pass `dataset=` (texts, a text file or a dataset)")
    batches = calibration_data(model, config, tokenizer)

    if config.param_ratio is not None and config.allocation == "sensitivity":
        curves = load_or_measure_sensitivity(model, blocks, targets, batches, config)
        budget = config.param_ratio * sum(o * i for o, i in shapes.values())
        planned = allocate_ranks(curves, budget)
    else:
        planned = planned_ranks(shapes, config)

    block_names = {id(module): name for name, module in model.named_modules()}
    inputs = capture_block_inputs(model, blocks[0], batches)
    done = {}
    for block in tqdm(blocks, desc=f"factorize ({config.method})"):
        prefix = block_names[id(block)]
        modules = {n[len(prefix) + 1 :]: m for n, m in targets.items() if n.startswith(prefix + ".")}
        modules = {n: m for n, m in modules.items() if planned.get(f"{prefix}.{n}", 0) is not None}
        if not modules:
            inputs = run_block(block, inputs)
            continue
        grams = collect_hessians(
            block, prefix, inputs, list(modules), hessian_dtype=getattr(torch, config.hessian_dtype)
        )
        if not config.sequential:
            inputs = run_block(block, inputs)
        for name, module in modules.items():
            full_name = f"{prefix}.{name}"
            decomposition = decompose(
                linear_weight(module),
                config.method,
                grams[name],
                config.alpha,
                config.damp_percent,
                planned.get(full_name),  # a rank known already: only its vectors are kept
            )
            rank = final_rank(full_name, decomposition, shapes[full_name], planned, config)
            if rank is not None:
                replace_with_factors(block, name, module, decomposition, rank)
                done[full_name] = rank
            del decomposition  # not held through the next layer's (a whitener alone is 0.13 GB at 4096 inputs)
        del grams
        if config.sequential:
            inputs = run_block(block, inputs)
    return done


def planned_ranks(shapes: dict[str, tuple[int, int]], config: LowRankConfig) -> dict[str, int | None]:
    """Ranks known before any SVD: from `param_ratio` (uniform) or `rank`; energy targets are decided later."""
    if config.param_ratio is not None:
        return uniform_ranks(shapes, config.param_ratio)
    if config.rank is not None:
        planned = {}
        for name, (out_features, in_features) in shapes.items():
            saves = config.rank <= max_saving_rank(out_features, in_features)
            if not saves:
                logger.info(
                    "%s stays dense: rank %d factors would not be smaller than its %dx%d weight",
                    name,
                    config.rank,
                    out_features,
                    in_features,
                )
            planned[name] = config.rank if saves else None
        return planned
    return {}


def final_rank(
    name: str,
    decomposition: Decomposition,
    shape: tuple[int, int],
    planned: dict,
    config: LowRankConfig,
) -> int | None:
    if name in planned:
        return planned[name]
    rank = rank_for_energy(decomposition.S, config.energy)
    if rank > max_saving_rank(*shape):
        logger.info(
            "%s stays dense: keeping %.3g of its energy needs rank %d",
            name,
            config.energy,
            rank,
        )
        return None
    return rank


def replace_with_factors(
    root: nn.Module,
    name: str,
    module: nn.Module,
    decomposition: Decomposition,
    rank: int,
) -> None:
    up, down = decomposition.factors(rank, linear_weight(module).dtype)
    bias = module.bias.detach() if module.bias is not None else None
    layer = FactorizedLinear.from_factors(up, down, bias)
    set_submodule(root, name, layer)


def attach_lowrank_config(model: nn.Module, config: LowRankConfig, ranks: dict[str, int]) -> None:
    update_manifest(model, "none", lowrank=dict(ranks), lowrank_recipe=config.to_dict())


def factorization_record(model: nn.Module, config: LowRankConfig) -> dict:
    """What the compression record keeps of a factorization: the rank of each factorized layer."""
    return {"ranks": dict(manifest_of(model).lowrank)}
