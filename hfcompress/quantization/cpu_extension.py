"""The AVX2 weight-only matmul (`csrc/wq_gemv_cpu.cpp`, with AVX-512F loops for 4-bit and 2-weight vector codebook
decoding that run only where the CPU has AVX-512F), compiled on first use with torch's C++ extension builder. Without a compiler, on a CPU
without AVX2, or with HFCOMPRESS_CPU_KERNELS=0, `load()` returns None and layers dequantize instead.

The build is cached in TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) under a name keyed by everything
the compiled file depends on: the source, the flags, the torch version, the compiler and the Python environment.
Two environments on one machine each build once and never rebuild each other's (torch's build folder holds one
environment's paths), and the "building" line shows only when a build really runs. `hfcompress build-kernels`
builds ahead of time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

__all__ = ["build_key", "build_status", "extension_name", "load", "unavailable_reason"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "wq_gemv_cpu.cpp"
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
_state: dict[str, object] = {}


def _compiler() -> str:
    """The C++ compiler torch will call, by path and version (a compiler upgrade is a new build)."""
    name = os.environ.get("CXX", "c++")
    path = shutil.which(name) or name
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    return f"{path} {version.splitlines()[0] if version else ''}"


def build_key(source: bytes, flags: list[str], torch_version: str, compiler: str, environment: str) -> str:
    """A short digest of what the compiled extension depends on."""
    digest = hashlib.sha256()
    for part in (source, " ".join(flags).encode(), torch_version.encode(), compiler.encode(), environment.encode()):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:12]


def extension_name() -> str:
    """The cached extension's name for this source, torch, compiler and environment."""
    environment = f"{sys.prefix} {sysconfig.get_platform()} {sys.version_info[:2]}"
    key = build_key(SOURCE.read_bytes(), CFLAGS + LDFLAGS, torch.__version__, _compiler(), environment)
    return f"hfcompress_wq_cpu_{key}"


def _extensions_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def load():
    """The compiled module, or None (the reason is logged once)."""
    if "module" in _state or "error" in _state:
        return _state.get("module")
    try:
        from torch.utils.cpp_extension import load as build

        name = extension_name()
        folder = _extensions_root() / name
        folder.mkdir(parents=True, exist_ok=True)
        cached = (folder / f"{name}.so").exists()
        if not cached:
            logger.info("building the CPU weight-only kernels in %s (once per environment)", folder)
        _state["module"] = build(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(folder),
            verbose=False,
        )
        _state["built"] = not cached
        _state["folder"] = folder
    except Exception as e:  # no compiler, no headers, a failed build: the layers still work, dequantizing
        _state["error"] = (
            f"could not build the CPU kernels: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        )
        logger.warning("%s; quantized layers dequantize instead", _state["error"])
        return None
    return _state["module"]


def build_status() -> dict:
    """Load (building if needed) and say what happened: `available`, `built` (a build ran now), `folder`,
    `reason` (why not available)."""
    reason = unavailable_reason()
    return {
        "available": reason is None,
        "built": bool(_state.get("built")),
        "folder": str(_state.get("folder", "")),
        "reason": reason,
    }


def unavailable_reason() -> str | None:
    """Why the extension cannot be used here, or None."""
    if os.environ.get("HFCOMPRESS_CPU_KERNELS", "1") == "0":
        return "disabled by HFCOMPRESS_CPU_KERNELS=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"CPU capability {capability} (needs AVX2)"
    load()
    return _state.get("error")
