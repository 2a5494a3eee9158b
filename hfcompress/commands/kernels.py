"""`hfcompress build-kernels`: compile the CPU kernels ahead of time (the first quantized model otherwise builds
them when it loads)."""

from __future__ import annotations

import argparse

from ..quantization.cpu_extension import build_status

__all__ = ["run_build_kernels"]


def run_build_kernels(args: argparse.Namespace) -> int:
    status = build_status()
    if not status["available"]:
        print(f"CPU kernels not available: {status['reason']} (quantized layers dequantize instead)")
        return 1
    print(f"CPU kernels {'built' if status['built'] else 'already built'}: {status['folder']}")
    return 0
