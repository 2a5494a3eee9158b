"""AWQ over a model's blocks: smooth every group of linears that share an input with activation-aware scales
(`awq.awq_scales`), folding `1/s` into the module that produced that input, then round to nearest.

Which module produced a group's input is found by the model's structure and checked, not looked up in a table
of families: the candidates are the modules called before the group that hold a per-channel weight of the
input's width (a norm) or output that width (a linear: `v_proj` before `o_proj`, `up_proj` before
`down_proj`); a candidate is taken only if folding random scales into it and the group leaves the block's output
unchanged on a calibration sample (exact folding: Gemma's `1 + weight` norms, a gate before an activation, a
grouped-query `v_proj` are refused by the check, and their groups are left unscaled, with a log line).

Smoothing changes no output, so every block is smoothed on the float model's activations (as llm-compressor's
`AWQModifier` does before its quantization); the smoothed model is then quantized as `RTNConfig` would.
"""

from __future__ import annotations

import logging
from dataclasses import fields

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..checkpoint import update_manifest
from ..core.calibration import collect_hessians
from ..core.capture import BlockInputs, capture_block_inputs, hidden_states_of, run_block
from ..core.precision import maths_for
from ..core.structure import LINEAR_TYPES, linear_weight, set_linear_weight
from ..core.trace import trace_block
from ..core.walk import block_prefixes, stacks_holding
from ..data import calibration_data
from .api import quantize_uniform, select_targets
from .awq import awq_clip, awq_scales, output_error_basis
from .config import GPTQConfig
from .grid import SCALE_TORCH_DTYPES

__all__ = ["quantize_awq", "smooth_block"]

logger = logging.getLogger(__name__)


def quantize_awq(model: nn.Module, config, tokenizer=None) -> nn.Module:
    """`AWQConfig`: smooth with activation-aware scales on the calibration data, then round to nearest (or GPTQ,
    `weights="gptq"`)."""
    if config.dataset is None:
        raise ValueError("AWQConfig needs calibration data: pass `dataset=` (texts, a text file or a dataset)")
    targets = select_targets(model, config)
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
    shared = {f.name: getattr(config, f.name) for f in fields(GPTQConfig) if f.init and hasattr(config, f.name)}
    quantize_uniform(model, GPTQConfig(**shared), tokenizer)
    update_manifest(model, method="awq", recipe=config.to_dict())  # the record names what ran: AWQ, then GPTQ
    return model


@torch.no_grad()
def smooth_block(block: nn.Module, prefix: str, inputs: list[BlockInputs], modules: dict[str, nn.Module], config):
    """Scale each group of `modules` (names relative to `block`) that shares an input whose producer folds
    exactly; returns {group leader: (producer, α)} for the groups with such a producer (α None: no scaling
    beat none, the weights were left as they were)."""
    trace = trace_block(block, prefix, [f"{prefix}.{n}" for n in modules], inputs[0])
    hessians = collect_hessians(block, prefix, inputs, list(modules), trace)
    named = dict(block.named_modules())
    scale_dtype = SCALE_TORCH_DTYPES[config.scale_dtype]
    done, applied = {}, {}
    reference = _output(block, inputs[0])  # folding exactly changes no output: one reference for the block
    for names in trace.groups:
        producer = _producer(block, named, trace, names, inputs[0], reference)
        if producer is None:
            logger.info("%s: no module folds the scales of %s exactly; left unscaled", prefix, names)
            continue
        weight = torch.cat([linear_weight(named[n]).detach() for n in names])
        H = hessians[names[0]]
        s, alpha = awq_scales(
            weight, H, config.bits, config.group_size, config.sym, config.n_grid, config.duo_scaling, scale_dtype,
            output_error_basis(H, generator=torch.Generator(device=H.device).manual_seed(0)),
        )  # fmt: skip
        if alpha is not None:
            _fold(named[producer], [named[n] for n in names], s)
            applied[names[0]] = s
        done[names[0]] = (producer, alpha)
    if config.clip and config.weights == "rtn":  # GPTQ spreads each rounding error itself; clamping first hurt it
        for names in trace.groups:  # on the scaled weights, whose input Hessian is D⁻¹ H D⁻¹
            H = hessians[names[0]]
            s = applied.get(names[0])
            H = H / s.unsqueeze(0) / s.unsqueeze(1) if s is not None else H
            for name in names:
                clipped = awq_clip(
                    linear_weight(named[name]), H, config.bits, config.group_size, config.sym, scale_dtype=scale_dtype
                )
                set_linear_weight(named[name], clipped)
    return done


def _producer(block, named: dict, trace, names: list[str], sample: BlockInputs, reference) -> str | None:
    """The module before the group `names` into which scales of its input fold exactly (checked against the
    block's output on `sample`, `reference`), if any."""
    group = [named[n] for n in names]
    width = linear_weight(group[0]).shape[1]
    start = min(trace.order.index(n) for n in names)
    candidates = [n for n in reversed(trace.order[:start]) if n not in names and _folds_into(named[n], width)]
    generator = torch.Generator().manual_seed(0)
    for name in candidates:
        s = torch.empty(width).uniform_(0.5, 2.0, generator=generator)
        saved = {id(p): p.detach().clone() for m in (named[name], *group) for p in m.parameters(recurse=False)}
        _fold(named[name], group, s)
        exact = torch.allclose(_output(block, sample), reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))
        for module in (named[name], *group):  # undone exactly: the saved copies go back
            for p in module.parameters(recurse=False):
                p.copy_(saved[id(p)])
        if exact:
            return name
    return None


def _folds_into(module: nn.Module, width: int) -> bool:
    """A norm with a per-channel weight of `width`, or a linear with `width` outputs."""
    if isinstance(module, LINEAR_TYPES):
        return linear_weight(module).shape[0] == width
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and weight.numel() == width


def _fold(producer: nn.Module, group: list[nn.Module], s: torch.Tensor) -> None:
    """`producer`'s output divided by `s` (its weight's rows, or its per-channel weight, and its bias), the
    group's input columns multiplied by `s`: the block computes the same."""
    if isinstance(producer, LINEAR_TYPES):
        set_linear_weight(producer, linear_weight(producer) / s.to(producer.weight.dtype).unsqueeze(1))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    bias = getattr(producer, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.div_(s.to(bias.dtype))
    for module in group:
        set_linear_weight(module, linear_weight(module) * s.to(module.weight.dtype))


def _output(block: nn.Module, sample: BlockInputs) -> torch.Tensor:
    with maths_for(block):
        return hidden_states_of(block(*sample.args, **sample.kwargs)).float()
