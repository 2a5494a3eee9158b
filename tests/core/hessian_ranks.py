"""Run by tests/core/test_hessian.py, alone or under torchrun: each process sums the Hessian of its share of fixed
samples (every rank-th batch of three), in float32 and in float64; rank 0 saves both, made full, to argv[1]."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from hfcompress.core.distributed import init_from_environment, rank, world_size
from hfcompress.core.hessian import Hessian


def samples() -> torch.Tensor:
    """Samples of very different scales, as activations are: float32 sums of them round differently by order."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 50, 40, generator=g) * torch.randn(12, 1, 40, generator=g).exp() * 3


if __name__ == "__main__":
    init_from_environment()
    full = {}
    for dtype in (torch.float32, torch.float64):
        hessian = Hessian(40, "cpu", dtype=dtype)
        for batch in samples().split(3)[rank() :: world_size()]:
            hessian.add(batch)
        full[str(dtype)] = hessian.full()
    if rank() == 0:
        save_file(full, sys.argv[1])
    if world_size() > 1:
        dist.destroy_process_group()
