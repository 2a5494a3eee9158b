"""llama.cpp's Q4_0 and Q8_0 blocks from hfcompress's symmetric grids, as pure tensor functions.

A symmetric 4-bit grid with groups of 32 and float16 scales is exactly Q4_0: each block of 32 weights stores
its float16 scale `d` and 32 four-bit codes `q`, the weight being `d * (q - 8)`; code `j` of a block sits in the
low nibble of byte `j` for `j < 16` and in the high nibble of byte `j - 16` otherwise. The 8-bit grid is Q8_0:
`d` and 32 signed bytes, the weight `d * q`. hfcompress's symmetric codes are offset by `2**(bits - 1)`, so
the conversion moves bytes and never rounds again.
"""

from __future__ import annotations

import torch

__all__ = ["BLOCK", "q4_0_blocks", "q8_0_blocks", "rope_row_order"]

BLOCK = 32  # weights per Q4_0 / Q8_0 block


def _check(codes: torch.Tensor, scales: torch.Tensor) -> None:
    rows, columns = codes.shape
    if columns % BLOCK or scales.shape != (rows, columns // BLOCK):
        raise ValueError(
            f"codes {tuple(codes.shape)} and scales {tuple(scales.shape)} are not groups of {BLOCK} along the rows"
        )
    if scales.dtype != torch.float16:
        raise ValueError(f"Q4_0 and Q8_0 store float16 scales, got {scales.dtype}")


def q4_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, columns / 32 * 18]: the Q4_0 blocks of symmetric 4-bit `codes` [rows, columns] (0..15, the
    weight `scale * (code - 8)`) with float16 `scales` [rows, columns / 32]."""
    _check(codes, scales)
    rows, columns = codes.shape
    q = codes.to(torch.uint8).reshape(rows, columns // BLOCK, 2, BLOCK // 2)
    nibbles = q[:, :, 0] | (q[:, :, 1] << 4)  # [rows, blocks, 16]
    d = scales.contiguous().view(torch.uint8).reshape(rows, columns // BLOCK, 2)
    return torch.cat([d, nibbles], dim=-1).reshape(rows, -1)


def q8_0_blocks(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, columns / 32 * 34]: the Q8_0 blocks of symmetric 8-bit `codes` (0..255, the weight
    `scale * (code - 128)`) with float16 `scales`."""
    _check(codes, scales)
    rows, columns = codes.shape
    signed = (codes.to(torch.int16) - 128).to(torch.int8).view(torch.uint8).reshape(rows, columns // BLOCK, BLOCK)
    d = scales.contiguous().view(torch.uint8).reshape(rows, columns // BLOCK, 2)
    return torch.cat([d, signed], dim=-1).reshape(rows, -1)


def rope_row_order(rows: int, heads: int) -> torch.Tensor:
    """The order llama.cpp wants the rows of a Llama q or k projection in: transformers keeps each head's rotary
    halves apart ([first halves..., second halves...]), llama.cpp interleaves them in pairs. Rows move whole, so a
    quantized weight is reordered with its scales, its blocks intact."""
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of rotary pairs")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)
