"""AWQ over a model's blocks: smooth every group of linears that share an input with activation-aware scales
(searched by the output of the module holding the group, `awq_outputs`, or by each linear's output error through
its input Hessian, `awq.awq_scales`), folding `1/s` into the module that produced that input (found and checked by
`core.folding`; groups without an exact producer are left unscaled, with a log line), then round to nearest.

Smoothing changes no output, so every block is smoothed on the float model's activations (as llm-compressor's
`AWQModifier` does before its quantization); the smoothed model is then quantized as `RTNConfig` would.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..checkpoint import update_manifest
from ..core.calibration import collect_input_statistics
from ..core.capture import BlockInputs, capture_block_inputs, run_block
from ..core.folding import find_producer, fold_scales
from ..core.structure import linear_weight, set_linear_weight
from ..core.tensor_file import SpilledTensor
from ..core.trace import trace_block
from ..core.walk import block_prefixes, stacks_holding
from ..data import calibration_data
from .api import quantize_uniform, select_targets
from .awq import awq_clip, awq_scales, best_scales, output_error_basis, weight_magnitude
from .awq_outputs import ModuleCalls, holding_module, search_batches
from .grid import SCALE_TORCH_DTYPES
from .plan import group_for, plan_layers

__all__ = ["quantize_awq", "smooth_block"]

logger = logging.getLogger(__name__)


def quantize_awq(model: nn.Module, config, tokenizer=None) -> nn.Module:
    """`AWQConfig`: smooth with activation-aware scales on the calibration data, then round to nearest (or GPTQ,
    `weights="gptq"`)."""
    if config.dataset is None:
        raise ValueError("AWQConfig needs calibration data: pass `dataset=` (texts, a text file or a dataset)")
    targets = select_targets(model, config)
    plan_layers(model, targets, config)  # a group size some layer cannot take fails before any search
    batches = calibration_data(model, config, tokenizer)
    was_training = model.training
    model.eval()
    smoothed = 0
    for _, blocks in stacks_holding(model, targets):
        inputs = capture_block_inputs(model, blocks[0], batches)
        for block, prefix in zip(tqdm(blocks, desc="AWQ blocks"), block_prefixes(model, blocks), strict=True):
            modules = {n[len(prefix) + 1 :]: m for n, m in targets.items() if n.startswith(prefix + ".")}
            if modules:
                found = smooth_block(block, prefix, inputs, modules, config)
                smoothed += sum(alpha is not None for _, alpha in found.values())
            inputs = run_block(block, inputs)
    model.train(was_training)
    logger.info("AWQ scaled %d groups of linears", smoothed)
    if config.weights == "rtn":
        return quantize_uniform(model, config, tokenizer)
    quantize_uniform(model, config.gptq_config(), tokenizer)
    update_manifest(model, method="awq", recipe=config.to_dict())  # the record names what ran: AWQ, then GPTQ
    return model


@torch.no_grad()
def smooth_block(block: nn.Module, prefix: str, inputs: list[BlockInputs], modules: dict[str, nn.Module], config):
    """Scale each group of `modules` (names relative to `block`) that shares an input whose producer folds
    exactly; returns {group leader: (producer, α)} for the groups with such a producer (α None: no scaling
    beat none, the weights were left as they were)."""
    trace = trace_block(block, prefix, [f"{prefix}.{n}" for n in modules], inputs[0])
    statistics = collect_input_statistics(
        block, prefix, inputs, list(modules), trace, hessian_dtype=getattr(torch, config.hessian_dtype)
    )
    # each group's Hessian waits in a temporary file until its group is solved, not held through the other
    # groups' fold checks and scale searches (an MLP's down projection's alone is 0.46 GB for 11008 inputs)
    hessians = {}
    for names in trace.groups:  # one Hessian per group, under its leader's name
        statistic = statistics[names[0]]
        hessians[names[0]], statistic.H = SpilledTensor(statistic.H), None
    named = dict(block.named_modules())
    scale_dtype = SCALE_TORCH_DTYPES[config.scale_dtype]
    done, applied = {}, {}
    mean_abs = config.statistic() == "mean_abs"
    by_outputs = config.objective() == "module"
    if by_outputs:  # chosen before any scale is folded: the block's own inputs never change
        batches, places = search_batches(inputs, config.search_samples)
    for names in trace.groups:
        producer = find_producer(block, named, trace.order, names, inputs[0])
        if producer is None:
            logger.info("%s: no module folds the scales of %s exactly; left unscaled", prefix, names)
            continue
        weight = torch.cat([linear_weight(named[n]).detach() for n in names])
        group_size = group_for(weight.shape[1], config.group_size)  # a factor's rank: one group per row
        by_module = by_outputs and len(names) > 1  # a single linear's output error is exactly the Hessian's
        H = None if by_module and mean_abs else hessians[names[0]].load()  # not read back where nothing needs it
        activation = statistics[names[0]].abs_mean if mean_abs else H.diagonal().float().clamp(min=0).sqrt()
        if by_module:
            del H
            holder = holding_module(names)
            calls = ModuleCalls(block, named[holder] if holder else block, batches, places)
            error = functools.partial(
                calls.rounded_error, [named[n] for n in names],
                bits=config.bits, group_size=group_size, sym=config.sym, scale_dtype=scale_dtype,
            )  # fmt: skip
            magnitude = weight_magnitude(weight, group_size)
            s, alpha = best_scales(activation, magnitude, config.n_grid, config.duo_scaling, error)
            del calls, error  # the recorded calls are not held through the next group
        else:
            # the basis is factorized in H's memory: clipping reads H again from its file
            basis = output_error_basis(H, generator=torch.Generator(device=H.device).manual_seed(0), overwrite=True)
            del H
            s, alpha = awq_scales(
                weight, None, config.bits, group_size, config.sym, config.n_grid, config.duo_scaling,
                scale_dtype, basis, activation,
            )  # fmt: skip
            del basis
        del weight  # not held through the next group's fold check
        if alpha is not None:
            fold_scales(named[producer], [named[n] for n in names], s)
            applied[names[0]] = s
        done[names[0]] = (producer, alpha)
    if config.clips():  # not with GPTQ weights: GPTQ spreads each rounding error itself; clamping first hurt it
        for names in trace.groups:  # on the scaled weights, whose input Hessian is D⁻¹ H D⁻¹
            H = hessians[names[0]].load()
            s = applied.get(names[0])
            if s is not None:
                H.div_(s.unsqueeze(0)).div_(s.unsqueeze(1))
            for name in names:
                weight = linear_weight(named[name])
                group_size = group_for(weight.shape[1], config.group_size)
                clipped = awq_clip(weight, H, config.bits, group_size, config.sym, scale_dtype=scale_dtype)
                set_linear_weight(named[name], clipped)
            del H
    for spilled in hessians.values():
        spilled.close()
    return done
