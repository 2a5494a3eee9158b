"""`FactorizedLinear`: a linear layer stored as two thin ones, `x @ V.T @ U.T + b`."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FactorizedLinear"]


class FactorizedLinear(nn.Module):
    """A rank-`rank` linear layer: `down` (`V`, [rank, in]) then `up` (`U`, [out, rank], with the bias).

    The factors are plain `nn.Linear` children, so the checkpoint holds `<name>.down.weight`,
    `<name>.up.weight` and `<name>.up.bias`, peft can put adapters on them, and quantization can treat
    them as any other linear layer.

    `weight` is an empty placeholder saved with the factors: transformers without hfcompress ignores the
    unknown `quant_method` and would otherwise load the model with the dense weights missing (randomly
    initialized, with only a warning); the empty tensor makes it fail on a shape mismatch instead.
    """

    STORED_MODULES = ("down", "up")  # what holds its weight, for bits per weight (evaluation/footprint.py)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device=None,
    ):
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(
                f"`rank` must be in [1, {min(in_features, out_features)}] for a {out_features}x{in_features} layer, got {rank}"
            )
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=device))
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None) -> FactorizedLinear:
        dtype = bias.dtype if bias is not None else up.dtype
        layer = cls(
            down.shape[1],
            up.shape[0],
            up.shape[1],
            bias=bias is not None,
            dtype=dtype,
            device=up.device,
        )
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        """The dense [out, in] weight `U @ V`."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.up.bias is not None}"
