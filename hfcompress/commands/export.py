"""Handlers of `hfcompress export gguf` and `hfcompress export compressed-tensors`."""

from __future__ import annotations

import argparse

from ..quantization.ct_export import export_compressed_tensors
from ..quantization.gguf_export import export_gguf

__all__ = ["run_export_compressed_tensors", "run_export_gguf"]


def run_export_gguf(args: argparse.Namespace) -> int:
    export_gguf(args.model, args.output, overwrite=args.overwrite)
    return 0


def run_export_compressed_tensors(args: argparse.Namespace) -> int:
    export_compressed_tensors(args.model, args.output, overwrite=args.overwrite)
    return 0
