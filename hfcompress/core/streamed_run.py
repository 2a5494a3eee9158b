"""One compression run on a model streamed from disk, whatever the technique: the model is a skeleton on the meta
device; each block is read from the checkpoint's shards in its stored dtype, compressed (a calibrated technique
sees the previous blocks' outputs as they were compressed, exactly as in memory), written to the output folder's
shard of that block at once and freed. A block's calibration activations are kept on disk in the output folder and
read back one batch at a time (`core.activations`). What lies outside the block stack is compressed last and
written to the last shard. Progress is kept after every block, so a killed run continues with `resume`.

A technique says what it does through a `StreamedTechnique`:

    class Pruning(StreamedTechnique):
        def targets(self, model): ...                    # the layers it compresses
        def compress_layer(self, model, name, module): ...    # one layer with no calibration
        def compress_blocks(self, model, blocks, ...): ...    # or every block, calibrated (`core.walk`)
        def complete(self, model, targets, writer, dtype): ...  # optional: what needs every block, at the end

    model = stream_compress(path, folder, Pruning(config, tokenizer), task, resume)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..data import calibration_data
from .activations import INPUTS, OUTPUTS, SpilledActivations, check_spill_space
from .block_stream import BlockStream
from .capture import BlockInputs, capture_block_inputs, with_hidden_states
from .distributed import extremes, is_main, world_size
from .experts import unfuse_experts
from .memory import release_large_frees
from .resume import RunProgress, settings_digest
from .shard_writer import DroppedShards, ShardWriter
from .stored_layout import SavedNames
from .streaming import (
    ShardedCheckpoint,
    output_names,
    release,
    stored_names,
    tied_keys,
)
from .structure import cast_unquantized, find_layer_stack, set_submodule
from .walk import block_prefixes, calibrate_blocks, stacks_holding

__all__ = [
    "LARGE_BLOCK",
    "StreamedTechnique",
    "capture_first_inputs",
    "free_large_allocations_for",
    "refuse_several_stacks",
    "stored_outside",
    "stream_compress",
]

logger = logging.getLogger(__name__)

# blocks of at least this many bytes in float32 make glibc return every freed allocation of a megabyte or more at
# once (`core.memory.release_large_frees`): 9% slower on a 1.47B Llama (0.8 GB blocks) and 12% less memory; on
# small blocks only slower
LARGE_BLOCK = 256 << 20


class StreamedTechnique:
    """What `stream_compress` asks of a technique. `calibrated` techniques implement `compress_blocks` (their
    batches are `config`'s calibration set, read with `tokenizer`); the others `compress_layer`, which also serves
    the layers outside the block stack."""

    desc = "blocks"  # the progress bar of a run without calibration
    # whether layers an hfcompress checkpoint stores as bitmask + values are read as dense linears to compress
    # again (`ShardedCheckpoint.skeleton(dense_bitmask=True)`); otherwise such a checkpoint is refused
    reads_bitmask_layers = False
    # whether the targets are written as plain linears (pruned weights stored dense, a smoothing pass): experts
    # left so are written as `save_pretrained` writes a model's fused experts, not held as linears
    writes_plain_layers = False

    def __init__(self, config, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer

    @property
    def calibrated(self) -> bool:
        return False

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers the run compresses, by full name (refusing a model it cannot compress, before any work)."""
        raise NotImplementedError

    def calibration_data(self, model: nn.Module) -> list[torch.Tensor]:
        """The calibration batches of token ids."""
        return calibration_data(model, self.config, self.tokenizer)

    def compress_layer(self, model: nn.Module, name: str, module: nn.Module) -> None:
        """Compress one target with no calibration (in place, or by `set_submodule`, releasing the weight it
        replaced: `core.streaming.release`)."""
        raise NotImplementedError

    def compress_outside(self, model: nn.Module, targets: dict[str, nn.Module]) -> None:
        """The targets outside the block stack, loaded (default: `compress_layer` on each)."""
        for name, module in targets.items():
            self.compress_layer(model, name, module)

    def compress_blocks(
        self, model: nn.Module, blocks: list, batches, targets: dict, stream: BlockStream, inputs, folder: Path
    ) -> set[str]:
        """Calibrate and compress the targets of `blocks` on the block driver (`core.walk.calibrate_blocks` with
        `stream`, `inputs` as the first block's inputs, `folder` to spill to); returns the names compressed."""
        raise NotImplementedError

    def walk_two_pass(
        self, model, blocks, batches, targets: dict, stream: BlockStream, inputs, folder: Path, make_solver, desc: str,
        after_block=None, diagonal: bool = False,
    ) -> set[str]:  # fmt: skip
        """`compress_blocks` for a technique that, in memory too, takes every Hessian of a block before changing
        any of its layers (`core.walk.calibrate_blocks` without `true_sequential`): `make_solver` and `diagonal`
        as there, the Hessians summed in the config's `hessian_dtype`; `after_block(block, prefix, solved)` runs
        before each block is written. Returns the targets walked."""
        walk = calibrate_blocks(
            model, blocks, batches, targets, make_solver, true_sequential=False, desc=desc, stream=stream,
            inputs=inputs, spill=folder, diagonal=diagonal, hessian_dtype=getattr(torch, self.config.hessian_dtype),
        )  # fmt: skip
        done = set()
        for block, prefix, solved in walk:
            if after_block is not None:
                after_block(block, prefix, solved)
            done |= set(_in_block(targets, prefix))
        return done

    def walk_one_pass(
        self, model, blocks, targets: dict, stream: BlockStream, inputs, folder: Path, prepare, desc: str
    ):
        """`compress_blocks` for a technique that changes each block on its inputs (scales folded, weights
        clipped), takes the next block's inputs from it, then compresses the block's targets with no more data
        (`compress_layer`). `prepare(block, prefix, inputs, modules, into)` changes the block (`modules`: its
        targets by name relative to it, possibly none) and returns its outputs, appended to `into` (kept on disk
        in `folder`). Returns the targets compressed."""
        done = set()
        for block, prefix in zip(tqdm(blocks, desc=desc), block_prefixes(model, blocks), strict=True):
            stream.onload(block, prefix)
            in_block = _in_block(targets, prefix)
            modules = {n[len(prefix) + 1 :]: m for n, m in in_block.items()}
            outputs = prepare(block, prefix, inputs, modules, SpilledActivations(folder / f"{OUTPUTS}{prefix}"))
            for name, module in in_block.items():
                self.compress_layer(model, name, module)
                done.add(name)
            stream.offload(block, prefix, outputs)
            inputs.remove()
            inputs = outputs
        inputs.remove()  # the last block's outputs: no block reads them
        return done

    def onload(self, block: nn.Module, prefix: str, targets: dict[str, nn.Module]) -> None:
        """After a block is read, before it is used; `targets`: its targets by full name."""

    def before_write(self, block: nn.Module, prefix: str, targets: dict[str, nn.Module]) -> None:
        """After a block is compressed, before it is written."""

    def layer_state(self, model: nn.Module, name: str) -> Any:
        """What a resumed run needs to know of the written layer `name` (JSON-able) to rebuild its shape."""
        return None

    def written_layer(self, name: str, module: nn.Module, state: Any, dtype: torch.dtype) -> nn.Module | None:
        """The layer `module` became, on the meta device, from its `layer_state` (None: it stays as it is)."""
        return None

    def complete(self, model: nn.Module, targets: dict[str, nn.Module], writer: ShardWriter, dtype: torch.dtype):
        """After every shard is written, before the index that lists them: a technique whose result depends on all
        blocks at once (low-rank compensation's ranks, allocated over every layer) rewrites the shards here
        (`dtype`: the checkpoint's, which what stays uncompressed is written in). It runs again in full when a
        run killed during it is resumed, so a shard it already rewrote must come out the same."""

    def finish(self, model: nn.Module, targets: dict[str, nn.Module]) -> None:
        """Record what was done in `model`'s config (the skeleton, every block written)."""


def free_large_allocations_for(blocks) -> None:
    """For blocks of `LARGE_BLOCK` bytes or more in float32, memory over allocation speed: glibc returns every
    freed allocation of a megabyte or more at once, where the heap's fragments would cost a block's worth."""
    if 4 * sum(p.numel() for p in blocks[0].parameters()) >= LARGE_BLOCK:
        release_large_frees()


def stored_outside(model: nn.Module, prefixes: list[str]) -> list[str]:
    """The stored tensors of `model` outside the blocks named `prefixes` (embeddings, final norm, output layer)."""
    return [n for n in stored_names(model) if not any(n.startswith(p + ".") for p in prefixes)]


def capture_first_inputs(model, checkpoint, first_block, outside: list[str], batches, into, dtype):
    """The first block's inputs for `batches`, appended to `into`: what runs before the stack (the tensors of
    `outside` but the output layer's) is read from `checkpoint`, run, and freed again."""
    head = output_names(model)
    checkpoint.materialize(model, [n for n in outside if n not in head], dtype)
    inputs = capture_block_inputs(model, first_block, batches, into=into)
    release(model)  # the embeddings are not needed again until they are written
    return inputs


@torch.no_grad()
def stream_compress(
    model_path: str | os.PathLike,
    folder: str | os.PathLike,
    technique: StreamedTechnique,
    task: str = "causal-lm",
    resume: bool = False,
    format: str = "hfcompress",
) -> nn.Module:
    """Compress the model at `model_path` (a local folder of safetensors shards) with `technique` block by block
    from disk, writing its weights and config into `folder` as they are finished.

    Progress is kept in `folder` after every block; with `resume`, a run killed midway continues from its last
    written block (refused if the settings differ) and writes the same weights an uninterrupted run writes.
    Across processes (`core.distributed`) every rank streams the model and calibrates on its share of the batches,
    keeping its activations in its own `folder`; rank 0 alone writes the shards.
    Returns the model skeleton (every weight on the meta device) with its compressed layers and config in place,
    for the compression record. Refuses a model that cannot stream (see `core.streaming.streaming_obstacle`) and
    settings that cannot (`CompressionConfig.streaming_obstacle`), and a `format` other than "hfcompress" (the
    shards are written as each block is finished, in hfcompress's layout).
    """
    obstacle = settings_obstacle(technique.config, format)
    if obstacle is not None:
        raise ValueError(obstacle)
    checkpoint = ShardedCheckpoint(model_path)
    save_dtype = checkpoint.stored_dtype()
    # the maths run in float32 (`core.precision`)
    model = checkpoint.skeleton(task, save_dtype, dense_bitmask=technique.reads_bitmask_layers)
    unfused = unfuse_experts(model)
    if unfused:  # as in memory (`core.experts.run_on_expert_linears`); read expert by expert
        logger.info("mixture-of-experts layers held as one linear per expert")
    _, blocks = find_layer_stack(model)
    free_large_allocations_for(blocks)
    targets = technique.targets(model)
    # experts with compressed linears (`<experts>.gate_up_proj.3`) keep the model's names, as in memory
    # (`core.experts.keep_checkpoint_names`); otherwise the files take `save_pretrained`'s names and layout
    compressed = {} if technique.writes_plain_layers else targets
    holds_experts = bool({name.rsplit(".", 2)[0] for name in compressed} & set(unfused))
    prefixes = block_prefixes(model, blocks)
    batches = technique.calibration_data(model) if technique.calibrated else None
    if batches is not None:
        text = model.config.get_text_config()
        hidden = text.hidden_size
        # across processes every rank spills its share beside the others (`steps.compress`): room for all of them
        tokens = sum(b.numel() for b in batches) * world_size()
        check_spill_space(folder, tokens, hidden, getattr(text, "intermediate_size", 4 * hidden))

    settings = {
        "model": os.path.abspath(model_path),
        "config": technique.config.to_dict(),
        "calibration": None if batches is None else settings_digest(batches),
        "blocks": len(blocks),
    }
    if world_size() > 1:  # each rank resumes its own share
        settings["processes"] = world_size()
    progress = RunProgress(folder, settings)
    state = progress.load() if resume else None
    state = _agreed(progress, state, prefixes, batches is not None)
    start = state["blocks_done"] if state else 0
    layers: dict[str, Any] = dict(state["layers"]) if state else {}
    done = set()
    for name, layer in layers.items():  # written by the run that is resumed: only their shape is needed here
        written = technique.written_layer(name, targets[name], layer, save_dtype)
        if written is not None:
            set_submodule(model, name, written)
        done.add(name)
    if start:
        logger.info("resuming: %d of %d blocks were written by the run that stopped", start, len(blocks))

    def record_progress(block: nn.Module, prefix: str, written: int, next_inputs) -> None:
        for name, module in _in_block(targets, prefix).items():
            layers[name] = technique.layer_state(model, name)
            release(module)  # a target swapped for its compressed form is no longer in the block released next
        progress.save(written, layers, next_inputs)

    def before_write(block: nn.Module, prefix: str) -> None:
        technique.before_write(block, prefix, _in_block(targets, prefix))
        cast_unquantized(block, save_dtype)

    stream = BlockStream(
        model,
        checkpoint,
        (ShardWriter if is_main() else DroppedShards)(
            folder, n_shards=len(blocks) + 1, names=None if holds_experts else SavedNames.of(model)
        ),
        dtype=save_dtype,
        on_onload=lambda block, prefix: technique.onload(block, prefix, _in_block(targets, prefix)),
        before_write=before_write,
        after_write=record_progress,
        start=start,
    )
    outside = stored_outside(model, prefixes)
    todo = blocks[start:]
    if batches is not None and len(todo):
        inputs = _first_inputs(model, checkpoint, blocks[0], prefixes[0], outside, batches, progress, start, save_dtype)
        done |= technique.compress_blocks(model, todo, batches, targets, stream, inputs, Path(folder))
    elif len(todo):
        for block, prefix in zip(tqdm(todo, desc=technique.desc), prefixes[start:], strict=True):
            stream.onload(block, prefix)
            for name, module in _in_block(targets, prefix).items():
                technique.compress_layer(model, name, module)
                done.add(name)
            stream.offload(block, prefix)

    # what lies outside the stack, written to the last shard
    checkpoint.materialize(model, outside, save_dtype)
    model.tie_weights()  # the output layer's tied weight is not stored under its own name
    technique.compress_outside(model, {n: m for n, m in targets.items() if n not in done})
    cast_unquantized(model, save_dtype)
    skip = tied_keys(model)
    tensors = {n: t for n, t in model.state_dict().items() if not any(n.startswith(p + ".") for p in prefixes)}
    stream.writer.write(len(blocks), {n: t for n, t in tensors.items() if n not in skip})
    release(model)
    model.tie_weights()  # loading and releasing untie what the config ties; the record counts tied weights once
    if is_main():  # what rewrites the shards reads them back: rank 0's
        technique.complete(model, targets, stream.writer, save_dtype)
    stream.writer.finish()

    technique.finish(model, targets)
    model.config.save_pretrained(folder)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    progress.clear()
    logger.info("streamed %d blocks from %s into %s", len(blocks), model_path, Path(folder))
    return model


def settings_obstacle(config, format: str = "hfcompress") -> str | None:
    """Why `config` written as `format` cannot stream from disk, or None: the config's own
    `streaming_obstacle`, or a format other than hfcompress (the shards are written block by block)."""
    obstacle = config.streaming_obstacle()
    if obstacle is None and format != "hfcompress":
        obstacle = (
            f"a streamed run writes format hfcompress only, got {format!r} (`export_compressed_tensors` rewrites its "
            "folder shard by shard, as `hfcompress quantize ... --offload disk --format compressed-tensors` does)"
        )
    return obstacle


def refuse_several_stacks(model: nn.Module, targets: dict[str, nn.Module], method: str) -> None:
    """Refuse, before any work, targets to calibrate in more than one stack of blocks (an encoder-decoder's
    encoder and decoder): a streamed run walks one."""
    stacks = [prefix for prefix, _ in stacks_holding(model, targets)]
    if len(stacks) > 1:
        raise ValueError(
            f"--offload disk calibrates one stack of blocks; {type(model).__name__} has {len(stacks)} holding layers "
            f"{method} changes ({', '.join(stacks)}): run it without --offload disk"
        )


def _agreed(progress: RunProgress, state: dict | None, prefixes: list[str], calibrated: bool) -> dict | None:
    """Across processes, the progress every rank resumes from: each saves its own after every block, so a kill can
    leave a rank one block ahead of another; that rank steps back (the inputs it needs are kept until every rank
    has saved past them)."""
    if world_size() == 1:
        return state
    done = state["blocks_done"] if state else 0
    low, high = extremes(done)
    if high - low > 1:
        raise ValueError(f"cannot resume: the ranks' progress is {low} to {high} blocks, more than one block apart")
    if state is not None and done > low:
        state = progress.step_back(state, prefixes[low], calibrated)
        if state is None and low:  # kept until every rank saved past them: not seen unless files were removed
            raise ValueError(f"cannot resume: this rank's inputs of block {low} are gone; run again without --resume")
    return state


def _first_inputs(
    model, checkpoint, first_block, prefix: str, outside: list[str], batches, progress, start: int, dtype
) -> list[BlockInputs] | SpilledActivations:
    """The inputs of the first block still to do: captured from `batches` through what runs before the stack
    (everything outside it but the output layer), kept on disk beside the progress that names them; for a resumed
    run, those an earlier run kept, with their other arguments (position embeddings, masks) recomputed."""
    if start:  # only the other arguments are recomputed: holding every hidden state would cost what spilling saved
        others = capture_first_inputs(model, checkpoint, first_block, outside, batches, _OtherArguments(), dtype)
        return progress.next_inputs(others)
    spilled = SpilledActivations(progress.folder / f"{INPUTS}{prefix}")
    return capture_first_inputs(model, checkpoint, first_block, outside, batches, spilled, dtype)


class _OtherArguments(list):
    """Block inputs collected without their hidden states."""

    def append(self, item: BlockInputs) -> None:
        super().append(with_hidden_states(item, None))


def _in_block(targets: dict[str, nn.Module], prefix: str) -> dict[str, nn.Module]:
    return {n: m for n, m in targets.items() if n.startswith(prefix + ".")}
