"""One-shot pruning (magnitude, Wanda, SparseGPT) on a model streamed from disk (`core.streamed_run`): each block
is read from the checkpoint's shards, pruned (Wanda and SparseGPT on the previous pruned blocks' outputs, both
passes of the in-memory run: every Hessian of a block before any change), stored as bitmask + values where asked,
written to its shard and freed. The weights written are those of the in-memory run."""

from __future__ import annotations

import logging
import os

from torch import nn

from ..checkpoint import update_manifest
from ..core.streamed_run import StreamedTechnique, refuse_several_stacks, stream_compress
from ..core.structure import find_layer_stack, linear_weight, set_linear_weight
from .oneshot import group_pruner, prune_weight, pruning_targets
from .oneshot_config import OneShotPruningConfig
from .sparse import SparseLinear, record_sparse, sparsify_linears

__all__ = ["prune_streaming"]

logger = logging.getLogger(__name__)


def prune_streaming(
    model_path: str | os.PathLike,
    folder: str | os.PathLike,
    config: OneShotPruningConfig,
    tokenizer=None,
    task: str = "causal-lm",
    resume: bool = False,
    storage: str = "bitmask",
) -> nn.Module:
    """Prune the model at `model_path` (a local folder of safetensors shards) as `config` says, block by block from
    disk, writing its weights and config into `folder` as they are finished (`storage`: "bitmask" stores the
    pruned layers as bitmask + values, "dense" as weights with zeros). Resumable as `stream_compress` says;
    returns the model skeleton for the compression record."""
    if storage not in ("bitmask", "dense"):
        raise ValueError(f"`storage` must be 'bitmask' or 'dense', got {storage!r}")
    return stream_compress(model_path, folder, _Pruning(config, tokenizer, storage == "bitmask"), task, resume)


class _Pruning(StreamedTechnique):
    def __init__(self, config: OneShotPruningConfig, tokenizer, bitmask: bool):
        super().__init__(config, tokenizer)
        self.bitmask = bitmask
        self.desc = f"prune ({config.method})"
        self.stack = ""

    @property
    def calibrated(self) -> bool:
        return self.config.method != "magnitude"

    @property
    def writes_plain_layers(self) -> bool:
        return not self.bitmask

    def targets(self, model):
        targets = pruning_targets(model, self.config)
        self.stack, _ = find_layer_stack(model)
        if self.calibrated:
            refuse_several_stacks(model, targets, self.config.method)
        return targets

    def compress_layer(self, model, name, module):
        set_linear_weight(module, prune_weight(linear_weight(module), None, self.config))

    def compress_outside(self, model, targets):
        if self.calibrated:
            if targets:
                logger.warning(
                    "%d layers outside the block stack have no calibration data and stay dense: %s",
                    len(targets), list(targets),
                )  # fmt: skip
        else:
            super().compress_outside(model, targets)
        if self.bitmask:  # the blocks were stored as they were written
            sparsify_linears(model, skip=self.stack)

    def compress_blocks(self, model, blocks, batches, targets, stream, inputs, folder):
        def make_solver(block, prefix, modules):
            return group_pruner(modules, self.config)

        return self.walk_two_pass(
            model, blocks, batches, targets, stream, inputs, folder, make_solver, self.desc,
            diagonal=self.config.method == "wanda",
        )  # fmt: skip

    def before_write(self, block, prefix, targets):
        if self.bitmask:
            sparsify_linears(block, prefix=prefix)

    def layer_state(self, model, name):
        module = model.get_submodule(name)
        return module.nnz if isinstance(module, SparseLinear) else None

    def written_layer(self, name, module, state, dtype):
        if state is None:
            return None
        out_features, in_features = linear_weight(module).shape
        return SparseLinear(in_features, out_features, state, module.bias is not None, dtype=dtype, device="meta")

    def finish(self, model, targets):
        update_manifest(model, "oneshot", pruning=self.config.to_dict())
        if self.bitmask:
            sparse = {name: m.nnz for name, m in model.named_modules() if isinstance(m, SparseLinear)}
            record_sparse(model, sparse)
