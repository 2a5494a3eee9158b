"""GPTQ and round-to-nearest on a model streamed from disk (`core.streamed_run`): each block is read from the
checkpoint's shards in its stored dtype, quantized (GPTQ calibrates it on the previous blocks' outputs, exactly as
in memory, its maths in float32), written to the output folder's shard of that block at once and freed. Peak
memory is one block as stored and one batch of activations, whatever the depth and the number of calibration
tokens, except while the first block's inputs are captured (the embeddings and those inputs); the codes are those
of the in-memory run. Low-rank compensation keeps each layer's error factors on disk and adds the corrections to
the written shards once every block is done (`compensation_streaming`).
"""

from __future__ import annotations

import logging
import os

from torch import nn

from ..core.experts import expert_tokens
from ..core.streamed_run import StreamedTechnique, refuse_several_stacks, stream_compress
from ..core.streaming import release
from ..core.structure import linear_weight
from .api import attach_quantization_config, extend_read_manifest, replace_with_rtn, select_targets, stores_g_idx
from .compensated_linear import compensation_plan
from .compensation_streaming import correct_shards, save_factors
from .config import GPTQConfig, RTNConfig
from .gptq_blocks import quantize_blocks
from .grid import SCALE_TORCH_DTYPES
from .modules import QuantLinear
from .plan import plan_layers, sparsity_mask
from .sparse_quant import SparseQuantLinear

__all__ = ["SmoothingOnly", "UniformQuantization", "quantize_streaming", "reads_bitmask_layers"]

logger = logging.getLogger(__name__)


def quantize_streaming(
    model_path: str | os.PathLike,
    folder: str | os.PathLike,
    config: RTNConfig,
    tokenizer=None,
    task="causal-lm",
    resume: bool = False,
    format: str = "hfcompress",
) -> nn.Module:
    """Quantize the model at `model_path` (a local folder of safetensors shards) with `config` (`GPTQConfig` or
    `RTNConfig`) block by block from disk, writing its weights and config into `folder` as they are finished.

    Progress is kept in `folder` after every block; with `resume`, a run killed midway continues from its last
    written block (refused if the settings differ) and writes the same weights an uninterrupted run writes.
    Returns the model skeleton (every weight on the meta device) with its quantized layers and quantization
    config in place, for the compression record. Refuses a model that cannot stream (see `streaming_obstacle`).
    """
    return stream_compress(model_path, folder, UniformQuantization(config, tokenizer), task, resume, format)


def reads_bitmask_layers(config) -> bool:
    """Whether `config` quantizes a pruned model's bitmask layers read dense, zeros kept (`keep_sparsity`), as it
    does in memory: GPTQ and round-to-nearest."""
    return type(config) in (RTNConfig, GPTQConfig)


class UniformQuantization(StreamedTechnique):
    desc = "round-to-nearest blocks"

    def __init__(self, config: RTNConfig, tokenizer):
        super().__init__(config, tokenizer)
        self.scale_dtype = SCALE_TORCH_DTYPES[config.scale_dtype]
        self.plans = {}
        # low-rank compensation (`compensation_streaming`): the error factors of the block being written, each
        # layer's largest rank, the budget in parameters, the folder the factors are kept in, the ranks given
        self.errors, self.max_ranks, self.budget = None, None, 0
        self.folder = None
        self.ranks: dict[str, int] = {}
        self.rows: dict[str, int] = {}  # the calibration tokens each layer saw: what each expert saw, recorded

    @property
    def calibrated(self) -> bool:
        return isinstance(self.config, GPTQConfig)

    @property
    def reads_bitmask_layers(self) -> bool:
        return type(self) is UniformQuantization and reads_bitmask_layers(self.config)

    def targets(self, model):
        if self.reads_bitmask_layers:
            extend_read_manifest(model)
        targets = select_targets(model, self.config)
        self.plans = plan_layers(model, targets, self.config)
        if isinstance(self.config, GPTQConfig):  # GPTQ only: the AWQ subclass calibrates too, with no compensation
            refuse_several_stacks(model, targets, "GPTQ")
            self.errors, self.max_ranks, self.budget = compensation_plan(self.config, targets)
        return targets

    def compress_layer(self, model, name, module):
        replace_with_rtn(model, name, module, self.config, self.scale_dtype, self.plans[name])
        release(module)  # the float weight it replaced

    def compress_outside(self, model, targets):
        if targets and self.calibrated:
            logger.warning(
                "%d layers outside the block stack are quantized with round-to-nearest: %s", len(targets), list(targets)
            )
        for name, module in targets.items():
            replace_with_rtn(model, name, module, self.config, self.scale_dtype, self.plans[name])

    def compress_blocks(self, model, blocks, batches, targets, stream, inputs, folder):
        self.folder = folder
        # with every record on disk, replaying all settled submodules costs no memory and the least compute
        return quantize_blocks(
            model, blocks, batches, targets, self.config, self.scale_dtype, self.plans, stream, inputs, replay="all",
            errors=self.errors, max_ranks=self.max_ranks, spill=folder, rows=self.rows,
        )  # fmt: skip

    def onload(self, block, prefix, targets):
        if self.config.keep_sparsity:
            for name, module in targets.items():
                self.plans[name].mask = sparsity_mask(linear_weight(module))

    def before_write(self, block, prefix, targets):
        for name in targets:
            self.plans[name].mask = None  # a pruned layer's mask is in its bitmask now
        if self.errors is not None:  # on disk before the progress names the block written
            save_factors(self.folder, prefix, {name: self.errors.pop(name) for name in targets if name in self.errors})

    def layer_state(self, model, name):
        return getattr(model.get_submodule(name), "nnz", None)

    def written_layer(self, name, module, state, dtype):
        return _meta_layer(module, self.plans[name], self.config, self.scale_dtype, dtype, state)

    def complete(self, model, targets, writer, dtype):
        if self.errors is not None:
            shapes = {name: tuple(linear_weight(module).shape) for name, module in targets.items()}
            self.ranks = correct_shards(model, writer, shapes, self.budget, self.scale_dtype, dtype)

    def finish(self, model, targets):
        classes = sorted({type(m).__name__ for m in targets.values()})
        attach_quantization_config(model, self.config, self.plans, classes, self.ranks)
        if self.rows:  # a resumed run knows the blocks it calibrated itself
            model.hfcompress_expert_tokens = expert_tokens(model, self.rows)


class SmoothingOnly:
    """Put before a smoothing technique's streamed class (AWQ, SmoothQuant): its scales are folded as usual, but
    no layer is quantized and nothing is recorded, for a first pass whose output another run quantizes
    (`core.two_pass.stream_twice`)."""

    writes_plain_layers = True

    def compress_layer(self, model, name, module):
        pass

    def compress_outside(self, model, targets):
        pass

    def layer_state(self, model, name):
        return None

    def written_layer(self, name, module, state, dtype):
        return None

    def complete(self, model, targets, writer, dtype):
        pass

    def finish(self, model, targets):
        pass


def _meta_layer(module: nn.Module, plan, config: RTNConfig, scale_dtype, dtype, nnz: int | None) -> nn.Module:
    """The quantized layer `module` became, with its tensors on the meta device (its shape is what counts)."""
    out_features, in_features = linear_weight(module).shape
    options = dict(
        act_order=stores_g_idx(config), bias=getattr(module, "bias", None) is not None, scale_dtype=scale_dtype,
        dtype=dtype, device="meta",
    )  # fmt: skip
    if nnz is None:
        return QuantLinear(in_features, out_features, plan.bits, plan.group_size, config.sym, **options)
    return SparseQuantLinear(in_features, out_features, nnz, plan.bits, plan.group_size, config.sym, **options)
