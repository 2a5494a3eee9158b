"""Low-rank compensation on a GPTQ run streamed from disk. Its ranks are allocated over every layer at once, so
no block's correction is known when the block is written: each layer's error factors (`ErrorFactors`) go to a
file per block in the run's folder as the block is written, and once every block is, the ranks are allocated
from the singular values alone and each block's shard is rewritten with its corrections, one shard and one
block's factors in memory at a time. The shards then hold what the run in memory writes.

A run killed at any point resumes: the factors of the blocks written are on disk beside the progress, and a
shard already rewritten is recognized by its correction and rebuilt the same.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.activations import SCRATCH
from ..core.shard_writer import ShardWriter, save_atomic
from ..core.streaming import release
from ..core.structure import cast_unquantized, set_submodule
from ..core.tensor_file import read_tensors, tensor_names
from .compensated_linear import CompensatedLinear, corrected_ranks
from .compensation import ErrorFactors

__all__ = ["FACTORS", "correct_shards", "save_factors"]

FACTORS = f"{SCRATCH}compensation"  # removed with the run's other scratch files when it completes


def save_factors(folder: Path, prefix: str, errors: dict[str, ErrorFactors]) -> None:
    """Keep the error factors of the block `prefix`'s layers in `folder` (only the components a rank may use)."""
    tensors = {}
    for name, found in errors.items():
        tensors[f"{name}.S"] = found.kept.contiguous()
        tensors[f"{name}.up"] = found.up.contiguous()
        tensors[f"{name}.down"] = found.down.contiguous()
    (folder / FACTORS).mkdir(exist_ok=True)
    save_atomic(tensors, folder / FACTORS / f"{prefix}.safetensors")


def correct_shards(
    model: nn.Module, writer: ShardWriter, shapes: dict[str, tuple[int, int]], budget: int, dtype: torch.dtype,
    save_dtype: torch.dtype,
) -> dict[str, int]:  # fmt: skip
    """Allocate `budget` parameters over the layers whose factors are kept in `writer`'s folder (every layer of
    the block stack: the progress names a block written only after its factors are kept; `shapes`: [out, in]),
    rewrite each written shard holding a layer that gets a rank with that layer as a `CompensatedLinear`
    (factors in `dtype`, the rest cast as the run casts to `save_dtype`), and put the corrected layers, on the
    meta device, into `model`. Returns {layer: rank} for the layers that got one."""
    kept, kept_in = {}, {}
    for file in sorted((writer.folder / FACTORS).glob("*.safetensors")):
        values = read_tensors(file, [key for key in tensor_names(file) if key.endswith(".S")])
        for key, S in values.items():
            name = key.removesuffix(".S")
            kept[name], kept_in[name] = S, file
    ranks = corrected_ranks(kept, {name: shapes[name] for name in kept}, budget)
    by_shard: dict[int, dict[str, int]] = {}
    for index in range(writer.n_shards):
        keys = set(writer.keys(index))
        owners = {key.rsplit(".", 1)[0] for key in keys} | {key.rsplit(".", 2)[0] for key in keys if ".base." in key}
        here = {name: rank for name, rank in ranks.items() if name in owners}
        if here:
            by_shard[index] = here
    for index, here in by_shard.items():
        tensors = writer.read(index)
        factors = _read_factors({kept_in[name] for name in here}, here)
        for name, rank in here.items():
            layer = _corrected(model.get_submodule(name), name, tensors, *factors[name], rank, dtype, save_dtype)
            tensors.update(layer.state_dict(prefix=f"{name}."))
            release(layer)
            set_submodule(model, name, layer)
        writer.write(index, tensors)
    return ranks


def _read_factors(files: set[Path], names) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(up, down) of each layer of `names`, from the factor `files` that hold them."""
    found = {}
    for file in files:
        keys = set(tensor_names(file))
        here = [name for name in names if f"{name}.up" in keys]
        tensors = read_tensors(file, [f"{name}.{part}" for name in here for part in ("up", "down")])
        found.update({name: (tensors[f"{name}.up"], tensors[f"{name}.down"]) for name in here})
    return found


def _corrected(
    base: nn.Module, name: str, tensors: dict[str, torch.Tensor], up: torch.Tensor, down: torch.Tensor, rank: int,
    dtype: torch.dtype, save_dtype: torch.dtype,
) -> CompensatedLinear:  # fmt: skip
    """The layer `name` as written in `tensors` (whose keys of it are taken out), with a rank-`rank` correction.
    A shard rewritten before (by a run killed during the rewriting) holds the corrected layer: its base is used."""
    own = {key[len(name) + 1 :]: tensors.pop(key) for key in list(tensors) if key.startswith(f"{name}.")}
    if "up.weight" in own:
        own = {key.removeprefix("base."): value for key, value in own.items() if key.startswith("base.")}
    base.load_state_dict(own, assign=True)
    layer = CompensatedLinear.from_factors(base, up[:, :rank], down[:rank], dtype)
    return cast_unquantized(layer, save_dtype)
