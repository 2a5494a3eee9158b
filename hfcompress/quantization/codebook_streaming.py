"""k-means and VQ codebooks on a model streamed from disk (`core.streamed_run`): each block is read from the
checkpoint's shards, its layers encoded (with calibration data, each input weighted by the Hessian's diagonal on
the previous encoded blocks' outputs, both passes of the in-memory run), written to its shard and freed. The codes
and codebooks written are those of the in-memory run."""

from __future__ import annotations

import os

from torch import nn

from ..core.streamed_run import StreamedTechnique, refuse_several_stacks, stream_compress
from ..core.streaming import release
from ..core.structure import linear_weight, set_submodule
from .codebook_api import attach_codebooks, codebook_record, codebook_targets, encode_layer
from .codebook_config import KMeansConfig, VQConfig
from .codebook_linear import CodebookLinear

__all__ = ["quantize_codebook_streaming"]


def quantize_codebook_streaming(
    model_path: str | os.PathLike,
    folder: str | os.PathLike,
    config: KMeansConfig | VQConfig,
    tokenizer=None,
    task: str = "causal-lm",
    resume: bool = False,
) -> nn.Module:
    """Quantize the model at `model_path` (a local folder of safetensors shards) to codebooks as `config` says,
    block by block from disk, writing its weights and config into `folder` as they are finished. Resumable as
    `stream_compress` says; returns the model skeleton for the compression record."""
    return stream_compress(model_path, folder, _Codebooks(config, tokenizer), task, resume)


class _Codebooks(StreamedTechnique):
    def __init__(self, config: KMeansConfig | VQConfig, tokenizer):
        super().__init__(config, tokenizer)
        self.desc = config.method

    @property
    def calibrated(self) -> bool:
        return self.config.dataset is not None

    def targets(self, model):
        targets = codebook_targets(model, self.config)
        if self.calibrated:
            refuse_several_stacks(model, targets, self.config.method)
        return targets

    def compress_layer(self, model, name, module):
        set_submodule(model, name, encode_layer(module, self.config, None))
        release(module)  # the float weight it replaced

    def compress_blocks(self, model, blocks, batches, targets, stream, inputs, folder):
        def make_solver(block, prefix, modules):
            def solve(names, diagonal):
                for name in names:
                    set_submodule(block, name, encode_layer(modules[name], self.config, diagonal))
                    release(modules[name])
                return {}

            return solve

        desc = f"{self.config.method} blocks"
        return self.walk_two_pass(
            model, blocks, batches, targets, stream, inputs, folder, make_solver, desc, diagonal=True
        )

    def layer_state(self, model, name):
        return codebook_record(model.get_submodule(name))

    def written_layer(self, name, module, state, dtype):
        out_features, in_features = linear_weight(module).shape
        bias = module.bias is not None
        return CodebookLinear(in_features, out_features, **state, bias=bias, dtype=dtype, device="meta")

    def finish(self, model, targets):
        attach_codebooks(model, self.config, list(targets))
