"""W8A8 on a model streamed from disk (`core.streamed_run`): each block is read from the checkpoint's shards, run
on its inputs while SmoothQuant measures the input ranges (its outputs are the next block's inputs), smoothed,
its weights rounded to int8 per channel and made `Int8Linear`s, written to the output folder's shard of that
block and freed: the in-memory run's order (smoothing changes no output; rounding needs no data), so the
tensors are the same.

With GPTQ weights the run in memory smooths every block, then calibrates GPTQ on the smoothed model; streamed,
the smoothed model is written to a checkpoint inside the output folder, and GPTQ streams from it
(`core.two_pass.stream_twice`).
"""

from __future__ import annotations

import os

from torch import nn

from ..checkpoint import update_manifest
from ..core.streamed_run import StreamedTechnique, refuse_several_stacks, stream_compress
from ..core.structure import linear_weight, set_submodule
from ..core.two_pass import stream_twice
from .config import W8A8Config
from .int8_linear import Int8Linear
from .streaming import SmoothingOnly, UniformQuantization
from .w8a8 import ACTIVATIONS, smooth_block

__all__ = ["w8a8_streaming"]


def w8a8_streaming(
    model_path: str | os.PathLike,
    folder: str | os.PathLike,
    config: W8A8Config,
    tokenizer=None,
    task="causal-lm",
    resume: bool = False,
    format: str = "hfcompress",
) -> nn.Module:
    """`W8A8Config`, block by block from disk into `folder`; resumable and returning the model skeleton as
    `core.streamed_run.stream_compress` says."""
    if config.weights == "rtn":
        return stream_compress(model_path, folder, _W8A8(config, tokenizer), task, resume, format)
    if config.smoothquant == 0:
        return stream_compress(model_path, folder, _GPTQWeights(config, tokenizer), task, resume, format)
    smoothing = _Smoothing(config, tokenizer)
    return stream_twice(model_path, folder, smoothing, _GPTQWeights(config, tokenizer), task, resume, format)


class _W8A8(StreamedTechnique):
    """SmoothQuant per block; the int8 weights as `UniformQuantization` of `config.weight_config()` rounds them."""

    desc = "W8A8 blocks"

    def __init__(self, config: W8A8Config, tokenizer):
        super().__init__(config, tokenizer)
        self.weights = UniformQuantization(config.weight_config(), tokenizer)

    @property
    def calibrated(self) -> bool:
        return self.config.smoothquant > 0

    def targets(self, model):
        targets = self.weights.targets(model)
        if self.calibrated:
            refuse_several_stacks(model, targets, "SmoothQuant")
        return targets

    def compress_layer(self, model, name, module):
        self.weights.compress_layer(model, name, module)
        set_submodule(model, name, Int8Linear.from_quant_linear(model.get_submodule(name)))

    def compress_blocks(self, model, blocks, batches, targets, stream, inputs, folder):
        def prepare(block, prefix, inputs, modules, into):
            return smooth_block(block, prefix, inputs, list(modules), self.config, into=into)[0]

        return self.walk_one_pass(model, blocks, targets, stream, inputs, folder, prepare, "SmoothQuant blocks")

    def written_layer(self, name, module, state, dtype):
        return _meta_int8(module, self.weights.scale_dtype, dtype)

    def finish(self, model, targets):
        self.weights.finish(model, targets)
        update_manifest(model, method="w8a8", recipe=self.config.to_dict(), activations=dict(ACTIVATIONS))


class _Smoothing(SmoothingOnly, _W8A8):
    """SmoothQuant's scales folded, every layer left in float: the first pass of W8A8 with GPTQ weights."""


class _GPTQWeights(UniformQuantization):
    """GPTQ's int8 weights of the (smoothed) model, each layer then an `Int8Linear`, recorded as W8A8 (as the run
    in memory does)."""

    def __init__(self, config: W8A8Config, tokenizer):
        super().__init__(config.weight_config(), tokenizer)
        self.w8a8 = config

    def before_write(self, block, prefix, targets):
        super().before_write(block, prefix, targets)
        for name in targets:
            relative = name[len(prefix) + 1 :]
            set_submodule(block, relative, Int8Linear.from_quant_linear(block.get_submodule(relative)))

    def compress_outside(self, model, targets):
        super().compress_outside(model, targets)
        for name in targets:
            set_submodule(model, name, Int8Linear.from_quant_linear(model.get_submodule(name)))

    def written_layer(self, name, module, state, dtype):
        return _meta_int8(module, self.scale_dtype, dtype)

    def finish(self, model, targets):
        super().finish(model, targets)
        update_manifest(model, method="w8a8", recipe=self.w8a8.to_dict(), activations=dict(ACTIVATIONS))


def _meta_int8(module: nn.Module, scale_dtype, dtype) -> Int8Linear:
    """The `Int8Linear` that `module` became, with its tensors on the meta device."""
    out_features, in_features = linear_weight(module).shape
    return Int8Linear(
        in_features, out_features, bias=getattr(module, "bias", None) is not None, scale_dtype=scale_dtype,
        dtype=dtype, device="meta",
    )  # fmt: skip
