"""Triton kernel for 4-bit weight-only matmul on CUDA: x [M, K] (fp16/bf16) times packed int4 weights.

The weight is hfcompress's own layout (8 codes per int32 along K), groups made contiguous at repack time;
each tile is dequantized in registers (`code * scale - zero * scale`) and fed to `tl.dot`, with split-K for
small M so a batch-1 call still fills the GPU. Imported only when Triton and CUDA are present.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["w4_matmul"]


@triton.jit
def _w4_matmul_kernel(
    x_ptr, w_ptr, scale_ptr, zs_ptr, y_ptr,
    M, N, K, n_groups, stride_xm, stride_ym,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_per_split = K // SPLIT_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
        words = tl.load(w_ptr + offs_n[None, :] * (K // 8) + offs_k[:, None] // 8)
        codes = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF
        group = k0 // GROUP
        scale = tl.load(scale_ptr + offs_n * n_groups + group)
        zs = tl.load(zs_ptr + offs_n * n_groups + group)
        w = (codes.to(tl.float32) * scale[None, :] - zs[None, :]).to(x.dtype)
        acc += tl.dot(x, w)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask)


def w4_matmul(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_scale: torch.Tensor, group: int
) -> torch.Tensor:
    """y = x @ Wᵀ for W[n, k] = code[n, k] * scale[n, g] - zero_scale[n, g], g = k // group.

    `packed` is int32 [N, K/8], `scale` and `zero_scale` float32 [N, K/group]; K and N must be multiples of 64
    and `group` of 16.
    """
    M, K = x.shape
    N = packed.shape[0]
    block_k = next(b for b in (64, 32, 16) if group % b == 0)
    block_n = 64
    block_m = 16 if M <= 16 else 32
    n_tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split_k = 1
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    while n_tiles * split_k < 2 * sms and K // (split_k * 2) >= block_k and (K // (split_k * 2)) % block_k == 0:
        split_k *= 2
    y = torch.zeros(M, N, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, block_m), split_k)
    _w4_matmul_kernel[grid](
        x, packed, scale, zero_scale, y, M, N, K, scale.shape[1], x.stride(0), y.stride(0),
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
    )  # fmt: skip
    return y.to(x.dtype)
