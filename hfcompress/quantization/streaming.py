"""GPTQ and round-to-nearest on a model streamed from disk: the model is a skeleton on the meta device, each
block is read from the checkpoint's shards in float32, quantized (GPTQ calibrates it on the previous blocks'
outputs, exactly as in memory), written to the output folder's shard of that block at once and freed. Peak
memory is one block in float32, the embeddings while the first block's inputs are captured, and the
calibration activations, whatever the depth; the codes are those of the in-memory run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..core.calibration import block_prefixes
from ..core.capture import capture_block_inputs
from ..core.streaming import BlockStream, ShardedCheckpoint, ShardWriter, release, stored_names, tied_keys
from ..core.structure import find_layer_stack
from ..data import calibration_data
from .api import attach_quantization_config, replace_with_rtn, select_targets
from .config import GPTQConfig, RTNConfig
from .gptq_blocks import quantize_blocks
from .grid import SCALE_TORCH_DTYPES
from .modules import cast_unquantized
from .plan import plan_layers, sparsity_mask

__all__ = ["quantize_streaming"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def quantize_streaming(
    model_path: str | os.PathLike, folder: str | os.PathLike, config: RTNConfig, tokenizer=None, task="causal-lm"
) -> nn.Module:
    """Quantize the model at `model_path` (a local folder of safetensors shards) with `config` (`GPTQConfig` or
    `RTNConfig`) block by block from disk, writing its weights and config into `folder` as they are finished.

    Returns the model skeleton (every weight on the meta device) with its quantized layers and quantization
    config in place, for the compression record. Refuses a model that cannot stream (see `streaming_obstacle`).
    """
    checkpoint = ShardedCheckpoint(model_path)
    model = checkpoint.skeleton(task)
    save_dtype = checkpoint.stored_dtype()
    scale_dtype = SCALE_TORCH_DTYPES[config.scale_dtype]
    _, blocks = find_layer_stack(model)
    targets = select_targets(model, config)
    plans = plan_layers(model, targets, config)
    prefixes = block_prefixes(model, blocks)
    writer = ShardWriter(folder, n_shards=len(blocks) + 1)

    def plan_block(block: nn.Module, prefix: str) -> None:
        if not config.keep_sparsity:
            return
        for name, module in targets.items():
            if name.startswith(prefix + "."):
                plans[name].mask = sparsity_mask(module.weight)

    def cast_dense(block: nn.Module) -> None:
        cast_unquantized(block, save_dtype)

    stream = BlockStream(model, checkpoint, writer, on_onload=plan_block, before_write=cast_dense)
    outside = [n for n in stored_names(model) if not any(n.startswith(p + ".") for p in prefixes)]
    if isinstance(config, GPTQConfig):
        batches = calibration_data(model, config, tokenizer)
        # what runs before the first block: everything outside the stack but the output layer
        head = _output_names(model)
        checkpoint.materialize(model, [n for n in outside if n not in head], torch.float32)
        inputs = capture_block_inputs(model, blocks[0], batches)
        release(model)  # the embeddings are not needed again until they are written
        # memory over speed: only attention and MLP outputs are replayed (the same codes)
        done = quantize_blocks(
            model, blocks, batches, targets, config, scale_dtype, plans, stream, inputs, replay="lean"
        )
    else:
        done = set()
        for block, prefix in zip(tqdm(blocks, desc="round-to-nearest blocks"), prefixes, strict=True):
            stream.onload(block, prefix)
            for name, module in targets.items():
                if name.startswith(prefix + "."):
                    replace_with_rtn(model, name, module, config, scale_dtype, plans[name])
                    done.add(name)
            stream.offload(block, prefix)

    # what lies outside the stack: quantized with round-to-nearest where targeted, written to the last shard
    checkpoint.materialize(model, outside, torch.float32)
    rest = {n: m for n, m in targets.items() if n not in done}
    if rest and isinstance(config, GPTQConfig):
        logger.warning(
            "%d layers outside the block stack are quantized with round-to-nearest: %s", len(rest), list(rest)
        )
    for name, module in rest.items():
        replace_with_rtn(model, name, module, config, scale_dtype, plans[name])
    cast_unquantized(model, save_dtype)
    skip = tied_keys(model)
    state = {n: t for n, t in model.state_dict().items() if not any(n.startswith(p + ".") for p in prefixes)}
    writer.write(len(blocks), {n: t for n, t in state.items() if n not in skip})
    release(model)
    model.tie_weights()  # loading and releasing untie what the config ties; the record counts tied weights once
    writer.finish()

    attach_quantization_config(model, config, plans, sorted({type(m).__name__ for m in targets.values()}))
    model.config.save_pretrained(folder)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    logger.info("streamed %d blocks from %s into %s", len(blocks), model_path, Path(folder))
    return model


def _output_names(model: nn.Module) -> set[str]:
    """The stored tensors of the output layer (not needed to reach the first block)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    return set(stored_names(model, names[id(head)]))
