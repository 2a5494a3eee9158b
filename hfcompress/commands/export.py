"""Handlers of `hfcompress export gguf` and `hfcompress export compressed-tensors`."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ..hub.push import check_repo_id
from ..hub.record import Step
from ..quantization.ct_export import export_compressed_tensors
from ..quantization.gguf_export import export_gguf
from ..steps.options import OutputOptions
from ..steps.recording import push_output, record_rewrite

__all__ = ["run_export_compressed_tensors", "run_export_gguf"]


def run_export_gguf(args: argparse.Namespace) -> int:
    export_gguf(args.model, args.output, overwrite=args.overwrite)
    return 0


def run_export_compressed_tensors(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.push_to_hub:
        check_repo_id(args.push_to_hub)  # before the export, not after it

    def record(staging: Path) -> None:  # the record and card of MODEL, with this step
        step = Step("export", "compressed-tensors", {"source": os.path.abspath(args.model)}, None,
                    time.perf_counter() - start)  # fmt: skip
        record_rewrite(args.model, staging, step, repo_id=args.push_to_hub)

    export_compressed_tensors(args.model, args.output, overwrite=args.overwrite, on_staging=record)
    push_output(args.output, OutputOptions(push_to_hub=args.push_to_hub, private=args.private))
    return 0
