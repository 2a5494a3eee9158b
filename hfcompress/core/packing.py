"""Dense bit packing of integer codes into int32 words, and of boolean masks into bytes. Pure tensor functions.

Every 32 consecutive codes of `bits` bits fill exactly `bits` int32 words, little end first, with codes
split across word boundaries where needed (3 bits). This is bit for bit the layout compressed-tensors uses
for `pack-quantized` weights (its signed values plus 2**(bits-1) are our unsigned codes).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from .grids import SUPPORTED_BITS

__all__ = [
    "SUPPORTED_BITS", "dense_from_bitmask", "pack_bitmask", "pack_codes", "packed_width", "unpack_bitmask", "unpack_codes",
]  # fmt: skip

_MASK32 = 0xFFFFFFFF


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words that hold `n` codes of `bits` bits."""
    return math.ceil(n * bits / 32)


def _layout(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(32, device=device) * bits
    return starts // 32, starts % 32


_PACK_CODES = 1 << 20  # codes packed at once


def pack_codes(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned `codes` (any integer dtype, values < 2**bits) of a 2-D tensor along `dim` into int32."""
    if not 1 <= bits <= 8:
        raise ValueError(f"`bits` must be between 1 and 8, got {bits}")
    if dim in (0, -2):
        return pack_codes(codes.t(), bits).t().contiguous()
    if 8 % bits == 0 and sys.byteorder == "little":
        return _pack_bytes(codes, bits)
    return _pack_words(codes, bits)


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_codes` for any `bits`, codes crossing word boundaries included."""
    rows, cols = codes.shape
    chunk = max(1, _PACK_CODES // max(cols, 1))
    if rows > chunk:  # the int64 temporaries below are 24 bytes a code: a few rows at a time
        return torch.cat([_pack_words(codes[i : i + chunk], bits) for i in range(0, rows, chunk)])
    values = F.pad(codes.to(torch.int64), (0, (-cols) % 32)).reshape(rows, -1, 32)
    words = torch.zeros(rows, values.shape[1], bits + 1, dtype=torch.int64, device=codes.device)
    word_idx, shift = _layout(bits, codes.device)
    index = word_idx.expand(rows, values.shape[1], 32)
    words.scatter_add_(2, index, (values << shift) & _MASK32)
    # the high part of codes that cross into the next word
    words.scatter_add_(2, index + 1, values >> (32 - shift))
    words = words[..., :bits].reshape(rows, -1)[:, : packed_width(cols, bits)]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_bytes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`pack_codes` for `bits` that divide 8: codes fill bytes low bits first, and four bytes read as a
    little-endian int32 are the word those codes fill (no int64 temporaries: 1 byte a code)."""
    rows, cols = codes.shape
    per_byte = 8 // bits
    padded = torch.zeros(rows, packed_width(cols, bits) * 4 * per_byte, dtype=torch.uint8, device=codes.device)
    padded[:, :cols] = codes
    values = padded.view(rows, -1, per_byte)
    packed = values[..., 0].contiguous()
    for k in range(1, per_byte):
        packed |= values[..., k] << (bits * k)
    return packed.view(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of `pack_codes`: `n` codes per row (or per column with `dim=0`), as int32."""
    if dim in (0, -2):
        return unpack_codes(packed.t(), bits, n).t()
    rows, width = packed.shape
    chunks = math.ceil(n / 32)
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(rows, -1)[:, :n]
    words = packed.to(torch.int64) & _MASK32
    words = F.pad(words, (0, chunks * bits - width)).reshape(rows, chunks, bits)
    words = F.pad(words, (0, 1))
    word_idx, shift = _layout(bits, packed.device)
    low = words[..., word_idx] >> shift
    high = words[..., word_idx + 1] << (32 - shift)
    codes = (low | high) & (2**bits - 1)
    return codes.reshape(rows, -1)[:, :n].to(torch.int32)


_BITS = torch.tensor(
    [1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device="cpu"
)  # not meta, if first imported while loading


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """[rows, cols] bool -> [rows, ceil(cols / 8)] uint8, bit j of byte k holding column 8k + j."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask.to(torch.uint8)
    return (padded.view(rows, -1, 8) * _BITS.to(mask.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_bitmask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    bits = packed.unsqueeze(-1).bitwise_and(_BITS.to(packed.device)).ne(0)
    return bits.view(packed.shape[0], -1)[:, :cols]


def dense_from_bitmask(packed: torch.Tensor, values: torch.Tensor, cols: int) -> torch.Tensor:
    """The [rows, cols] matrix whose non-zeros, row-major, are `values` where `packed` (`pack_bitmask`) is set."""
    mask = unpack_bitmask(packed, cols)
    dense = torch.zeros(mask.shape, dtype=values.dtype, device=mask.device)
    return dense.masked_scatter_(mask, values)
