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
    file.seek(data_start + start)
    if dtype is None or not stored.is_floating_point or stored == dtype:
        tensor = torch.empty(shape, dtype=stored)
        _fill(file, tensor, what)
        return tensor
    tensor = torch.empty(shape, dtype=dtype)
    flat = tensor.reshape(-1)
    step = max(1, CHUNK_BYTES // itemsize)
    chunk = torch.empty(min(step, flat.numel()), dtype=stored)  # one buffer in the stored dtype, reused
    for first in range(0, flat.numel(), step):
        part = flat[first : first + step]
        _fill(file, chunk[: part.numel()], what)
        part.copy_(chunk[: part.numel()])
    return tensor


def _fill(file, tensor: torch.Tensor, what: str) -> None:
    """Read the contiguous `tensor`'s bytes from `file` at its position, `CHUNK_BYTES` at a time (one read() call
    returns at most 2 GiB)."""
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
    for start in range(0, len(buffer), CHUNK_BYTES):
        piece = buffer[start : start + CHUNK_BYTES]
        if file.readinto(piece) != len(piece):
            raise ValueError(f"{what} ends past the end of the file: the file is truncated")


class SpilledTensor:
    """A tensor kept out of memory until it is needed again: a CPU tensor's bytes in a temporary file, a device
    tensor's in host memory. `load()` gives its values as a new tensor, `load(out=t)` into `t` (the memory the
    tensor was spilled from, reused meanwhile); closed when used as a context manager, or by `close()`."""

    def __init__(self, tensor: torch.Tensor):
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        if tensor.is_cpu:
            self.file = tempfile.TemporaryFile()
            self.file.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))
            self.host = None
        else:
            self.file, self.host = None, tensor.cpu()

    def load(self, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        if self.host is not None:
            return out.copy_(self.host)
        self.file.seek(0)
        _fill(self.file, out, "a spilled tensor's temporary file")
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.file = self.host = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
