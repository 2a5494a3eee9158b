"""The sequential GPTQ driver: one block at a time, each calibrated on the previous blocks' quantized outputs.

Within a block, linears that read the same tensor (q/k/v, gate/up) form a group that shares one Hessian
and is quantized as one stacked matrix (GPTQ treats rows independently, so this is exact).

With `true_sequential` (the default) a block is calibrated in stages, one per group in call order: stage g
runs the block until group g's input exists, folds it into the Hessian and stops there; group g is then
quantized and the next stage starts. Submodules whose output can no longer change (every linear before or
inside them already quantized) are recorded once and replayed in later stages instead of recomputed, so
each linear's matmul runs about once per block and the whole model costs about one forward pass plus the
Hessians. Without it (or when the block calls a linear twice, or a module turns out to modify a recorded
output in place, which undoes the block's weights and starts over) the classic two passes run: one to
collect every Hessian with full-precision weights (stopping at the last group's input), one to propagate
the quantized outputs.
Only the current block's inputs, and its recorded submodule outputs, are held in memory.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .capture import (
    BlockInputs,
    capture_block_inputs,
    hidden_states_of,
    run_block,
    with_hidden_states,
)
from .config import GPTQConfig
from .gptq import accumulate_hessian, gptq_quantize, symmetrize_upper
from .grid import QuantizedWeight
from .structure import linear_weight, set_linear_weight, set_submodule
from .trace import BlockTrace, trace_block

__all__ = ["calibrate_block", "collect_hessians", "for_each_block_hessian", "quantize_blocks"]

logger = logging.getLogger(__name__)


class _Stop(Exception):
    pass


class _ReplayUnsafe(RuntimeError):
    pass


class _Hessian:
    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        self.H, self.count = accumulate_hessian(x.detach(), self.H, self.count, upper_only=True)

    def full(self) -> torch.Tensor:
        return symmetrize_upper(self.H)


def _first_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _run_stage(
    block: nn.Module,
    named: dict[str, nn.Module],
    inputs: list[BlockInputs],
    hessians: dict[str, _Hessian],
    stop: str | None = None,
    replays: dict[str, list] | None = None,
    record: set[str] = frozenset(),
    keep_inputs: bool = False,
    keep_outputs: bool = False,
) -> tuple[list[BlockInputs], dict[str, list], dict[str, list]]:
    """Run `block` on every input with Hessian hooks on the modules named in `hessians` (keeping their inputs
    with `keep_inputs`), stopping at the entry of `stop`, replaying the recorded outputs in `replays` and
    recording the outputs of `record`. Returns the block outputs, the complete records and the kept inputs."""
    replays = replays or {}
    batch = {"index": 0}
    recorded: dict[str, list] = {name: [] for name in record}
    kept: dict[str, list] = {name: [] for name in hessians}
    handles = []

    def hessian_hook(name):
        def hook(module, args, kwargs):
            x = _first_input(args, kwargs)
            hessians[name].add(x)
            if keep_inputs:
                kept[name].append(x)
            if name == stop:
                raise _Stop

        return hook

    def record_hook(name):
        def hook(module, args, output):
            recorded[name].append(output)

        return hook

    def replayer(outputs):
        return lambda *args, **kwargs: outputs[batch["index"]]

    for name in hessians:
        handles.append(named[name].register_forward_pre_hook(hessian_hook(name), with_kwargs=True))
    for name in record:
        handles.append(named[name].register_forward_hook(record_hook(name)))
    for name, outputs in replays.items():
        named[name].forward = replayer(outputs)
    outputs = []
    try:
        for index, item in enumerate(inputs):
            batch["index"] = index
            try:
                hidden = hidden_states_of(block(*item.args, **item.kwargs))
            except _Stop:
                continue
            if keep_outputs:
                outputs.append(with_hidden_states(item, hidden))
    finally:
        for handle in handles:
            handle.remove()
        for name in replays:
            del named[name].forward
    complete = {name: outs for name, outs in recorded.items() if len(outs) == len(inputs)}
    return outputs, complete, kept


def _quantize_group(
    names: list[str], modules: dict[str, nn.Module], H: torch.Tensor, config: GPTQConfig, scale_dtype, plans=None
) -> dict[str, QuantizedWeight]:
    """GPTQ on the stacked weights of linears sharing one input (one by one when their plans differ in bits or
    group size); each layer's weight becomes its dequantized value so the rest of the block runs on it.
    `plans` maps names (relative to the block) to `LayerPlan`s; without one a layer gets `config`'s grid."""
    plans = plans or {}
    grids = {(plans[n].bits, plans[n].group_size) if n in plans else (config.bits, config.group_size) for n in names}
    if len(grids) > 1:
        result = {}
        for name in names:
            result.update(_quantize_group([name], modules, H, config, scale_dtype, plans))
        return result
    bits, group_size = grids.pop()
    weights = [linear_weight(modules[name]).detach().float() for name in names]
    masks = [plans[n].mask if n in plans else None for n in names]
    mask = None
    if any(m is not None for m in masks):
        mask = torch.cat([torch.ones_like(w, dtype=torch.bool) if m is None else m for w, m in zip(weights, masks)])
    stacked, loss = gptq_quantize(
        torch.cat(weights),
        H,
        bits=bits,
        group_size=group_size,
        sym=config.sym,
        act_order=config.act_order,
        static_groups=config.static_groups,
        damp_percent=config.damp_percent,
        block_size=config.block_size,
        clip_search=config.clip_search,
        mask=mask,
    )
    logger.debug("%s: GPTQ loss %.4g", names, loss)
    sizes = [w.shape[0] for w in weights]
    scales = stacked.scales.to(scale_dtype).float()
    result = {}
    for name, codes, s, z in zip(names, stacked.codes.split(sizes), scales.split(sizes), stacked.zeros.split(sizes)):
        quantized = QuantizedWeight(codes, s, z, stacked.g_idx, bits)
        module = modules[name]
        set_linear_weight(module, quantized.dequantize(module.weight.dtype))
        result[name] = quantized
    return result


def _nested(name: str, others) -> bool:
    return any(name.startswith(other + ".") for other in others)


def _calibrate_staged(block, named, trace: BlockTrace, inputs, modules, config, scale_dtype, plans=None):
    candidates = [name for name in trace.order if trace.calls[name] == 1 and name not in modules]
    settled = {name: trace.settled_after(name) for name in candidates}
    group_of = trace.group_of()
    # inputs worth keeping: those of groups whose linear some module passes its output through
    wanted = {group_of[p.linear] for p in trace.passthroughs.values()}
    records: dict[str, list] = {}
    kept_inputs: dict[int, list] = {}
    quantized: dict[str, QuantizedWeight] = {}
    versions: dict[str, int] = {}
    outputs = []
    for stage in range(len(trace.groups) + 1):
        _synthesize_passthroughs(trace, named, stage, records, kept_inputs)
        versions.update({n: _version(outs) for n, outs in records.items() if n not in versions})
        last = stage == len(trace.groups)
        record = {n for n in candidates if settled[n] < stage and n not in records and not _nested(n, records)}
        leader = None if last else trace.groups[stage][0]
        hessians = (
            {} if last else {leader: _Hessian(linear_weight(named[leader]).shape[1], named[leader].weight.device)}
        )
        outputs, recorded, kept = _run_stage(
            block,
            named,
            inputs,
            hessians,
            stop=leader,
            replays=records,
            record=record,
            keep_inputs=stage in wanted,
            keep_outputs=last,
        )
        records.update(recorded)
        versions.update({n: _version(outs) for n, outs in recorded.items()})
        if stage in wanted:
            kept_inputs[stage] = kept[leader]
        # a recorded parent makes its children's records unnecessary
        for name in [n for n in records if _nested(n, records)]:
            del records[name]
        if not last:
            group = trace.groups[stage]
            quantized.update(_quantize_group(group, named, hessians[leader].full(), config, scale_dtype, plans))
    changed = [n for n, outs in records.items() if _version(outs) != versions[n]]
    if changed:
        raise _ReplayUnsafe(f"{changed} modified their recorded outputs in place, so replaying them is unsafe")
    return outputs, quantized


def _version(output) -> int:
    """Sum of the in-place modification counters of the tensors in `output`."""
    if isinstance(output, torch.Tensor):
        return output._version
    if isinstance(output, (tuple, list)):
        return sum(_version(o) for o in output)
    return 0


def _synthesize_passthroughs(trace: BlockTrace, named, stage: int, records: dict, kept_inputs: dict) -> None:
    """Record a module that returns its last linear's output once that linear is quantized and everything
    else it depends on is settled, by running the linear alone on its kept inputs."""
    group_of = trace.group_of()
    for module, passthrough in trace.passthroughs.items():
        group = group_of[passthrough.linear]
        if module in records or _nested(module, records) or group >= stage or group not in kept_inputs:
            continue
        if trace.settled_after(module, exclude=passthrough.linear) >= stage:
            continue
        linear = named[passthrough.linear]
        records[module] = [passthrough.wrap(linear(x)) for x in kept_inputs[group]]


def _group_hessians(named, trace: BlockTrace, inputs) -> dict[str, torch.Tensor]:
    """The input Hessian of each group of `trace`, keyed by the group's first linear."""
    hessians = {
        names[0]: _Hessian(linear_weight(named[names[0]]).shape[1], named[names[0]].weight.device)
        for names in trace.groups
    }
    # the block's output is not needed here: stop once the last group's input is in
    _run_stage(named[""], named, inputs, hessians, stop=trace.groups[-1][0])
    return {leader: hessian.full() for leader, hessian in hessians.items()}


def _calibrate_two_pass(block, named, trace: BlockTrace, inputs, modules, config, scale_dtype, plans=None):
    hessians = _group_hessians(named, trace, inputs)
    quantized = {}
    for names in trace.groups:
        quantized.update(_quantize_group(names, named, hessians[names[0]], config, scale_dtype, plans))
    return run_block(block, inputs), quantized


def _named_in_block(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Submodules of `block` by name relative to it; the block itself under ""."""
    return {n[len(prefix) + 1 :]: m for n, m in block.named_modules(prefix=prefix) if m is not block} | {"": block}


@torch.no_grad()
def collect_hessians(
    block: nn.Module, prefix: str, inputs: list[BlockInputs], names: list[str], trace: BlockTrace | None = None
) -> dict[str, torch.Tensor]:
    """The input Hessian (2 X^T X / n) of each linear `names` (relative to `block`) on `inputs`, with the
    block's current weights. Linears reading the same tensor share one matrix (the same object)."""
    named = _named_in_block(block, prefix)
    if trace is None:
        trace = trace_block(block, prefix, [f"{prefix}.{n}" for n in names], inputs[0])
    never_ran = [n for n in names if trace.calls[n] == 0]
    if never_ran:
        raise RuntimeError(f"{never_ran} in {prefix} never ran during calibration; cannot build their Hessians")
    by_leader = _group_hessians(named, trace, inputs)
    return {name: by_leader[group[0]] for group in trace.groups for name in group}


@torch.no_grad()
def for_each_block_hessian(
    model: nn.Module, blocks, batches: list[torch.Tensor], targets: dict[str, nn.Module], process, desc: str
):
    """Block by block: the input Hessian of every target in the block, `process(block, name, module, H)` for
    each (`name` relative to the block), then the block's outputs, with whatever `process` changed, become the
    next block's inputs."""
    block_names = {id(module): name for name, module in model.named_modules()}
    inputs = capture_block_inputs(model, blocks[0], batches)
    for block in tqdm(blocks, desc=desc):
        prefix = block_names[id(block)]
        modules = {n[len(prefix) + 1 :]: m for n, m in targets.items() if n.startswith(prefix + ".")}
        if modules:
            hessians = collect_hessians(block, prefix, inputs, list(modules))
            for name, module in modules.items():
                process(block, name, module, hessians[name])
            del hessians
        inputs = run_block(block, inputs)


@torch.no_grad()
def calibrate_block(
    block: nn.Module,
    prefix: str,
    inputs: list[BlockInputs],
    modules: dict[str, nn.Module],
    config: GPTQConfig,
    scale_dtype: torch.dtype,
    trace: BlockTrace | None = None,
    plans: dict | None = None,
) -> tuple[list[BlockInputs], dict[str, QuantizedWeight], bool]:
    """GPTQ on the target linears of one block (`modules`, by name relative to the block).

    Leaves each target's weight at its dequantized value and returns the block's outputs on `inputs` (the
    next block's inputs), the quantized weights, and whether the staged path ran.
    """
    named = _named_in_block(block, prefix)
    if trace is None:
        trace = trace_block(block, prefix, [f"{prefix}.{n}" for n in modules], inputs[0])
    never_ran = [n for n in modules if trace.calls[n] == 0]
    if never_ran:
        raise RuntimeError(f"{never_ran} in {prefix} never ran during calibration; cannot build their Hessians")
    staged = config.true_sequential and all(trace.calls[n] == 1 for n in modules)
    if config.true_sequential and not staged:
        logger.info("%s calls a linear layer more than once; using the two-pass calibration", prefix)
    if staged:
        originals = {n: linear_weight(m).detach().clone() for n, m in modules.items()}
        try:
            outputs, quantized = _calibrate_staged(block, named, trace, inputs, modules, config, scale_dtype, plans)
            return outputs, quantized, True
        except _ReplayUnsafe as e:
            logger.warning("%s: %s; calibrating this block with the two-pass path instead", prefix, e)
            for name, weight in originals.items():
                set_linear_weight(modules[name], weight)
    outputs, quantized = _calibrate_two_pass(block, named, trace, inputs, modules, config, scale_dtype, plans)
    return outputs, quantized, False


@torch.no_grad()
def quantize_blocks(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    targets: dict[str, nn.Module],
    config: GPTQConfig,
    scale_dtype: torch.dtype,
    plans: dict | None = None,
) -> set[str]:
    """Quantize every target inside `blocks` with GPTQ, replacing it by a `QuantLinear` (a `SparseQuantLinear`
    where its plan has a mask); returns their names. `plans` maps full names to `LayerPlan`s (default: the
    config's grid everywhere)."""
    from .api import quantized_layer
    from .plan import LayerPlan

    plans = plans or {n: LayerPlan(config.bits, config.group_size) for n in targets}
    block_names = {id(module): name for name, module in model.named_modules()}
    inputs = capture_block_inputs(model, blocks[0], batches)
    act_order = config.act_order and not config.static_groups
    traces: dict[tuple, BlockTrace] = {}
    done: set[str] = set()
    for block in tqdm(blocks, desc="GPTQ blocks"):
        prefix = block_names[id(block)]
        modules = {n[len(prefix) + 1 :]: m for n, m in targets.items() if n.startswith(prefix + ".")}
        if not modules:
            inputs = run_block(block, inputs)
            continue
        key = (type(block), frozenset(modules))
        if key not in traces:
            traces[key] = trace_block(block, prefix, [f"{prefix}.{n}" for n in modules], inputs[0])
        block_plans = {n: plans[f"{prefix}.{n}"] for n in modules}
        inputs, quantized, _ = calibrate_block(
            block, prefix, inputs, modules, config, scale_dtype, traces[key], block_plans
        )
        for name, q in quantized.items():
            layer = quantized_layer(q, block_plans[name], config.sym, act_order, modules[name].bias, scale_dtype)
            set_submodule(block, name, layer)
            done.add(f"{prefix}.{name}")
    return done
