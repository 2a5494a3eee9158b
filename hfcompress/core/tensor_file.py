"""Reading tensors from a safetensors file into memory of their own, without mapping the file.

`safetensors.safe_open` hands out views of a memory map of the whole file: the pages a tensor was read from stay
resident, and counted in the process's memory, until the file is closed, so copying tensors out of it holds each
one twice (a streamed run's block, or a large model's embedding and output layer, about a gigabyte each on a
1.47B Llama). Here each tensor's bytes are read from the file straight into its own tensor: the page cache keeps
the file, not the process. The format: an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the data (https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile

import torch

__all__ = ["SAFETENSORS_DTYPES", "SpilledTensor", "read_header", "read_tensors", "tensor_names"]

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def read_header(file) -> tuple[dict, int]:
    """The JSON header of an open safetensors file (without "__metadata__") and where its data begins."""
    file.seek(0)
    (length,) = struct.unpack("<Q", file.read(8))
    header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def tensor_names(path: str | os.PathLike) -> list[str]:
    """The names of the tensors in the safetensors file `path`, in the header's order."""
    with open(path, "rb") as file:
        return list(read_header(file)[0])


def read_tensors(
    path: str | os.PathLike, names: list[str], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The tensors `names` of the safetensors file `path`, each in memory of its own; floating ones cast to
    `dtype` (None: as stored), read `CHUNK_BYTES` of the stored values at a time (a cast tensor has no whole copy
    in the stored dtype beside it)."""
    tensors = {}
    with open(path, "rb") as file:
        header, data_start = read_header(file)
        for name in names:
            if name not in header:
                raise KeyError(f"{os.fspath(path)} holds no tensor {name!r}")
            tensors[name] = _read_one(file, header[name], data_start, dtype, f"{name!r} in {os.fspath(path)}")
    return tensors


CHUNK_BYTES = 64 << 20


def _read_one(file, info: dict, data_start: int, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    stored = SAFETENSORS_DTYPES.get(info["dtype"])
    if stored is None:
        raise ValueError(f"{what} is stored as {info['dtype']}, which hfcompress does not read")
    shape, (start, stop) = info["shape"], info["data_offsets"]
    itemsize = torch.empty((), dtype=stored).element_size()
    size = math.prod(shape) * itemsize
    if stop - start != size:
        raise ValueError(f"{what} takes {stop - start} bytes in the file, but its shape and dtype need {size}")
    cast = dtype is not None and stored.is_floating_point and stored != dtype
    tensor = torch.empty(shape, dtype=dtype if cast else stored)
    flat = tensor.reshape(-1)
    file.seek(data_start + start)
    step = max(1, CHUNK_BYTES // itemsize)  # also keeps each read far below what one read() call returns (2 GiB)
    for first in range(0, flat.numel(), step):
        part = flat[first : first + step]
        target = torch.empty(part.numel(), dtype=stored) if cast else part
        buffer = memoryview(target.view(torch.uint8).numpy())
        if file.readinto(buffer) != len(buffer):
            raise ValueError(f"{what} ends past the end of the file: the file is truncated")
        if cast:
            part.copy_(target)
    return tensor


class SpilledTensor:
    """A tensor kept out of memory until it is needed again: a CPU tensor's bytes in a temporary file (deleted when
    this object goes), a device tensor's in host memory. `load()` gives a new tensor with the same values."""

    def __init__(self, tensor: torch.Tensor):
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        if tensor.is_cpu:
            self.file = tempfile.TemporaryFile()
            self.file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            self.host = None
        else:
            self.file, self.host = None, tensor.cpu()

    def load(self) -> torch.Tensor:
        if self.host is not None:
            return self.host.to(self.device)
        tensor = torch.empty(self.shape, dtype=self.dtype)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        self.file.seek(0)
        for start in range(0, len(buffer), CHUNK_BYTES):
            if self.file.readinto(buffer[start : start + CHUNK_BYTES]) != len(buffer[start : start + CHUNK_BYTES]):
                raise OSError("the temporary file of a spilled tensor was cut short")
        return tensor

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = self.host = None
