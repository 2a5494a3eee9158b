"""The walk over a model's blocks that every calibrated technique runs on: capture the first block's inputs,
then calibrate each block in turn (`core.calibration.calibrate_block`) on the previous blocks' outputs as they
were solved, one or several calibration streams at once, with the blocks optionally onloaded from disk and
written out one at a time (`core.block_stream.BlockStream`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .activations import INPUTS, OUTPUTS, SCRATCH, SpilledActivations
from .calibration import BlockSolver, calibrate_block
from .capture import BlockInputs, capture_block_inputs, run_block
from .deferred import restore_weight
from .structure import find_layer_stack, find_layer_stacks, linear_weight, set_linear_weight
from .trace import BlockTrace, trace_block

__all__ = ["block_prefixes", "calibrate_blocks", "calibrate_streams", "for_each_block_hessian", "stacks_holding"]


def stacks_holding(model: nn.Module, targets: dict[str, nn.Module]) -> list[tuple[str, nn.ModuleList]]:
    """The stacks of blocks (`core.structure.find_layer_stacks`) that hold some of `targets`, in the order the
    model runs them: an encoder-decoder's encoder, then its decoder, which is then calibrated on the compressed
    encoder's outputs. An error, as before any work, for a model with no stack at all."""
    find_layer_stack(model)  # refuses a model without blocks, naming what it looked for
    return [(p, s) for p, s in find_layer_stacks(model) if any(n.startswith(p + ".") for n in targets)]


def block_prefixes(model: nn.Module, blocks) -> list[str]:
    """The full name of each block of `blocks` in `model`."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(block)] for block in blocks]


@torch.no_grad()
def calibrate_blocks(
    model: nn.Module,
    blocks,
    batches: list[torch.Tensor],
    targets: dict[str, nn.Module],
    make_solver: Callable[[nn.Module, str, dict[str, nn.Module]], BlockSolver],
    true_sequential: bool = True,
    desc: str = "blocks",
    stream=None,
    inputs: list[BlockInputs] | None = None,
    replay: str = "all",
    rows: dict[str, int] | None = None,
    spill: str | os.PathLike | None = None,
    diagonal: bool = False,
    hessian_dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[nn.Module, str, dict[str, Any]]]:
    """Calibrate the targets of every block in turn, each block on the previous ones' outputs as solved.

    `make_solver(block, prefix, modules)` gives the solver of one block (`modules` by name relative to it).
    Yields `(block, prefix, solved)` after each block with targets, before its outputs move on, so the caller
    can swap in the compressed modules. Blocks of one type with the same targets share one trace.

    With a `stream` (`core.block_stream.BlockStream`), `stream.onload(block, prefix)` runs before a block is used
    and `stream.offload(block, prefix, next_inputs)` once the caller is done with it (after the caller's loop
    body, with the next block's inputs): the model's blocks can then live on disk, one in memory at a time.
    `inputs`: the first block's inputs, when the caller captured them already (default: captured here from
    `batches`). `replay`: which submodule outputs the staged path holds (see `calibrate_block`). `rows`, when
    given, is filled with the calibration rows (tokens) each target saw, by full name (experts: those routed to
    them). `spill`: a folder where the blocks' inputs and outputs, and what the staged path holds between
    stages, are kept instead of memory (`core.activations`), one batch read at a time; each block's outputs go to `outputs-<prefix>` in it, and
    the files of a block's inputs are deleted once its outputs have been handed to `stream.offload`. `diagonal`:
    the solvers get only each Hessian's diagonal (see `calibrate_block`); `hessian_dtype`: what the Hessians are
    summed in (`core.hessian.Hessian`).
    """
    walk = _walk(
        model, blocks, batches, targets, [None], lambda _, *a: make_solver(*a), true_sequential, desc, False, stream,
        inputs, replay, rows, spill, diagonal, hessian_dtype,
    )  # fmt: skip
    for block, prefix, solved in walk:
        yield block, prefix, solved[None]


@torch.no_grad()
def calibrate_streams(
    model: nn.Module,
    blocks,
    batches: list[torch.Tensor],
    targets: dict[str, nn.Module],
    streams: list,
    make_solver: Callable[[Any, nn.Module, str, dict[str, nn.Module]], BlockSolver],
    true_sequential: bool = True,
    desc: str = "blocks",
    hessian_dtype: torch.dtype = torch.float32,
    stream=None,
    inputs=None,
    spill: str | os.PathLike | None = None,
) -> Iterator[tuple[nn.Module, str, dict[Any, dict[str, Any]]]]:
    """Several independent calibrations in one walk over the blocks: stream `s` calibrates each block with
    `make_solver(s, block, prefix, modules)` on its own inputs (the earlier blocks' outputs as stream `s` solved
    them), exactly as `calibrate_blocks` would alone. The targets' weights are put back after each stream, so
    the model ends as it began. Yields `(block, prefix, {stream: solved})` after each block with targets.

    The blocks are walked once (one onloading per block for every stream); each stream holds its own inputs.
    `stream`, `inputs` and `spill` as in `calibrate_blocks` (each stream's outputs in a folder of its own).
    """
    yield from _walk(
        model, blocks, batches, targets, streams, make_solver, true_sequential, desc, True, stream, inputs,
        spill=spill, hessian_dtype=hessian_dtype,
    )  # fmt: skip


def _walk(
    model, blocks, batches, targets, streams: list, make_solver, true_sequential: bool, desc: str, restore: bool,
    disk=None, first=None, replay: str = "all", rows: dict | None = None, spill=None, diagonal: bool = False,
    hessian_dtype: torch.dtype = torch.float32,
):  # fmt: skip
    prefixes = block_prefixes(model, blocks)
    if first is None:
        first = capture_block_inputs(model, blocks[0], batches)
    if spill is not None and not isinstance(first, SpilledActivations):
        first = SpilledActivations.spill(Path(spill) / f"{INPUTS}{prefixes[0]}", first)
    inputs = {stream: first for stream in streams}
    traces: dict[tuple, BlockTrace] = {}
    for block, prefix in zip(tqdm(blocks, desc=desc), prefixes, strict=True):
        if disk is not None:
            disk.onload(block, prefix)
        into = {stream: _outputs_store(spill, prefix, index, len(streams)) for index, stream in enumerate(streams)}
        before = dict(inputs)  # the dict is updated in place below
        modules = {n[len(prefix) + 1 :]: m for n, m in targets.items() if n.startswith(prefix + ".")}
        if not modules:
            inputs = {stream: run_block(block, x, into=into[stream]()) for stream, x in inputs.items()}
            if disk is not None:
                disk.offload(block, prefix, inputs[streams[0]] if len(streams) == 1 else None)
            _drop_spilled(before)
            continue
        # blocks of one stack can differ inside (T5's first block alone holds the relative position bias)
        key = (type(block), frozenset(modules), tuple(name for name, _ in block.named_modules()))
        if key not in traces:
            traces[key] = trace_block(block, prefix, [f"{prefix}.{n}" for n in modules], inputs[streams[0]][0])
        # put back after each stream: from memory, or read again from the checkpoint (a block's copy held less)
        keep = restore and disk is None
        originals = {n: linear_weight(m).detach().clone() for n, m in modules.items()} if keep else {}
        solved = {}
        reload = None if disk is None else functools.partial(disk.reload, block, prefix)
        seen = None if rows is None else {}
        for stream in streams:
            solve = make_solver(stream, block, prefix, modules)
            try:
                inputs[stream], solved[stream], _ = calibrate_block(
                    block, prefix, inputs[stream], modules, solve, true_sequential, traces[key], reload, replay, seen,
                    into[stream], None if spill is None else Path(spill) / f"{SCRATCH}{prefix}", diagonal, hessian_dtype,
                )  # fmt: skip
            finally:
                for name, weight in originals.items():
                    set_linear_weight(modules[name], weight, exact=True)
                if restore and disk is not None:
                    for module in modules.values():  # a solved layer may make its weight from codes
                        restore_weight(module)
                    disk.reload(block, prefix)
        if rows is not None:
            rows.update({f"{prefix}.{name}": count for name, count in seen.items()})
        yield block, prefix, solved
        if disk is not None:
            disk.offload(block, prefix, inputs[streams[0]] if len(streams) == 1 else None)
        _drop_spilled(before)
    _drop_spilled(inputs)  # the last block's outputs: no block reads them


def _outputs_store(spill, prefix: str, index: int, n_streams: int):
    """What makes the container of a block's outputs for stream number `index`: a list, or with `spill` a store
    on disk (one folder per stream when there are several)."""
    if spill is None:
        return list
    name = f"{OUTPUTS}{prefix}" if n_streams == 1 else f"{OUTPUTS}{prefix}.stream-{index}"
    return functools.partial(SpilledActivations, Path(spill) / name)


def _drop_spilled(inputs: dict) -> None:
    """Delete the files of spilled block inputs that have been used (the next block's are written)."""
    for x in inputs.values():
        if isinstance(x, SpilledActivations):
            x.remove()


def for_each_block_hessian(
    model: nn.Module,
    blocks,
    batches: list[torch.Tensor],
    targets: dict[str, nn.Module],
    process,
    desc: str,
    diagonal: bool = False,
    hessian_dtype: torch.dtype = torch.float32,
) -> None:
    """Block by block: the input Hessian of every target in the block, `process(block, name, module, H)` for
    each (`name` relative to the block), then the block's outputs, with whatever `process` changed, become the
    next block's inputs (the two-pass path: every Hessian of a block is taken before any change). `blocks` None:
    every stack that holds targets, one after the other (`stacks_holding`). `diagonal`: `H` is only the Hessian's
    diagonal, a vector (see `calibrate_block`); `hessian_dtype`: what it is summed in (`core.hessian.Hessian`)."""
    if blocks is None:
        for _, stack in stacks_holding(model, targets):
            for_each_block_hessian(model, stack, batches, targets, process, desc, diagonal, hessian_dtype)
        return

    def make_solver(block, prefix, modules):
        def solve(names, H):
            for name in names:
                process(block, name, modules[name], H)
            return {}

        return solve

    walk = calibrate_blocks(
        model, blocks, batches, targets, make_solver, true_sequential=False, desc=desc, diagonal=diagonal,
        hessian_dtype=hessian_dtype,
    )  # fmt: skip
    for _ in walk:
        pass
