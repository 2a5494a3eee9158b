"""Handler of `hfcompress export gguf`."""

from __future__ import annotations

import argparse

from ..quantization.gguf_export import export_gguf

__all__ = ["run_export_gguf"]


def run_export_gguf(args: argparse.Namespace) -> int:
    export_gguf(args.model, args.output, overwrite=args.overwrite)
    return 0
