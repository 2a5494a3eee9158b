"""AWQ on a model streamed from disk (`core.streamed_run`): each block is read from the checkpoint's shards,
smoothed on its inputs (`awq_blocks.smooth_block`: scales folded into the producers, clipping), run to give the
next block's inputs, rounded to nearest, written to the output folder's shard of that block and freed. That is
the order of the in-memory run (every block smoothed on the float model's activations, then round-to-nearest,
which needs no data), so the codes are the same. The inputs and outputs of each block are kept on disk.

With GPTQ weights the run in memory smooths every block, then calibrates GPTQ on the smoothed model; streamed,
the smoothed model is written to a checkpoint inside the output folder, and GPTQ streams from it
(`core.two_pass.stream_twice`).
"""

from __future__ import annotations

import os

from torch import nn

from ..checkpoint import update_manifest
from ..core.capture import run_block
from ..core.streamed_run import refuse_several_stacks, stream_compress
from ..core.two_pass import stream_twice
from .awq_blocks import smooth_block
from .config import AWQConfig
from .streaming import SmoothingOnly, UniformQuantization

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
    """`AWQConfig`, block by block from disk into `folder`; resumable and returning the model skeleton as
    `core.streamed_run.stream_compress` says."""
    if config.weights == "rtn":
        return stream_compress(model_path, folder, _AWQ(config, tokenizer), task, resume, format)
    smoothing = _Smoothing(config, tokenizer)
    return stream_twice(model_path, folder, smoothing, _GPTQAfterAWQ(config, tokenizer), task, resume, format)


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


class _Smoothing(SmoothingOnly, _AWQ):
    """AWQ's scales folded, every layer left in float: the first pass of AWQ with GPTQ weights."""


class _GPTQAfterAWQ(UniformQuantization):
    """GPTQ on the smoothed model, recorded as AWQ (as the run in memory records it)."""

    def __init__(self, config: AWQConfig, tokenizer):
        super().__init__(config.gptq_config(), tokenizer)
        self.awq = config

    def finish(self, model, targets):
        super().finish(model, targets)
        update_manifest(model, method="awq", recipe=self.awq.to_dict())
