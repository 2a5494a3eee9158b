"""An hfcompress checkpoint rewritten as compressed-tensors one shard at a time, without loading the model: the
way out to vLLM for a model quantized streamed from disk (`--offload disk`, which writes hfcompress's format as
each block is finished). The layers are read from a skeleton on the meta device; every shard is read, renamed
(`export.compressed_tensors_renaming`) and written before the next is read, so memory holds one shard."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers.core_model_loading import revert_weight_conversion

from ..checkpoint.manifest import HfcompressQuantizationConfig
from ..core.shard_writer import INDEX_FILE
from ..core.streaming import ShardedCheckpoint
from ..core.tasks import task_of
from ..io import atomic_output_dir, check_output_dir, copy_model_extras
from .export import check_compressed_tensors_compatible, compressed_tensors_config, compressed_tensors_renaming

__all__ = ["export_compressed_tensors", "write_compressed_tensors"]

logger = logging.getLogger(__name__)


def export_compressed_tensors(
    model_folder: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False, on_staging=None
) -> Path:
    """Write the hfcompress checkpoint in `model_folder` to the folder `output` in format compressed-tensors, shard
    for shard, with its tokenizer and generation config: the tensors and `quantization_config` that saving the
    loaded model with `format="compressed-tensors"` writes. Refused, before anything is written, where that
    format cannot hold the model (`export.check_compressed_tensors_compatible`) or the folder is no hfcompress
    checkpoint; `output` is refused if it exists and is not empty, unless `overwrite`, and is written in full or not
    at all. `on_staging(folder)` runs on the folder being written once the weights are in it (the command adds the
    record and card)."""
    folder = Path(model_folder)
    config = _hfcompress_config(folder)
    try:  # the class its names belong to
        task = task_of(config.get("model_type"), config.get("architectures"))
    except ValueError as e:
        raise ValueError(f"{os.fspath(model_folder)!r}: {e}") from e
    check_output_dir(output, overwrite, inputs=[model_folder])
    with atomic_output_dir(output, overwrite) as staging:
        write_compressed_tensors(folder, staging, task)
        if on_staging is not None:
            on_staging(Path(staging))
    logger.info("wrote %s in format compressed-tensors", output)
    return Path(output)


def write_compressed_tensors(model_folder: str | os.PathLike, destination: str | os.PathLike, task: str) -> None:
    """Write the hfcompress checkpoint of a `task` model in `model_folder` into the existing folder `destination`
    in format compressed-tensors, one shard read and written at a time, with its config, tokenizer and generation
    config; a ValueError, before any shard is written, where that format cannot hold it."""
    folder, destination = Path(model_folder), Path(destination)
    config = _hfcompress_config(folder)
    checkpoint = ShardedCheckpoint(folder)
    dtype = checkpoint.stored_dtype()
    model = checkpoint.skeleton(task, dtype, compressed=True)
    model.config.quantization_config = HfcompressQuantizationConfig.from_dict(config["quantization_config"])
    check_compressed_tensors_compatible(model)
    model.config.quantization_config = compressed_tensors_config(model)

    rename = compressed_tensors_renaming(model)
    as_model = checkpoint.layout.renamed()  # names `save_pretrained` reverted (in memory) -> the model's own
    shards = sorted(set(checkpoint.weight_map.values()))
    weight_map, total = {}, 0
    for shard in tqdm(shards, desc="compressed-tensors shards"):
        stored = load_file(folder / shard)
        tensors = _original_names(model, rename({as_model.get(k, k): t for k, t in stored.items()}))
        save_file(tensors, destination / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (destination / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    model.config.save_pretrained(destination)
    copy_model_extras(folder, destination)
    logger.info("wrote %d compressed-tensors shards to %s", len(shards), destination)


def rewrite_streamed(folder: Path, destination: Path, task: str, format: str = "hfcompress") -> None:
    """What a streamed run wrote in hfcompress's format in `folder` (`--offload disk`), rewritten into
    `destination` in `format` (the technique's `rewrite`, `core.registry`)."""
    if format != "compressed-tensors":
        raise ValueError(f"a streamed run is rewritten into format compressed-tensors only, got {format!r}")
    write_compressed_tensors(folder, destination, task)


def _hfcompress_config(folder: Path) -> dict:
    """The config of the hfcompress checkpoint in `folder`, or a ValueError saying what it is instead."""
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{os.fspath(folder)!r} is no model folder: it has no config.json")
    config = json.loads(path.read_text(encoding="utf-8"))
    method = (config.get("quantization_config") or {}).get("quant_method")
    if method != "hfcompress":
        raise ValueError(
            f"{os.fspath(folder)!r} is {'not quantized' if method is None else f'quantized with {method}'}; "
            "export compressed-tensors reads hfcompress checkpoints (written by hfcompress quantize)"
        )
    return config


def _original_names(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` under the names transformers itself saves the model's (its conversion mapping reversed: Mixtral's
    `block_sparse_moe`), as `save_pretrained` writes them in memory."""
    return revert_weight_conversion(model, tensors)
