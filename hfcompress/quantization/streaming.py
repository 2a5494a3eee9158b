"""GPTQ and round-to-nearest on a model streamed from disk: the model is a skeleton on the meta device, each
block is read from the checkpoint's shards in its stored dtype, quantized (GPTQ calibrates it on the previous blocks'
outputs, exactly as in memory, its maths in float32), written to the output folder's shard of that block at
once and freed. A block's calibration activations (its inputs and outputs, what its staged calibration holds
between stages) are kept on disk in the output folder and read back one batch at a time (`core.activations`).
Peak memory is one block as stored and one batch of activations, whatever the depth and the number of calibration
tokens, except while the first block's inputs are captured (the embeddings and those inputs); the codes are those
of the in-memory run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..core.activations import INPUTS, SpilledActivations, check_spill_space
from ..core.capture import capture_block_inputs
from ..core.memory import release_large_frees
from ..core.resume import RunProgress, settings_digest
from ..core.streaming import BlockStream, ShardedCheckpoint, ShardWriter, release, stored_names, tied_keys
from ..core.structure import find_layer_stack, linear_weight, set_submodule
from ..core.walk import block_prefixes
from ..data import calibration_data
from .api import attach_quantization_config, replace_with_rtn, select_targets, stores_g_idx
from .config import GPTQConfig, RTNConfig
from .gptq_blocks import quantize_blocks
from .grid import SCALE_TORCH_DTYPES
from .modules import QuantLinear, cast_unquantized
from .plan import plan_layers, sparsity_mask
from .sparse_quant import SparseQuantLinear

__all__ = ["quantize_streaming"]

logger = logging.getLogger(__name__)


# blocks of at least this many bytes in float32 make glibc return every freed allocation of a megabyte or more at
# once (`core.memory.release_large_frees`): 9% slower on a 1.47B Llama (0.8 GB blocks) and 12% less memory; on
# small blocks only slower
LARGE_BLOCK = 256 << 20


@torch.no_grad()
def quantize_streaming(
    model_path: str | os.PathLike,
    folder: str | os.PathLike,
    config: RTNConfig,
    tokenizer=None,
    task="causal-lm",
    resume: bool = False,
) -> nn.Module:
    """Quantize the model at `model_path` (a local folder of safetensors shards) with `config` (`GPTQConfig` or
    `RTNConfig`) block by block from disk, writing its weights and config into `folder` as they are finished.

    Progress is kept in `folder` after every block; with `resume`, a run killed midway continues from its last
    written block (refused if the settings differ) and writes the same weights an uninterrupted run writes.
    Returns the model skeleton (every weight on the meta device) with its quantized layers and quantization
    config in place, for the compression record. Refuses a model that cannot stream (see `streaming_obstacle`).
    """
    if getattr(config, "compensates", False):
        raise ValueError(
            "low-rank compensation (--lowrank-compensation, --compensation-bits) needs the whole model in memory; "
            "it does not run with --offload disk yet"
        )
    checkpoint = ShardedCheckpoint(model_path)
    save_dtype = checkpoint.stored_dtype()
    # weights stay in the checkpoint's dtype; the calibration computes in float32 (`core.precision`)
    model = checkpoint.skeleton(task, save_dtype)
    scale_dtype = SCALE_TORCH_DTYPES[config.scale_dtype]
    _, blocks = find_layer_stack(model)
    if 4 * sum(p.numel() for p in blocks[0].parameters()) >= LARGE_BLOCK:
        release_large_frees()  # memory over allocation speed where the heap's fragments would cost a block's worth
    targets = select_targets(model, config)
    plans = plan_layers(model, targets, config)
    prefixes = block_prefixes(model, blocks)
    calibrated = isinstance(config, GPTQConfig)
    batches = calibration_data(model, config, tokenizer) if calibrated else None
    if calibrated:
        text = model.config.get_text_config()
        hidden = text.hidden_size
        check_spill_space(
            folder, sum(b.numel() for b in batches), hidden, getattr(text, "intermediate_size", 4 * hidden)
        )

    settings = {
        "model": os.path.abspath(model_path),
        "config": config.to_dict(),
        "calibration": settings_digest(batches) if calibrated else None,
        "blocks": len(blocks),
    }
    progress = RunProgress(folder, settings)
    state = progress.load() if resume else None
    start = state["blocks_done"] if state else 0
    layers: dict[str, int | None] = dict(state["layers"]) if state else {}
    done = set()
    for name, nnz in layers.items():  # written by the run that is resumed: only their shape is needed here
        set_submodule(model, name, _meta_layer(targets[name], plans[name], config, scale_dtype, save_dtype, nnz))
        done.add(name)
    if start:
        logger.info("resuming: %d of %d blocks were written by the run that stopped", start, len(blocks))

    def plan_block(block: nn.Module, prefix: str) -> None:
        if config.keep_sparsity:
            for name, module in _in_block(targets, prefix).items():
                plans[name].mask = sparsity_mask(linear_weight(module))

    def finish_block(block: nn.Module, prefix: str) -> None:
        cast_unquantized(block, save_dtype)
        for name in _in_block(targets, prefix):
            plans[name].mask = None  # a pruned layer's mask is in its bitmask now

    def record_progress(block: nn.Module, prefix: str, written: int, next_inputs) -> None:
        for name in _in_block(targets, prefix):
            layers[name] = getattr(model.get_submodule(name), "nnz", None)
        progress.save(written, layers, next_inputs)

    writer = ShardWriter(folder, n_shards=len(blocks) + 1)
    stream = BlockStream(
        model,
        checkpoint,
        writer,
        dtype=save_dtype,
        on_onload=plan_block,
        before_write=finish_block,
        after_write=record_progress,
        start=start,
    )
    outside = [n for n in stored_names(model) if not any(n.startswith(p + ".") for p in prefixes)]
    todo = blocks[start:]
    if calibrated and len(todo):
        # what runs before the first block: everything outside the stack but the output layer
        head = _output_names(model)
        checkpoint.materialize(model, [n for n in outside if n not in head], save_dtype)
        if start:  # the next block's inputs are on disk: only their other arguments are taken from these
            inputs = progress.next_inputs(capture_block_inputs(model, blocks[0], batches))
        else:  # the blocks' inputs and outputs are kept on disk, beside the progress that names them
            spilled = SpilledActivations(Path(folder) / f"{INPUTS}{prefixes[0]}")
            inputs = capture_block_inputs(model, blocks[0], batches, into=spilled)
        release(model)  # the embeddings are not needed again until they are written
        # with every record on disk, replaying all settled submodules costs no memory and the least compute
        done |= quantize_blocks(
            model, todo, batches, targets, config, scale_dtype, plans, stream, inputs, replay="all", spill=folder
        )
    elif len(todo):
        for block, prefix in zip(tqdm(todo, desc="round-to-nearest blocks"), prefixes[start:], strict=True):
            stream.onload(block, prefix)
            for name, module in _in_block(targets, prefix).items():
                replace_with_rtn(model, name, module, config, scale_dtype, plans[name])
                release(module)  # the float weight it replaced
                done.add(name)
            stream.offload(block, prefix)

    # what lies outside the stack: quantized with round-to-nearest where targeted, written to the last shard
    checkpoint.materialize(model, outside, save_dtype)
    rest = {n: m for n, m in targets.items() if n not in done}
    if rest and calibrated:
        logger.warning(
            "%d layers outside the block stack are quantized with round-to-nearest: %s", len(rest), list(rest)
        )
    for name, module in rest.items():
        replace_with_rtn(model, name, module, config, scale_dtype, plans[name])
    cast_unquantized(model, save_dtype)
    skip = tied_keys(model)
    tensors = {n: t for n, t in model.state_dict().items() if not any(n.startswith(p + ".") for p in prefixes)}
    writer.write(len(blocks), {n: t for n, t in tensors.items() if n not in skip})
    release(model)
    model.tie_weights()  # loading and releasing untie what the config ties; the record counts tied weights once
    writer.finish()

    attach_quantization_config(model, config, plans, sorted({type(m).__name__ for m in targets.values()}))
    model.config.save_pretrained(folder)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    progress.clear()
    logger.info("streamed %d blocks from %s into %s", len(blocks), model_path, Path(folder))
    return model


def _in_block(targets: dict[str, nn.Module], prefix: str) -> dict[str, nn.Module]:
    return {n: m for n, m in targets.items() if n.startswith(prefix + ".")}


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


def _output_names(model: nn.Module) -> set[str]:
    """The stored tensors of the output layer (not needed to reach the first block)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return set()
    names = {id(m): n for n, m in model.named_modules()}
    return set(stored_names(model, names[id(head)]))
