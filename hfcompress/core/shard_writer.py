"""Writing a model's checkpoint shard by shard as its blocks are finished (`ShardWriter`), then the index that
`from_pretrained` reads; each file is written under a temporary name and renamed into place (`save_atomic`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .tensor_file import read_tensors, tensor_names

if TYPE_CHECKING:
    from .stored_layout import SavedNames

__all__ = ["INDEX_FILE", "DroppedShards", "ShardWriter", "save_atomic"]

INDEX_FILE = "model.safetensors.index.json"


class ShardWriter:
    """Writes a model's tensors into `n_shards` safetensors files as they are finished, then the index that
    `from_pretrained` reads (built from the shards on disk, so a resumed run indexes what an earlier one wrote).
    Tensors are given and read back under the model's names; with `names`, the files hold them under the names
    and in the layout `save_pretrained` writes (`core.stored_layout.SavedNames`), as a model saved whole has them
    (tensors it converts are read back in that layout, and written again as they were)."""

    def __init__(self, folder: str | os.PathLike, n_shards: int, names: SavedNames | None = None):
        self.folder = Path(folder)
        self.n_shards = n_shards
        self.names = names

    def shard_name(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.n_shards:05d}.safetensors"

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard `index` (0-based) holding `tensors` (a temporary file renamed into place)."""
        if not 0 <= index < self.n_shards:
            raise ValueError(f"shard index must be in [0, {self.n_shards}), got {index}")
        saved = tensors if self.names is None else self.names.saved(tensors)
        # safetensors refuses views that share memory: each tensor gets its own contiguous storage
        owned = {
            k: v.detach().contiguous().clone() if _shares(v) else v.detach().contiguous() for k, v in saved.items()
        }
        save_atomic(owned, self.folder / self.shard_name(index))

    def keys(self, index: int) -> list[str]:
        """The model names of the tensors in the written shard `index`."""
        return [self._model(key) for key in tensor_names(self.folder / self.shard_name(index))]

    def read(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors of the written shard `index` by their model names, copied out of the file (to be changed and
        written again)."""
        path = self.folder / self.shard_name(index)
        return {self._model(key): tensor for key, tensor in read_tensors(path, tensor_names(path)).items()}

    def _model(self, key: str) -> str:
        return key if self.names is None else self.names.model_name(key)

    def finish(self) -> None:
        weight_map, total = {}, 0
        for index in range(self.n_shards):
            name = self.shard_name(index)
            with safe_open(self.folder / name, framework="pt") as f:
                for key in f.keys():
                    weight_map[key] = name
                    piece = f.get_slice(key)
                    total += math.prod(piece.get_shape()) * _DTYPE_BYTES[piece.get_dtype()]
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


class DroppedShards(ShardWriter):
    """A `ShardWriter` that writes nothing, for a process calibrating beside the one that writes (rank 0,
    `core.distributed`): its blocks equal rank 0's, which writes them once."""

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def read(self, index: int) -> dict[str, torch.Tensor]:
        raise RuntimeError(f"shard {index} was written by rank 0 only; this process holds no shards to read back")

    def finish(self) -> None:
        pass


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write `tensors` to the safetensors file `path` under a temporary name, then rename it into place."""
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, temporary, metadata={"format": "pt"})
    os.replace(temporary, path)


def _shares(tensor: torch.Tensor) -> bool:
    return tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
