"""The kernels hfcompress wraps rather than owns, behind `kernels.py`'s interface (`supports(layer, device, dtype)`
giving None or the reason it does not apply, construction from a `QuantLinear`, a call on the input): torch's fused
weight-only CPU ops (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) and the experimental Triton kernel."""

from __future__ import annotations

import os

import torch

from ..core.packing import pack_codes

__all__ = ["INT4_GROUPS", "Int4CpuKernel", "Int8CpuKernel", "TritonW4Kernel", "cpu_float"]

INT4_GROUPS = (256, 128, 64, 32)


def cpu_float(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether inputs on `device` in `dtype` are floating point on a CPU (what every CPU kernel takes)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


class Int4CpuKernel:
    name = "int4pack-cpu"

    @staticmethod
    def group_for(layer) -> int | None:
        if layer.group_size != layer.in_features:
            return layer.group_size if layer.group_size in INT4_GROUPS else None
        return next((g for g in INT4_GROUPS if layer.in_features % g == 0), None)

    @classmethod
    def supports(cls, layer, device, dtype) -> str | None:
        """None when the kernel applies, else why not."""
        if layer.bits != 4:
            return f"{layer.bits}-bit"
        if not cpu_float(device, dtype):
            return f"{device.type}/{dtype}"
        if layer.out_features % 16:
            return f"out_features {layer.out_features} not a multiple of 16"
        if cls.group_for(layer) is None:
            return f"group size {layer.group_size} not one of {INT4_GROUPS}"
        return None

    def __init__(self, layer, dtype):
        self.out_features, self.in_features = layer.out_features, layer.in_features
        self.group = self.group_for(layer)
        codes = layer.codes()
        scale = layer.weight_scale.float()
        zero = layer.zero_points().float()
        self.perm = None
        if layer.weight_g_idx is not None:
            # visit columns group by group so every group is contiguous for the kernel
            self.perm = torch.argsort(layer.weight_g_idx, stable=True)
            codes = codes[:, self.perm]
        if self.group != layer.group_size:  # per-channel: repeat the row's scale over the kernel's groups
            repeats = layer.in_features // self.group
            scale, zero = scale.repeat_interleave(repeats, dim=1), zero.repeat_interleave(repeats, dim=1)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
        # the kernel computes (code - 8) * scale + offset
        self.scales_and_zeros = torch.stack([scale, scale * (8 - zero)], dim=-1).transpose(0, 1).contiguous().to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


class Int8CpuKernel:
    name = "int8pack-cpu"

    @staticmethod
    def supports(layer, device, dtype) -> str | None:
        if layer.bits != 8:
            return f"{layer.bits}-bit"
        if not cpu_float(device, dtype):
            return f"{device.type}/{dtype}"
        if layer.weight_scale.shape[1] != 1:
            return "grouped scales (the int8 kernel takes one scale per row)"
        return None

    def __init__(self, layer, dtype):
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = (layer.codes().to(torch.int32) - 128).to(torch.int8).contiguous()
        scale = layer.weight_scale.float()[:, 0]
        self.scale = scale.to(dtype)
        # (code - zero) * s = (code - 128) * s + (128 - zero) * s: the second term is the same for every column
        offset = scale * (128 - layer.zero_points().float()[:, 0])
        self.offset = None if layer.sym else offset.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scale)
        if self.offset is not None:
            y = y + flat.sum(dim=-1, keepdim=True) * self.offset
        return y.reshape(*x.shape[:-1], self.out_features)


class TritonW4Kernel:
    """4 bits on CUDA with fp16/bf16 inputs: the experimental Triton kernel (opt-in, see hfcompress/experimental)."""

    name = "triton-w4"

    @staticmethod
    def supports(layer, device, dtype) -> str | None:
        if layer.bits != 4:
            return f"{layer.bits}-bit"
        if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
            return f"{device.type}/{dtype}"
        if os.environ.get("HFCOMPRESS_EXPERIMENTAL_TRITON") != "1":
            return "experimental, enable with HFCOMPRESS_EXPERIMENTAL_TRITON=1"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if layer.in_features % 64 or layer.out_features % 64 or layer.group_size % 16:
            return "shapes not multiples of 64"
        return None

    def __init__(self, layer, dtype):
        from ..experimental.triton_w4 import w4_matmul  # triton: optional, and only with CUDA

        self.matmul = w4_matmul
        self.out_features, self.in_features = layer.out_features, layer.in_features
        codes = layer.codes()
        self.perm = None
        if layer.weight_g_idx is not None:
            self.perm = torch.argsort(layer.weight_g_idx, stable=True)
            codes = codes[:, self.perm]

        self.packed = pack_codes(codes, 4).contiguous()
        self.scale = layer.weight_scale.float().contiguous()
        self.zero_scale = (layer.zero_points().float() * self.scale).contiguous()
        self.group = layer.group_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        flat = x.reshape(-1, self.in_features).contiguous()
        y = self.matmul(flat, self.packed, self.scale, self.zero_scale, self.group)
        return y.reshape(*x.shape[:-1], self.out_features)
