"""`DecodeLinear`: dense float32 or bfloat16 linears whose calls of a few rows (decoding) run hfcompress's CPU loop.

A compressed model keeps some linears whole, its output layer above all (32000 x 1024 floats in a 0.47B Llama:
131 MB, more than its 4-bit blocks' 24 x 8 MB). torch's matmul took 2-4x the time of one read of such a weight
at 1-4 rows (2-core AMD EPYC, 32000x1024: 4.3 ms at one row, where summing the weight takes 1.1 ms), so at batch
1 the output layer cost a 4-bit model as much as all its blocks. `dense_matmul` (`csrc/wq_gemv_cpu.cpp`) reads
each weight row once for every input row: AVX-512F where the CPU has it, else AVX2 (HFCOMPRESS_CPU_ISA=avx2
keeps AVX2), float32 products and sums as torch's (only the order of the sums differs; bfloat16 weights widen
exactly, the inputs too, and the result is rounded to bfloat16 once, as torch's bfloat16 matmul does).

Quantizing with `hfcompress.quantize` and loading a quantized hfcompress checkpoint with `from_pretrained` make the
model's output layer a `DecodeLinear` where it is a plain `nn.Linear` (by class, in place: the same module,
parameters, hooks and state dict); `use_decode_loop(model)` does it for every plain `nn.Linear` of any model. Other
linears are left to torch, so a reloaded model computes what the model in memory computed, to the bit. In everything
else it is an `nn.Linear`: calls the loop does not serve (more than `DENSE_MAX_ROWS` rows, another device or dtype,
a gradient to compute, HFCOMPRESS_CPU_KERNELS=0, no compiler) are `nn.Linear.forward`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .cpu_extension import load, unavailable_reason
from .kernels import cpu_isa

__all__ = ["DENSE_MAX_ROWS", "DecodeLinear", "use_decode_loop", "use_for_output_layer"]

logger = logging.getLogger(__name__)

# calls of up to this many rows take the loop, by the weight's dtype: against torch's matmul on 32000x1024, 1024x1024,
# 4096x1024, 1024x4096, 11008x4096 and 32000x4096 (2 AMD EPYC cores) the AVX-512 loop took, in float32, 0.14-0.47x
# torch's time at 1-4 rows, 0.27-0.66x at 8, 0.39-0.86x at 12, 0.68-1.13x at 16 (the AVX2 loop: 0.15-0.46x,
# 0.43-0.74x, 0.60-0.84x, 0.77-1.10x); in bfloat16 (torch: oneDNN with AVX-512 BF16) 0.21-0.27x at one row,
# 0.29-0.62x at 2, 0.36-1.24x at 4 (AVX2: 0.29-0.38x, 0.42-0.94x, 0.57-1.33x)
DENSE_MAX_ROWS = {torch.float32: 12, torch.bfloat16: 2}


class DecodeLinear(nn.Linear):
    """An `nn.Linear` whose float32 or bfloat16 calls of up to `DENSE_MAX_ROWS` rows (by dtype) on an AVX2 CPU,
    with no gradient to compute, take hfcompress's dense loop (`dense_matmul`); everything else is
    `nn.Linear.forward`."""

    PLAIN_LINEAR = True  # nothing compressed it (`core.structure.is_plain_linear`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._loop_serves(x):
            return super().forward(x)
        flat = x.reshape(-1, self.in_features).float().contiguous()
        y = load().dense_matmul(flat, self.weight, self._decode_isa == "avx512")
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _loop_serves(self, x: torch.Tensor) -> bool:
        weight, bias = self.weight, self.bias
        if x.dtype not in DENSE_MAX_ROWS or weight.dtype != x.dtype or x.device.type != "cpu":
            return False
        if weight.device.type != "cpu" or not weight.is_contiguous() or x.numel() == 0:
            return False
        if x.numel() > DENSE_MAX_ROWS[x.dtype] * x.shape[-1]:
            return False
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return False
        isa = getattr(self, "_decode_isa", None)
        if isa is None:  # chosen on the first call, as quantized layers choose their kernel
            isa = self._decode_isa = _loop_isa()
        return isa != "off"


def _loop_isa() -> str:
    reason = unavailable_reason()
    if reason is not None:
        logger.info("dense linears keep torch's matmul for decoding (%s)", reason)
        return "off"
    return "avx512" if cpu_isa() == "auto" and load().has_avx512() else "avx2"


def use_decode_loop(model: nn.Module, output_layer_only: bool = False) -> list[str]:
    """Make every plain `nn.Linear` of `model` (with `output_layer_only`, only its output layer,
    `get_output_embeddings()`) a `DecodeLinear`, in place; their names."""
    names = []
    head = model.get_output_embeddings() if output_layer_only and hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if type(module) is nn.Linear and (not output_layer_only or module is head):
            module.__class__ = DecodeLinear
            names.append(name)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        logger.info("dense linears (%s) take hfcompress's CPU loop for decoding calls", shown)
    return names


def use_for_output_layer(model: nn.Module, manifest=None) -> None:
    """The quantization rebuilders' `finish`: a loaded quantized checkpoint's output layer takes the loop."""
    use_decode_loop(model, output_layer_only=True)
