"""AWQ on a model streamed from disk (`core.streamed_run`): each block is read from the checkpoint's shards,
smoothed on its inputs (`awq_blocks.smooth_block`: scales folded into the producers, clipping), run to give the
next block's inputs, rounded to nearest, written to the output folder's shard of that block and freed. That is
the order of the in-memory run (every block smoothed on the float model's activations, then round-to-nearest,
which needs no data), so the codes are the same. The inputs and outputs of each block are kept on disk.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn
from transformers.utils.logging import tqdm

from ..core.activations import OUTPUTS, SpilledActivations
from ..core.capture import run_block
from ..core.streamed_run import refuse_several_stacks, stream_compress
from ..core.walk import block_prefixes
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
    if format != "hfcompress":
        raise ValueError(f"--offload disk writes format hfcompress only, got --format {format}")
    return stream_compress(model_path, folder, _AWQ(config, tokenizer), task, resume)


class _AWQ(UniformQuantization):
    @property
    def calibrated(self) -> bool:
        return True

    def targets(self, model):
        targets = super().targets(model)
        refuse_several_stacks(model, targets, "AWQ")
        return targets

    def compress_blocks(self, model, blocks, batches, targets, stream, inputs, folder):
        done = set()
        for block, prefix in zip(tqdm(blocks, desc="AWQ blocks"), block_prefixes(model, blocks), strict=True):
            stream.onload(block, prefix)
            in_block = {n: m for n, m in targets.items() if n.startswith(prefix + ".")}
            if in_block:
                smooth_block(block, prefix, inputs, {n[len(prefix) + 1 :]: m for n, m in in_block.items()}, self.config)
            outputs = run_block(block, inputs, into=SpilledActivations(Path(folder) / f"{OUTPUTS}{prefix}"))
            for name, module in in_block.items():
                self.compress_layer(model, name, module)
                done.add(name)
            stream.offload(block, prefix, outputs)
            inputs.remove()
            inputs = outputs
        inputs.remove()  # the last block's outputs: no block reads them
        return done
