"""`CodebookLinear`: a linear layer whose weights are indices into small fp16 codebooks (k-means or VQ)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packing import pack_codes, packed_width, unpack_codes
from .codebook import codebook_dequantize
from .kernels import select_codebook_kernel

__all__ = ["CodebookLinear"]


class CodebookLinear(nn.Module):
    """Weights stored as `weight` (indices of `bits * dim` bits, packed into int32 along the input dimension;
    the dense name on purpose, so a checkpoint never loads silently as a dense model without hfcompress) and
    `weight_codebook` [books, 2^(bits*dim), dim] (fp16), one book per `out_features / books` rows. Scalar
    k-means is dim 1 with one book per row; VQ has dim 2 or 4 and few books. Calls of a few rows on a CPU run
    scalar k-means layers by table lookup without a dense weight (`kernels.LutCpuKernel`); otherwise the dense
    weight is rebuilt for each call, one layer at a time."""

    STORED_TENSORS = ("weight", "weight_codebook")
    KEEPS_DTYPE = True  # its scales/codebooks keep their storage dtype when the model is cast

    def __init__(
        self, in_features: int, out_features: int, bits: int, dim: int = 1, books: int | None = None,
        bias: bool = True, dtype=None, device=None,
    ):  # fmt: skip
        super().__init__()
        books = out_features if books is None else books
        if in_features % dim or out_features % books:
            raise ValueError(f"dim {dim} / {books} books do not tile a {out_features}x{in_features} weight")
        if not 1 <= bits * dim <= 8:
            raise ValueError(f"indices of bits * dim = {bits * dim} bits are not supported (1 to 8)")
        self.in_features, self.out_features, self.bits, self.dim, self.books = (
            in_features,
            out_features,
            bits,
            dim,
            books,
        )
        self.index_bits = bits * dim
        self.register_buffer(
            "weight",
            torch.zeros(
                out_features, packed_width(in_features // dim, self.index_bits), dtype=torch.int32, device=device
            ),
        )
        self.register_buffer(
            "weight_codebook", torch.zeros(books, 2**self.index_bits, dim, dtype=torch.float16, device=device)
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )
        self._kernel = None
        self._kernel_key = None  # (device, dtype) the kernel was made for; made again after new codes load

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, codebook: torch.Tensor, bits: int, bias: torch.Tensor | None
    ) -> CodebookLinear:
        """From indices [out, in / dim] and codebooks [books, 2^(bits*dim), dim] (or [out, 2^bits] for scalar)."""
        if codebook.dim() == 2:
            codebook = codebook.unsqueeze(-1)
        books, _, dim = codebook.shape
        out_features = codes.shape[0]
        layer = cls(codes.shape[1] * dim, out_features, bits, dim, books, bias is not None, device=codes.device)
        layer.weight.copy_(pack_codes(codes, bits * dim))
        layer.weight_codebook.copy_(codebook.to(torch.float16))
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.weight, self.index_bits, self.in_features // self.dim)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        codebook = self.weight_codebook if dtype is None else self.weight_codebook.to(dtype)
        return codebook_dequantize(self.codes(), codebook, self.out_features // self.books)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # the kernel's loops serve a few rows; prompts multiply its decoded tiles (no dense weight whole)
        if not (torch.is_grad_enabled() and x.requires_grad):
            key = (x.device, x.dtype)
            if self._kernel_key != key:
                self._kernel, self._kernel_key = select_codebook_kernel(self, x.device, x.dtype), key
            if self._kernel is not None:
                y = self._kernel(x)
                return y if bias is None else y + bias
        return F.linear(x, self.dense_weight(x.dtype), bias)

    def drop_kernel(self) -> None:
        """Forget the kernel built for the current codes, and the repacked copy of them it may hold (a streamed
        run calls it as it frees the block: `core.streaming.release`)."""
        self._kernel, self._kernel_key = None, None

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_key = None  # new codes: a new kernel on the next call
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._kernel_key = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, dim={self.dim}, "
            f"books={self.books}"
        )
