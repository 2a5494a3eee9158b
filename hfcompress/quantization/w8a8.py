"""W8A8 over a model: SmoothQuant's scales measured block by block on the calibration data and folded into the
modules that produced each group's input (`core.folding`), the weights rounded to int8 per output channel
(GPTQ or round to nearest), then every quantized linear turned into an `Int8Linear`, which also quantizes its
input per token at run time."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..checkpoint import update_manifest
from ..core.capture import capture_block_inputs, run_block
from ..core.distributed import reduce_max
from ..core.folding import find_producer, fold_scales
from ..core.structure import linear_weight, set_submodule
from ..core.trace import trace_block
from ..core.walk import block_prefixes, stacks_holding
from ..data import calibration_data
from .api import quantize_uniform, select_targets
from .config import W8A8Config
from .int8_linear import Int8Linear
from .modules import QuantLinear
from .smoothquant import smoothquant_scales

__all__ = ["ACTIVATIONS", "quantize_w8a8", "smooth_block", "smooth_model"]

logger = logging.getLogger(__name__)

# what the manifest records of the activations: int8, one scale per token computed at run time, symmetric
ACTIVATIONS = {"bits": 8, "strategy": "token", "dynamic": True, "sym": True}


def quantize_w8a8(model: nn.Module, config: W8A8Config, tokenizer=None) -> nn.Module:
    """`W8A8Config`: SmoothQuant (unless `smoothquant=0`), int8 weights, int8 per-token activations, in place."""
    if config.dataset is None:
        raise ValueError("W8A8Config needs calibration data: pass `dataset=` (texts, a text file or a dataset)")
    if config.smoothquant > 0:
        smooth_model(model, config, tokenizer)
    quantize_uniform(model, config.weight_config(), tokenizer)
    for name, module in list(model.named_modules()):
        if type(module) is QuantLinear:
            set_submodule(model, name, Int8Linear.from_quant_linear(module))
    update_manifest(model, method="w8a8", recipe=config.to_dict(), activations=dict(ACTIVATIONS))
    return model


@torch.no_grad()
def smooth_model(model: nn.Module, config: W8A8Config, tokenizer=None) -> dict[str, str]:
    """Fold SmoothQuant scales (strength `config.smoothquant`) into every group of target linears sharing an
    input whose producer folds exactly; returns {group leader: producer}. The model computes the same after."""
    targets = select_targets(model, config)
    batches = calibration_data(model, config, tokenizer)
    was_training = model.training
    model.eval()
    smoothed: dict[str, str] = {}
    for _, blocks in stacks_holding(model, targets):
        inputs = capture_block_inputs(model, blocks[0], batches)
        for block, prefix in zip(tqdm(blocks, desc="SmoothQuant blocks"), block_prefixes(model, blocks), strict=True):
            names = [n[len(prefix) + 1 :] for n in targets if n.startswith(prefix + ".")]
            inputs, done = smooth_block(block, prefix, inputs, names, config)
            smoothed.update(done)
    model.train(was_training)
    logger.info("SmoothQuant (α=%s) scaled %d groups of linears", config.smoothquant, len(smoothed))
    return smoothed


@torch.no_grad()
def smooth_block(block: nn.Module, prefix: str, inputs, names: list[str], config: W8A8Config, into=None):
    """Fold SmoothQuant scales into the groups of `names` (relative to `block`) whose producer folds exactly, the
    input ranges measured while the block runs on `inputs`. Returns the block's outputs (appended to `into`, as
    `run_block` does), which smoothing does not change, and {group leader: producer} by full name."""
    if not names:
        return run_block(block, inputs, into=into), {}
    trace = trace_block(block, prefix, [f"{prefix}.{n}" for n in names], inputs[0])
    named = dict(block.named_modules())
    producers = {group[0]: find_producer(block, named, trace.order, group, inputs[0]) for group in trace.groups}
    leaders = [leader for leader, producer in producers.items() if producer is not None]
    with _input_ranges(named, leaders) as ranges:
        outputs = run_block(block, inputs, into=into)
    # across processes, the largest of every rank's: the one process's ranges exactly
    ranges = reduce_max(ranges, {leader: linear_weight(named[leader]).shape[1] for leader in leaders})
    smoothed = {}
    for group in trace.groups:
        producer = producers[group[0]]
        if producer is None:
            logger.info("%s: no module folds the scales of %s exactly; left unscaled", prefix, group)
            continue
        if group[0] not in ranges:  # an expert no calibration token reached
            continue
        weight = torch.cat([linear_weight(named[n]).detach() for n in group])
        s = smoothquant_scales(ranges[group[0]], weight, config.smoothquant)
        fold_scales(named[producer], [named[n] for n in group], s)
        smoothed[f"{prefix}.{group[0]}"] = f"{prefix}.{producer}"
    return outputs, smoothed


@contextlib.contextmanager
def _input_ranges(named: dict, leaders: list[str]):
    """Within the block, the largest absolute value each input channel of each of `leaders` takes, gathered
    into the dict it yields."""
    ranges: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_, args):
            peak = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            ranges[name] = peak if name not in ranges else torch.maximum(ranges[name], peak)

        return record

    handles = [named[name].register_forward_pre_hook(hook(name)) for name in leaders]
    try:
        yield ranges
    finally:
        for handle in handles:
            handle.remove()
