"""Several GPTQ runs in one walk over the blocks, and quantized models assembled from their per-layer results.

Each run is a calibration stream (`core.walk.calibrate_streams`) with its own width per layer: a stream
with `b` bits everywhere gives exactly what `quantize(model, GPTQConfig(bits=b))` gives, a stream with mixed
widths what `layer_bits` would. For every layer the stream also measures the mean squared error of each output
channel on its calibration inputs, `e_r = (ΔW H ΔWᵀ)_rr / 2`, which `recipes.sensitivity.fisher_scores` turns
into a sensitivity.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..core.structure import find_layer_stack, linear_weight, set_submodule
from ..core.tensor_file import SpilledTensor
from ..core.walk import calibrate_streams
from ..data import calibration_data
from .api import attach_quantization_config, select_targets
from .config import GPTQConfig
from .gptq_blocks import float32_rows, quantize_group
from .grid import SCALE_TORCH_DTYPES, QuantizedWeight, rtn_quantize
from .layers import quantized_layer
from .plan import LayerPlan, plan_layers, split_layer_bits

__all__ = ["LayerResult", "assemble", "output_errors", "quantize_streams"]

logger = logging.getLogger(__name__)


@dataclass
class LayerResult:
    """One layer quantized at one width: its codes and grid (None when they were not kept), and the mean squared
    error of each output channel over the calibration tokens it was quantized on (None outside the block stack:
    no Hessian there)."""

    quantized: QuantizedWeight | None
    plan: LayerPlan
    row_error: torch.Tensor | None


def output_errors(
    weight: torch.Tensor, quantized: torch.Tensor | Callable[[int, int], torch.Tensor], H: torch.Tensor
) -> torch.Tensor:
    """Mean squared output error per output channel, `diag(ΔW H ΔWᵀ) / 2` with `H = 2 XᵀX / n`: what replacing
    `weight` [out, in] by `quantized` changes the layer's outputs by, on average over the tokens of `H`.
    `quantized` is the [out, in] weight, or what makes its rows `start:stop` (a `QuantizedWeight`'s dequantization)."""
    H = H.float()
    errors = []
    for start in range(0, weight.shape[0], _ERROR_ROWS):  # a block of rows at a time: no weight-sized temporaries
        stop = start + _ERROR_ROWS
        rows = quantized(start, min(stop, weight.shape[0])) if callable(quantized) else quantized[start:stop]
        delta = weight[start:stop].detach().float() - rows.float()
        errors.append(((delta @ H) * delta).sum(dim=1) / 2)
    return torch.cat(errors)


_ERROR_ROWS = 512


@torch.no_grad()
def quantize_streams(
    model: nn.Module,
    config: GPTQConfig,
    streams: dict[str, dict[str, int]],
    tokenizer=None,
    batches=None,
    disk=None,
    inputs=None,
    spill=None,
    keep_codes: bool = True,
) -> dict[str, dict[str, LayerResult]]:
    """`{stream: {layer: LayerResult}}`: for each stream, every target of `config` quantized with GPTQ at the
    width `streams[stream][layer]` (the other settings from `config`), each stream calibrated on its own
    activations as `quantize` would be with those widths, all in one walk over the blocks; the model's weights
    are left as they were. Layers outside the block stack get round-to-nearest, as `quantize` gives them.
    `batches` (token ids) replaces `config.dataset` when given.

    For a model skeleton streamed from its checkpoint: `disk` onloads and frees each block
    (`core.block_stream.ReadingStream`), `inputs` are the first block's inputs and `spill` the folder the
    activations are kept in (as `core.walk.calibrate_streams` takes them); each block's layers are planned once
    it is onloaded (sparsity masks), and the layers outside the stack are left out. Without `keep_codes`, each
    result keeps its output errors only (`quantized` is None): the codes of every layer at every width would be
    several copies of the model."""
    if config.layer_bits:
        raise ValueError(
            "quantize_streams takes the widths per layer from `streams`: pass a config without `layer_bits`"
        )
    blocks = find_layer_stack(model)[1]
    targets = select_targets(model, config)
    widths = sorted({b for layer_bits in streams.values() for b in layer_bits.values()})
    by_width = {b: plan_layers(model, targets, dataclasses.replace(config, bits=b)) for b in widths}
    plans = {}
    for stream, layer_bits in streams.items():
        missing = sorted(set(targets) - set(layer_bits))
        if missing:
            raise ValueError(f"stream {stream!r} gives no width for {missing}")
        plans[stream] = {name: by_width[layer_bits[name]][name] for name in targets}
    scale_dtype = SCALE_TORCH_DTYPES[config.scale_dtype]
    batches = batches if batches is not None else calibration_data(model, config, tokenizer)
    results: dict[str, dict[str, LayerResult]] = {stream: {} for stream in streams}

    onloaded: set[tuple[str, int]] = set()  # (layer, width) planned again once its weights were read

    def make_solver(stream, block, prefix, modules):
        if disk is not None:  # the weights were on the meta device when planned: plan them again, onloaded
            for n, module in modules.items():
                name, bits = f"{prefix}.{n}", streams[stream][f"{prefix}.{n}"]
                if (name, bits) not in onloaded:
                    by_width[bits].update(plan_layers(model, {name: module}, dataclasses.replace(config, bits=bits)))
                    onloaded.add((name, bits))
                plans[stream][name] = by_width[bits][name]
        block_plans = {n: plans[stream][f"{prefix}.{n}"] for n in modules}

        def solve(names, H):
            weights = {n: linear_weight(modules[n]).detach().clone() for n in names}  # as stored
            if disk is None:
                quantized = quantize_group(names, modules, H, config, scale_dtype, block_plans)
            else:  # as a streamed GPTQ run: the solve works in H's memory (485 MB for a down projection of 11008
                # inputs), H read back from a temporary file for the errors, and the rest of the block runs on the
                # codes (`core.deferred`), its float weights read again from disk for the next stream
                with SpilledTensor(H) as saved:
                    quantized = quantize_group(
                        names, modules, H, config, scale_dtype, block_plans, overwrite_hessian=True, defer=True
                    )
                    saved.load(out=H)
            for name, q in quantized.items():
                # its rows made a block at a time: no float32 copy of the layer
                error = output_errors(weights[name], functools.partial(float32_rows, q), H)
                results[stream][f"{prefix}.{name}"] = LayerResult(q if keep_codes else None, block_plans[name], error)
            return {}

        return solve

    was_training = model.training
    model.eval()
    walk = calibrate_streams(
        model, blocks, batches, targets, list(streams), make_solver, config.true_sequential, "GPTQ blocks per stream",
        getattr(torch, config.hessian_dtype), disk, inputs, spill,
    )  # fmt: skip
    for _ in walk:
        pass
    model.train(was_training)
    if disk is not None:
        return results
    outside = [name for name in targets if name not in results[next(iter(streams))]]
    for name in outside:
        weight = linear_weight(targets[name]).detach()
        for stream in streams:
            plan = plans[stream][name]
            q = rtn_quantize(weight, plan.bits, plan.group_size, config.sym, config.searches_clip(plan.bits),
                             plan.mask, scale_dtype)  # fmt: skip
            results[stream][name] = LayerResult(q, plan, None)
    if outside:
        logger.warning("%d layers outside the block stack get round-to-nearest: %s", len(outside), outside)
    return results


def assemble(model: nn.Module, config: GPTQConfig, layers: dict[str, LayerResult]) -> nn.Module:
    """A quantized copy of `model` whose layer `name` stores `layers[name]`, with the manifest `quantize` would
    have written for it (default bits: the most common width; the others as overrides)."""
    layer_bits = {name: result.plan.bits for name, result in layers.items()}
    default, overrides = split_layer_bits(layer_bits)
    recorded = dataclasses.replace(config, bits=default, layer_bits=overrides or None)
    act_order = config.act_order and not config.static_groups
    scale_dtype = SCALE_TORCH_DTYPES[config.scale_dtype]
    quantized = copy.deepcopy(model)
    targets = select_targets(quantized, config)
    missing = sorted(set(targets) - set(layers))
    if missing:
        raise ValueError(f"no quantized weight given for {missing}")
    plans = {}
    for name, module in targets.items():
        result = layers[name]
        plans[name] = result.plan
        layer = quantized_layer(result.quantized, result.plan, config.sym, act_order, module.bias, scale_dtype)
        set_submodule(quantized, name, layer)
    attach_quantization_config(quantized, recorded, plans, sorted({type(m).__name__ for m in targets.values()}))
    return quantized
