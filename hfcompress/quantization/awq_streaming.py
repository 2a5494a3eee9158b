"""AWQ on a model streamed from disk (`core.streamed_run`): each block is read from the checkpoint's shards,
smoothed on its inputs (`awq_blocks.smooth_block`: scales folded into the producers, clipping), run to give the
next block's inputs, rounded to nearest, written to the output folder's shard of that block and freed. That is
the order of the in-memory run (every block smoothed on the float model's activations, then round-to-nearest,
which needs no data), so the codes are the same. The inputs and outputs of each block are kept on disk.
"""

from __future__ import annotations

import os

from torch import nn

from ..core.capture import run_block
from ..core.streamed_run import refuse_several_stacks, stream_compress
from .awq_blocks import smooth_block
from .config import AWQConfig
from .streaming import UniformQuantization

__all__ = ["awq_streaming"]


def awq_streaming(
    model_path: str | os.PathLike,
    folder: str | os.PathLike,
    config: AWQConfig,
    tokenizer=None,
    task="causal-lm",
    resume: bool = False,
    format: str = "hfcompress",
) -> nn.Module:
    """`AWQConfig` with round-to-nearest weights, block by block from disk into `folder`; resumable and returning
    the model skeleton as `core.streamed_run.stream_compress` says."""
    return stream_compress(model_path, folder, _AWQ(config, tokenizer), task, resume, format)


class _AWQ(UniformQuantization):
    @property
    def calibrated(self) -> bool:
        return True

    def targets(self, model):
        targets = super().targets(model)
        refuse_several_stacks(model, targets, "AWQ")
        return targets

    def compress_blocks(self, model, blocks, batches, targets, stream, inputs, folder):
        def prepare(block, prefix, inputs, modules, into):
            if modules:
                smooth_block(block, prefix, inputs, modules, self.config)
            return run_block(block, inputs, into=into)

        return self.walk_one_pass(model, blocks, targets, stream, inputs, folder, prepare, "AWQ blocks")
