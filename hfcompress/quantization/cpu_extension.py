"""The AVX2 weight-only matmul (`csrc/wq_gemv_cpu.cpp`), compiled on first use with torch's C++ extension
builder and cached (in TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions). Without a compiler, on a CPU
without AVX2, or with HFCOMPRESS_CPU_KERNELS=0, `load()` returns None and layers dequantize instead."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

__all__ = ["load", "unavailable_reason"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "wq_gemv_cpu.cpp"
_state: dict[str, object] = {}


def unavailable_reason() -> str | None:
    """Why the extension cannot be used here, or None."""
    if os.environ.get("HFCOMPRESS_CPU_KERNELS", "1") == "0":
        return "disabled by HFCOMPRESS_CPU_KERNELS=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"CPU capability {capability} (needs AVX2)"
    load()
    return _state.get("error")


def load():
    """The compiled module, or None (the reason is logged once)."""
    if "module" in _state or "error" in _state:
        return _state.get("module")
    try:
        from torch.utils.cpp_extension import load as build

        name = "hfcompress_wq_cpu_" + hashlib.sha1(SOURCE.read_bytes()).hexdigest()[:10]  # a new source, a new build
        logger.info("building the CPU weight-only kernels (once per machine; cached by torch)")
        _state["module"] = build(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no headers, a failed build: the layers still work, dequantizing
        _state["error"] = (
            f"could not build the CPU kernels: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        logger.warning("%s; quantized layers dequantize instead", _state["error"])
        return None
    return _state["module"]
