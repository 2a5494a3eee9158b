"""Optional third-party backends, kept quiet: what they log at import concerns features hfcompress does not use.

bitsandbytes (imported by transformers and peft whenever it is installed, not by hfcompress unless a bitsandbytes
quantization is asked for) logs at import, on CPUs with AVX512-BF16, that an optional accelerated 4-bit kernel
from the `kernels` package is missing; every command printed it, even with `-q`. bitsandbytes quantization works
without that kernel.
"""

from __future__ import annotations

import logging

__all__: list[str] = []


def _not_about_the_kernels_package(record: logging.LogRecord) -> bool:
    return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_about_the_kernels_package)
