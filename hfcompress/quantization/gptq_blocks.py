"""GPTQ over a model's blocks: the core calibration driver with a solver that quantizes each group of linears.

Linears that read the same tensor (q/k/v, gate/up) share one Hessian and are quantized as one stacked matrix
(GPTQ treats rows independently, so this is exact); across processes each rank solves a share of the rows.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from ..core.deferred import defer_weight, restore_weight
from ..core.distributed import gather_rows, rank, row_shares
from ..core.experts import routing_all_tokens
from ..core.streaming import release
from ..core.structure import linear_weight, set_linear_weight, set_submodule
from ..core.tensor_file import SpilledTensor
from ..core.walk import calibrate_blocks
from .compensation import error_factors
from .config import GPTQConfig
from .gptq import gptq_quantize
from .grid import QuantizedWeight
from .layers import quantized_layer
from .plan import LayerPlan

__all__ = ["float32_rows", "quantize_blocks", "quantize_group"]

logger = logging.getLogger(__name__)


def quantize_group(
    names: list[str],
    modules: dict[str, nn.Module],
    H: torch.Tensor,
    config: GPTQConfig,
    scale_dtype,
    plans=None,
    overwrite_hessian: bool = False,
    defer: bool = False,
) -> dict[str, QuantizedWeight]:
    """GPTQ on the stacked weights of linears sharing one input (one by one when their plans differ in bits or
    group size); each layer's weight becomes its dequantized value, in float32, so the rest of the block runs
    on it. `plans` maps names (relative to the block) to `LayerPlan`s; without one a layer gets `config`'s
    grid. With `overwrite_hessian` the solve may use H's memory (H is lost: the caller must not need it). With
    `defer`, that value is made from the codes for each forward instead of held (`core.deferred`: a quarter of
    the memory, the same outputs; the weight's values cannot be read between forwards)."""
    plans = plans or {}
    grids = {(plans[n].bits, plans[n].group_size) if n in plans else (config.bits, config.group_size) for n in names}
    if len(grids) > 1:
        result = {}
        for name in names:
            result.update(quantize_group([name], modules, H, config, scale_dtype, plans, defer=defer))
        return result
    bits, group_size = grids.pop()
    weights = [linear_weight(modules[name]).detach() for name in names]  # as held: GPTQ makes the float32 copy
    masks = [plans[n].mask if n in plans else None for n in names]
    mask = None
    if any(m is not None for m in masks):
        mask = torch.cat(
            [torch.ones_like(w, dtype=torch.bool) if m is None else m for w, m in zip(weights, masks, strict=True)]
        )
    weight = weights[0] if len(weights) == 1 else torch.cat(weights)
    # across processes each rank solves its share of the rows (GPTQ treats rows independently) and gathers the rest
    shares = row_shares(weight.shape[0])
    spread = len(shares) > 1 and all(s.stop > s.start for s in shares)
    mine = shares[rank()] if spread else slice(None)
    stacked, loss = gptq_quantize(
        weight[mine],
        H,
        bits=bits,
        group_size=group_size,
        sym=config.sym,
        act_order=config.act_order,
        static_groups=config.static_groups,
        damp_percent=config.damp_percent,
        block_size=config.block_size,
        clip_search=config.searches_clip(bits),
        clip_objective=config.clip_objective,
        mask=None if mask is None else mask[mine],
        scale_dtype=scale_dtype,
        overwrite_hessian=overwrite_hessian,
    )
    if spread:
        parts = (gather_rows(t, shares) for t in (stacked.codes, stacked.scales, stacked.zeros))
        stacked = QuantizedWeight(*parts, stacked.g_idx, bits)
    logger.debug("%s: GPTQ loss %.4g", names, loss)
    sizes = [w.shape[0] for w in weights]
    scales = stacked.scales.to(scale_dtype).float()  # already representable, except scales below its range
    result = {}
    for name, codes, s, z in zip(
        names, stacked.codes.split(sizes), scales.split(sizes), stacked.zeros.split(sizes), strict=True
    ):
        quantized = QuantizedWeight(codes, s, z, stacked.g_idx, bits)
        module = modules[name]
        # in float32 whatever the model's dtype: the rest of the block runs on the weights the codes give
        if defer:
            defer_weight(module, functools.partial(float32_rows, quantized))
        else:
            set_linear_weight(module, quantized.dequantize(torch.float32), exact=True)
        result[name] = quantized
    return result


def float32_rows(quantized: QuantizedWeight, start: int, stop: int) -> torch.Tensor:
    return quantized.dequantize(torch.float32, start=start, stop=stop)


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    targets: dict[str, nn.Module],
    config: GPTQConfig,
    scale_dtype: torch.dtype,
    plans: dict | None = None,
    stream=None,
    inputs=None,
    replay: str = "all",
    rows: dict[str, int] | None = None,
    errors: dict | None = None,
    max_ranks: dict[str, int] | None = None,
    spill=None,
) -> set[str]:
    """Quantize every target inside `blocks` with GPTQ, replacing it by a `QuantLinear` (a `SparseQuantLinear`
    where its plan has a mask); returns their names. `plans` maps full names to `LayerPlan`s (default: the
    config's grid everywhere). With a `stream` (`core.block_stream.BlockStream`) the blocks are onloaded from disk
    and written out one at a time; `inputs` are the first block's inputs if already captured; `replay` trades
    activations held for compute (see `core.calibration.calibrate_block`); `spill` is a folder to keep the
    blocks' inputs and outputs in instead of memory (`core.walk.calibrate_blocks`). Experts of a mixture-of-experts layer
    see every calibration token with `config.calibrate_all_experts`, else those routed to them; `rows`, when
    given, is filled with the tokens each target saw. `errors`, when given, is filled with each target's
    `compensation.ErrorFactors` (its quantization error's whitened SVD, up to rank `max_ranks[name]`)."""
    plans = plans or {n: LayerPlan(config.bits, config.group_size) for n in targets}
    act_order = config.act_order and not config.static_groups
    done: set[str] = set()

    def make_solver(block, prefix, modules):
        block_plans = {n: plans[f"{prefix}.{n}"] for n in modules}
        if errors is None:  # each Hessian is solved once (its memory can go to the solve), no weight is read back
            return lambda names, H: quantize_group(names, modules, H, config, scale_dtype, block_plans, True, True)

        def solve_and_measure(names, H):
            # the weights as held: deferring replaces each module's parameter, so these tensors keep their values
            originals = {n: linear_weight(modules[n]).detach() for n in names}
            # the solve works in H's memory (no second matrix of H's size at the peak: 485 MB for an MLP's down
            # projection of 11008 inputs); the error's whitening reads H afterwards, from a temporary file
            with SpilledTensor(H) as saved:
                result = quantize_group(
                    names, modules, H, config, scale_dtype, block_plans, overwrite_hessian=True, defer=True
                )
                saved.load(out=H)
            for name in names:  # what the codes do not give is the quantization error
                error = originals.pop(name).float() - result[name].dequantize(torch.float32)
                errors[f"{prefix}.{name}"] = error_factors(error, H, max_ranks[f"{prefix}.{name}"], config.damp_percent)
                del error
            return result

        return solve_and_measure

    calibration = calibrate_blocks(
        model,
        blocks,
        batches,
        targets,
        make_solver,
        config.true_sequential,
        "GPTQ blocks",
        stream=stream,
        inputs=inputs,
        replay=replay,
        rows=rows,
        spill=spill,
        hessian_dtype=getattr(torch, config.hessian_dtype),
    )
    with routing_all_tokens(model, config.calibrate_all_experts):
        _replace_solved(calibration, plans, config, act_order, scale_dtype, done)
    return done


def _replace_solved(calibration, plans, config, act_order: bool, scale_dtype, done: set[str]) -> None:
    for block, prefix, quantized in calibration:
        for name, q in quantized.items():
            module = block.get_submodule(name)
            layer = quantized_layer(q, plans[f"{prefix}.{name}"], config.sym, act_order, module.bias, scale_dtype)
            set_submodule(block, name, layer)
            restore_weight(module)  # its hooks hold the codes, and `targets` holds it until the run ends
            release(module)  # the float weight it replaced is not needed any more (and is no longer the model's)
            done.add(f"{prefix}.{name}")
