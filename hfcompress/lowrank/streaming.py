"""Low-rank factorization on a model streamed from disk (`core.streamed_run`): each block is read from the
checkpoint's shards, its layers factorized (plain SVD with no data; ASVD and whitening on the Gram matrices of the
block's inputs, which are the previous factorized blocks' outputs, or the original blocks' with `sequential=False`,
as in memory), written to its shard and freed. The factors written are those of the in-memory run.

Ranks chosen by sensitivity (`allocation="sensitivity"` with `param_ratio`) are refused: measuring them truncates
each layer in turn and runs the rest of the model after it, which needs the whole model in memory."""

from __future__ import annotations

import logging
import os

from torch import nn

from ..core.streamed_run import StreamedTechnique, stream_compress
from ..core.streaming import release
from ..core.structure import find_layer_stack, linear_weight
from .config import LowRankConfig
from .factorization import (
    attach_lowrank_config,
    final_rank,
    planned_ranks,
    refuse_compressed,
    replace_with_factors,
    select_lowrank_targets,
)
from .modules import FactorizedLinear
from .svd import decompose

__all__ = ["factorize_streaming"]

logger = logging.getLogger(__name__)


def factorize_streaming(
    model_path: str | os.PathLike,
    folder: str | os.PathLike,
    config: LowRankConfig,
    tokenizer=None,
    task: str = "causal-lm",
    resume: bool = False,
) -> nn.Module:
    """Factorize the model at `model_path` (a local folder of safetensors shards) as `config` says, block by block
    from disk, writing its weights and config into `folder` as they are finished. Resumable as `stream_compress`
    says; returns the model skeleton for the compression record."""
    return stream_compress(model_path, folder, _Factorization(config, tokenizer), task, resume)


class _Factorization(StreamedTechnique):
    desc = "SVD"

    def __init__(self, config: LowRankConfig, tokenizer):
        super().__init__(config, tokenizer)
        self.shapes: dict[str, tuple[int, int]] = {}
        self.planned: dict[str, int | None] = {}

    @property
    def calibrated(self) -> bool:
        return self.config.needs_data

    def targets(self, model):
        refuse_compressed(model)  # the skeleton holds the factorized layers of a factorized checkpoint
        targets = select_lowrank_targets(model, self.config)
        if self.calibrated:  # as in memory: what lies outside the stack has no statistics and stays dense
            stack, _ = find_layer_stack(model)
            targets = {n: m for n, m in targets.items() if n.startswith(stack + ".")}
        self.shapes = {name: tuple(linear_weight(m).shape) for name, m in targets.items()}
        self.planned = planned_ranks(self.shapes, self.config)
        return targets

    def compress_layer(self, model, name, module):
        if name in self.planned and self.planned[name] is None:
            return
        decomposition = decompose(linear_weight(module), "svd")
        rank = final_rank(name, decomposition, self.shapes[name], self.planned, self.config)
        if rank is not None:
            replace_with_factors(model, name, module, decomposition, rank)
            release(module)

    def compress_blocks(self, model, blocks, batches, targets, stream, inputs, folder):
        config = self.config
        targets = {n: m for n, m in targets.items() if self.planned.get(n, 0) is not None}

        def make_solver(block, prefix, modules):
            def solve(names, H):
                factorized = {}
                for name in names:
                    module = modules[name]
                    full_name = f"{prefix}.{name}"
                    decomposition = decompose(
                        linear_weight(module),
                        config.method,
                        H,
                        config.alpha,
                        config.damp_percent,
                        self.planned.get(full_name),  # a rank known already: only its vectors are kept
                    )
                    rank = final_rank(full_name, decomposition, self.shapes[full_name], self.planned, config)
                    if rank is not None and config.sequential:  # the block's outputs come from factorized layers
                        replace_with_factors(block, name, module, decomposition, rank)
                        release(module)  # the dense weight it replaced
                    elif rank is not None:  # from its original layers: factorized once its outputs are taken
                        factorized[name] = (module, decomposition, rank)
                    # not held through the next layer's decomposition (a whitener alone is 0.13 GB at 4096 inputs)
                    del decomposition
                return factorized

            return solve

        def replace_solved(block, prefix, factorized):
            for name, (module, decomposition, rank) in factorized.items():
                replace_with_factors(block, name, module, decomposition, rank)
                release(module)

        desc = f"factorize ({config.method})"
        return self.walk_two_pass(
            model, blocks, batches, targets, stream, inputs, folder, make_solver, desc, replace_solved
        )

    def layer_state(self, model, name):
        module = model.get_submodule(name)
        return module.rank if isinstance(module, FactorizedLinear) else None

    def written_layer(self, name, module, state, dtype):
        if state is None:
            return None
        out_features, in_features = self.shapes[name]
        return FactorizedLinear(in_features, out_features, state, module.bias is not None, dtype=dtype, device="meta")

    def finish(self, model, targets):
        ranks = {name: m.rank for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}
        if not ranks:
            logger.warning("no layer was factorized: at the requested target none would hold fewer parameters")
        attach_lowrank_config(model, self.config, ranks)
