"""W8A8 maths as pure tensor functions: SmoothQuant's migration of activation outliers into the weights (Xiao et
al., 2023), dynamic per-token int8 activations, and the int8 matmul that runs them.

A linear layer computing `x Wᵀ` computes the same with `W·diag(s)` on `x / s`. Activations of language models
have a few input channels with values far larger than the rest, so per-token int8 steps are set by those
channels and the others round to a handful of levels; weights have no such outliers. `s = max|x|^α / max|w|^(1-α)`
(per input channel, over the calibration tokens and the weight's rows) moves a share `α` of the activations'
range into the weights, where per-channel weight scales absorb it.
"""

from __future__ import annotations

import torch

__all__ = ["int8_matmul", "quantize_per_token", "smoothquant_scales"]

INT8_MAX = 127


def smoothquant_scales(activation_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """The input-channel scales [in] for linears sharing one input (`weight` [out, in], stacked) whose input
    channels reach `activation_max` [in] in absolute value: `max|x|^α / max|w|^(1-α)`. Channels no token or
    weight uses get scale 1."""
    a = activation_max.float()
    w = weight.detach().float().abs().amax(dim=0)
    s = a.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)
    unused = (a == 0) | (w == 0)
    return torch.where(unused, torch.ones_like(s), s).clamp(min=1e-5)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` [..., in] as int8 codes and one float32 scale per token ([..., 1]), symmetric: `x ≈ codes · scale`."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / INT8_MAX
    codes = torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def int8_matmul(codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`codes` [m, in] int8 times `weight`ᵀ (`weight` [out, in] int8), accumulated exactly in int32.

    torch's int8 GEMM (`torch._int_mm`: oneDNN with VNNI / AVX-512 on CPU, cuBLASLt on CUDA). CUDA needs more
    than 16 rows (padded here) and both sizes multiples of 8; otherwise the product runs in float64, which holds
    every such sum exactly."""
    rows, inner = codes.shape
    if codes.device.type == "cpu":
        return torch._int_mm(codes, weight.t())
    if codes.device.type == "cuda" and inner % 8 == 0 and weight.shape[0] % 8 == 0:
        padded = codes if rows > 16 else torch.nn.functional.pad(codes, (0, 0, 0, 17 - rows))
        return torch._int_mm(padded, weight.t())[:rows]
    return (codes.double() @ weight.double().t()).to(torch.int32)
