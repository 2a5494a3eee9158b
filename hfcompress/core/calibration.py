"""The block-by-block calibration driver every calibrated technique runs on: one block at a time, each
calibrated on the previous blocks' outputs as the technique left them.

Within a block, linears that read the same tensor (q/k/v, gate/up) form a group that shares one input
Hessian; the technique's `solve(names, H)` changes that group's weights in place (GPTQ, SparseGPT, Wanda,
whitened SVD, k-means) and returns what it computed for each.

With `true_sequential` a block is calibrated in stages, one per group in call order: stage g runs the block
until group g's input exists, folds it into the Hessian and stops there; group g is then solved and the next
stage starts. Submodules whose output can no longer change (every linear before or inside them already
solved) are recorded once and replayed in later stages instead of recomputed, so each linear's matmul runs
about once per block and the whole model costs about one forward pass plus the Hessians. Without it (or when
the block calls a linear twice, or a module turns out to modify a recorded output in place, which undoes the
block's weights and starts over) the classic two passes run: one to collect every Hessian with the weights
as they were (stopping at the last group's input), one to propagate the solved outputs.
Only the current block's inputs, and its recorded submodule outputs, are held in memory.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .activations import SpilledList
from .capture import (
    BlockInputs,
    hidden_states_of,
    run_block,
    with_hidden_states,
)
from .deferred import restore_weight
from .hessian import Hessian
from .memory import trim_heap
from .precision import maths_for
from .structure import linear_weight, set_linear_weight
from .trace import BlockTrace, trace_block

__all__ = ["BlockSolver", "calibrate_block", "collect_hessians", "collect_input_statistics"]

# solve(names relative to the block, their shared input Hessian) -> {name: result}; changes the weights in place
BlockSolver = Callable[[list[str], torch.Tensor], dict[str, Any]]

logger = logging.getLogger(__name__)


class _Stop(Exception):
    pass


class _ReplayUnsafe(RuntimeError):
    pass


def _first_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _run_stage(
    block: nn.Module,
    named: dict[str, nn.Module],
    inputs: list[BlockInputs],
    hessians: dict[str, Hessian],
    stop: str | None = None,
    replays: dict[str, list] | None = None,
    record: set[str] = frozenset(),
    keep_inputs: bool = False,
    outputs=None,
    new_list: Callable[[], Any] = list,
) -> tuple[Any, dict[str, list], dict[str, list]]:
    """Run `block` on every input with Hessian hooks on the modules named in `hessians` (keeping their inputs
    with `keep_inputs`), stopping at the entry of `stop`, replaying the recorded outputs in `replays` and
    recording the outputs of `record`; the block's outputs are appended to `outputs` (None: not kept).
    Records and kept inputs go into containers `new_list()` makes. Returns `outputs`, the complete records and
    the kept inputs."""
    replays = replays or {}
    batch = {"index": 0}
    recorded: dict[str, list] = {name: new_list() for name in record}
    kept: dict[str, list] = {name: new_list() for name in hessians} if keep_inputs else {}
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

    def replayer(recorded_outputs):
        return lambda *args, **kwargs: recorded_outputs[batch["index"]]

    for name in hessians:
        handles.append(named[name].register_forward_pre_hook(hessian_hook(name), with_kwargs=True))
    for name in record:
        handles.append(named[name].register_forward_hook(record_hook(name)))
    for name, recorded_outputs in replays.items():
        named[name].forward = replayer(recorded_outputs)
    try:
        for index, item in enumerate(inputs):
            batch["index"] = index
            try:
                hidden = hidden_states_of(block(*item.args, **item.kwargs))
            except _Stop:
                continue
            if outputs is not None:
                outputs.append(with_hidden_states(item, hidden))
    finally:
        for handle in handles:
            handle.remove()
        for name in replays:
            del named[name].forward
    complete = {name: outs for name, outs in recorded.items() if len(outs) == len(inputs)}
    return outputs, complete, kept


def _nested(name: str, others) -> bool:
    return any(name.startswith(other + ".") for other in others)


def _calibrate_staged(
    block, named, trace: BlockTrace, inputs, modules, solve: BlockSolver, replay: str = "all", rows: dict | None = None,
    into=list, scratch=None, hessian_dtype: torch.dtype = torch.float32,
):  # fmt: skip
    if scratch is None:
        return _staged(block, named, trace, inputs, modules, solve, replay, rows, into, list, hessian_dtype)
    count = itertools.count()

    def new_list():
        return SpilledList(Path(scratch) / f"{next(count):04d}")

    try:
        return _staged(block, named, trace, inputs, modules, solve, replay, rows, into, new_list, hessian_dtype)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _staged(
    block, named, trace: BlockTrace, inputs, modules, solve: BlockSolver, replay, rows, into, new_list, hessian_dtype
):  # fmt: skip
    candidates = [name for name in trace.order if trace.calls[name] == 1 and name not in modules]
    group_of = trace.group_of()
    # inputs worth keeping: those of groups whose linear some module passes its output through
    wanted = {group_of[p.linear] for p in trace.passthroughs.values()}
    if replay == "lean":  # only sub-blocks that hold linears (attention, MLP), only inputs no wider than the block's
        width = hidden_states_of(inputs[0].args or (inputs[0].kwargs["hidden_states"],)).shape[-1]
        candidates = [c for c in candidates if any(m.startswith(c + ".") for m in modules)]
        wanted = {g for g in wanted if linear_weight(named[trace.groups[g][0]]).shape[1] <= width}
    elif replay == "none":
        candidates, wanted = [], set()
    settled = {name: trace.settled_after(name) for name in candidates}
    records: dict[str, list] = {}
    kept_inputs: dict[int, list] = {}
    solved: dict[str, Any] = {}
    versions: dict[str, int] = {}
    outputs = []
    for stage in [*trace.stages, None]:
        last = stage is None
        first = len(trace.groups) if last else stage[0]  # the groups before `first` are solved
        _synthesize_passthroughs(trace, named, first, records, kept_inputs, new_list)
        versions.update({n: _version(outs) for n, outs in records.items() if n not in versions})
        record = {n for n in candidates if settled[n] < first and n not in records and not _nested(n, records)}
        leaders = [] if last else [trace.groups[g][0] for g in stage]
        hessians = {
            leader: Hessian(linear_weight(named[leader]).shape[1], named[leader].weight.device, dtype=hessian_dtype)
            for leader in leaders
        }
        outputs, recorded, kept = _run_stage(
            block,
            named,
            inputs,
            hessians,
            stop=None if last else trace.last_called(leaders),
            replays=records,
            record=record,
            keep_inputs=not last and any(g in wanted for g in stage),
            outputs=into() if last else None,
            new_list=new_list,
        )
        records.update(recorded)
        versions.update({n: _version(outs) for n, outs in recorded.items()})
        for g in [] if last else stage:
            if g in wanted:
                kept_inputs[g] = kept[trace.groups[g][0]]
        # a recorded parent makes its children's records unnecessary
        for name in [n for n in records if _nested(n, records)]:
            del records[name]
        if not last:
            trim_heap()  # the stage's freed activations, before the solve allocates its own
            for g in stage:
                names = trace.groups[g]
                solved.update(solve(names, _full(hessians.pop(names[0]), names, rows)))
    changed = [n for n, outs in records.items() if _version(outs) != versions[n]]
    if changed:
        raise _ReplayUnsafe(f"{changed} modified their recorded outputs in place, so replaying them is unsafe")
    return outputs, solved


def _full(hessian: Hessian, names: list[str], rows: dict | None) -> torch.Tensor:
    """The finished Hessian of the linears `names`, recording in `rows` how many calibration rows (tokens) they
    saw (over every process)."""
    H = hessian.full()
    if rows is not None:
        rows.update(dict.fromkeys(names, hessian.count))
    return H


def _version(output) -> int:
    """Sum of the in-place modification counters of the tensors in `output`."""
    if isinstance(output, torch.Tensor):
        return output._version
    if isinstance(output, (tuple, list)):
        return sum(_version(o) for o in output)
    return 0


def _synthesize_passthroughs(trace: BlockTrace, named, solved: int, records: dict, kept_inputs: dict, new_list) -> None:
    """Record a module that returns its last linear's output once that linear is quantized and everything
    else it depends on is settled (the groups before `solved` are), by running the linear alone on its kept
    inputs."""
    group_of = trace.group_of()
    for module, passthrough in trace.passthroughs.items():
        group = group_of[passthrough.linear]
        if module in records or _nested(module, records) or group >= solved or group not in kept_inputs:
            continue
        if trace.settled_after(module, exclude=passthrough.linear) >= solved:
            continue
        linear = named[passthrough.linear]
        records[module] = new_list()
        for x in kept_inputs[group]:
            records[module].append(passthrough.wrap(linear(x)))
    for group in list(kept_inputs):  # inputs every passthrough of their group has used are not needed again
        users = [m for m, p in trace.passthroughs.items() if group_of[p.linear] == group]
        if all(m in records or _nested(m, records) for m in users):
            del kept_inputs[group]


def _group_hessians(
    named, trace: BlockTrace, inputs, diagonal: bool = False, dtype: torch.dtype = torch.float32
) -> dict[str, Hessian]:
    """The input Hessian (or its diagonal) of each group of `trace`, keyed by the group's first linear."""
    leaders = [names[0] for names in trace.groups]
    hessians = {
        leader: Hessian(linear_weight(named[leader]).shape[1], named[leader].weight.device, diagonal, dtype)
        for leader in leaders
    }
    # the block's output is not needed here: stop once the last group's input is in
    _run_stage(named[""], named, inputs, hessians, stop=trace.last_called(leaders))
    return hessians


def _calibrate_two_pass(
    block, named, trace: BlockTrace, inputs, solve: BlockSolver, rows=None, into=list, diagonal: bool = False,
    hessian_dtype: torch.dtype = torch.float32,
):  # fmt: skip
    hessians = _group_hessians(named, trace, inputs, diagonal, hessian_dtype)
    solved = {}
    for names in trace.groups:
        solved.update(solve(names, _full(hessians.pop(names[0]), names, rows)))
    return run_block(block, inputs, into=into()), solved


def _named_in_block(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """Submodules of `block` by name relative to it; the block itself under ""."""
    return {n[len(prefix) + 1 :]: m for n, m in block.named_modules(prefix=prefix) if m is not block} | {"": block}


def _checked_trace(block, prefix: str, names: list[str], inputs, trace: BlockTrace | None) -> BlockTrace:
    """The block's trace (traced now on the first input when not given), after checking every target ran."""
    if trace is None:
        trace = trace_block(block, prefix, [f"{prefix}.{n}" for n in names], inputs[0])
    never_ran = [n for n in names if trace.calls[n] == 0]
    if never_ran:
        raise RuntimeError(f"{never_ran} in {prefix} never ran during calibration; cannot build their Hessians")
    return trace


@torch.no_grad()
def collect_hessians(
    block: nn.Module,
    prefix: str,
    inputs: list[BlockInputs],
    names: list[str],
    trace: BlockTrace | None = None,
    hessian_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The input Hessian (2 X^T X / n) of each linear `names` (relative to `block`) on `inputs`, with the
    block's current weights, summed in `hessian_dtype` (`core.hessian.Hessian`). Linears reading the same tensor
    share one matrix (the same object)."""
    statistics = collect_input_statistics(block, prefix, inputs, names, trace, hessian_dtype)
    return {name: hessian.H for name, hessian in statistics.items()}


@torch.no_grad()
def collect_input_statistics(
    block: nn.Module,
    prefix: str,
    inputs: list[BlockInputs],
    names: list[str],
    trace: BlockTrace | None = None,
    hessian_dtype: torch.dtype = torch.float32,
) -> dict[str, Hessian]:
    """`collect_hessians`, as the finished `Hessian` of each linear (its `H` full, its `abs_mean` each input's
    mean |x|); linears reading the same tensor share one object."""
    named = _named_in_block(block, prefix)
    with maths_for(block):  # weights stored in bfloat16/float16 compute in float32, as in `calibrate_block`
        trace = _checked_trace(block, prefix, names, inputs, trace)
        by_leader = _group_hessians(named, trace, inputs, dtype=hessian_dtype)
    for hessian in by_leader.values():
        hessian.full()
    return {name: by_leader[group[0]] for group in trace.groups for name in group}


@torch.no_grad()
def calibrate_block(
    block: nn.Module,
    prefix: str,
    inputs: list[BlockInputs],
    modules: dict[str, nn.Module],
    solve: BlockSolver,
    true_sequential: bool = True,
    trace: BlockTrace | None = None,
    reload: Callable[[], None] | None = None,
    replay: str = "all",
    rows: dict[str, int] | None = None,
    into: Callable[[], Any] = list,
    scratch: str | os.PathLike | None = None,
    diagonal: bool = False,
    hessian_dtype: torch.dtype = torch.float32,
) -> tuple[list[BlockInputs], dict[str, Any], bool]:
    """Run `solve` on each group of the target linears of one block (`modules`, by name relative to the block).

    Returns the block's outputs on `inputs` with the solved weights (the next block's inputs), what `solve`
    returned for every target, and whether the staged (true-sequential) path ran. Should the staged path turn
    out unsafe midway, `reload()` puts the block's original weights back for the two-pass path (default: a copy
    of the targets' weights is kept while the staged path runs; a block streamed from disk is read again).
    `replay` says which submodule outputs the staged path records to replay in later stages instead of
    recomputing them (the results are the same): "all" (least compute), "lean" (only sub-blocks holding linears,
    and only inputs no wider than the block's hidden state: about 4 values per hidden unit and token held), or
    "none" (each stage recomputes the block up to its group; only the block's inputs and outputs held).
    `rows`, when given, is filled with the number of calibration rows (tokens) each target saw: all of them,
    except for experts of a mixture-of-experts layer, which see the tokens routed to them.
    `into()` makes the container the outputs are appended to (default: a list; `core.activations` keeps them on
    disk); it is called again if the staged path is abandoned after it started writing outputs. `scratch`: a
    folder where the staged path keeps the submodule outputs and linear inputs it holds between stages, instead
    of memory (`core.activations.SpilledList`), removed when the block is done. With `diagonal` (two passes
    only), `solve` is handed each Hessian's diagonal, a vector, and the matrices are never built. `hessian_dtype`:
    what the Hessians are summed in (float64: the same H whatever the order of `inputs`; see `core.hessian.Hessian`);
    `solve` gets them in float32.
    """
    if diagonal and true_sequential:
        raise ValueError("`diagonal` Hessians are collected by the two-pass path only: pass true_sequential=False")
    named = _named_in_block(block, prefix)
    trace = _checked_trace(block, prefix, list(modules), inputs, trace)
    staged = true_sequential and all(trace.calls[n] == 1 for n in modules)
    if true_sequential and not staged:
        logger.info("%s calls a linear layer more than once; using the two-pass calibration", prefix)
    with maths_for(block):  # weights stored in bfloat16/float16 compute in float32
        if staged:
            originals = {} if reload else {n: linear_weight(m).detach().clone() for n, m in modules.items()}
            try:
                outputs, solved = _calibrate_staged(
                    block, named, trace, inputs, modules, solve, replay, rows, into, scratch, hessian_dtype
                )
                return outputs, solved, True
            except _ReplayUnsafe as e:
                logger.warning("%s: %s; calibrating this block with the two-pass path instead", prefix, e)
                for module in modules.values():  # solved layers may make their weight from codes
                    restore_weight(module)
                for name, weight in originals.items():
                    set_linear_weight(modules[name], weight, exact=True)
                if reload is not None:
                    reload()
        outputs, solved = _calibrate_two_pass(block, named, trace, inputs, solve, rows, into, diagonal, hessian_dtype)
    return outputs, solved, False
