"""A model's blocks put in memory from its checkpoint one at a time and taken out again: `BlockStream` writes each
finished block into the output folder's shards at once and frees it, `ReadingStream` only frees it.

    checkpoint = ShardedCheckpoint(path)
    model = checkpoint.skeleton()                    # no weights in memory
    stream = BlockStream(model, checkpoint, ShardWriter(folder, n_shards=len(blocks) + 1))
    for block, prefix, solved in calibrate_blocks(..., stream=stream): ...
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import barrier
from .experts import stored_state
from .memory import trim_heap
from .shard_writer import ShardWriter
from .streaming import ShardedCheckpoint, release, stored_names

__all__ = ["BlockStream", "ReadingStream"]


class BlockStream:
    """Onloads each block from `checkpoint` (floating tensors as `dtype`) before the block driver uses it, and
    once the caller is done with it writes it to `writer`'s shard of that block and frees it.
    `on_onload(block, prefix)` runs after each onload (to plan the block's layers), `before_write(block, prefix)`
    before each write (to cast what stayed dense to the checkpoint's dtype), `after_write(block, prefix, written,
    next_inputs)` after it (to record the progress of a resumable run). `start`: the shard index of the first
    block it is given (blocks a resumed run skips were written before)."""

    def __init__(
        self,
        model: nn.Module,
        checkpoint: ShardedCheckpoint,
        writer: ShardWriter,
        dtype: torch.dtype = torch.float32,
        on_onload=None,
        before_write=None,
        after_write=None,
        start: int = 0,
    ):
        self.model = model
        self.checkpoint = checkpoint
        self.writer = writer
        self.dtype = dtype
        self.on_onload = on_onload
        self.before_write = before_write
        self.after_write = after_write
        self.written = start

    def onload(self, block: nn.Module, prefix: str) -> None:
        self.checkpoint.materialize(self.model, stored_names(self.model, prefix), self.dtype)
        if self.on_onload is not None:
            self.on_onload(block, prefix)

    def reload(self, block: nn.Module, prefix: str) -> None:
        """Read the block's original weights again (after a calibration that changed them was abandoned)."""
        self.checkpoint.materialize(self.model, stored_names(self.model, prefix), self.dtype)

    def offload(self, block: nn.Module, prefix: str, next_inputs=None) -> None:
        """Write the finished block and free it; `next_inputs` are the next block's inputs (for `after_write`)."""
        if self.before_write is not None:
            self.before_write(block, prefix)
        self.writer.write(self.written, stored_state(block, prefix))
        self.written += 1
        if self.after_write is not None:
            self.after_write(block, prefix, self.written, next_inputs)
        # across processes, no rank drops this block's inputs before every rank saved its progress past it: a
        # rank that a kill leaves a block ahead can then step back to the others (`core.streamed_run`)
        barrier()
        release(block)
        trim_heap()  # otherwise the heap keeps about a block per block


class ReadingStream:
    """A `BlockStream` that writes nothing: onloads each block from `checkpoint` (floating tensors as `dtype`) and
    frees it when the caller is done, for passes that measure a model without changing its checkpoint."""

    def __init__(self, model: nn.Module, checkpoint: ShardedCheckpoint, dtype: torch.dtype = torch.float32):
        self.model = model
        self.checkpoint = checkpoint
        self.dtype = dtype

    def onload(self, block: nn.Module, prefix: str) -> None:
        self.checkpoint.materialize(self.model, stored_names(self.model, prefix), self.dtype)

    reload = onload

    def offload(self, block: nn.Module, prefix: str, next_inputs=None) -> None:
        release(block)
        trim_heap()
