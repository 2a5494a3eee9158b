"""Handlers of `hfcompress distill` and `hfcompress merge-lora`."""

from __future__ import annotations

import argparse

from ..steps import DistillArguments, distill_folder, merge_lora_folder
from .arguments import config_kwargs
from .compress import output_options

__all__ = ["run_distill", "run_merge_lora"]


def run_distill(args: argparse.Namespace) -> int:
    distill_folder(
        args.teacher, args.output, DistillArguments(**config_kwargs(args, DistillArguments)), output_options(args)
    )
    return 0


def run_merge_lora(args: argparse.Namespace) -> int:
    merge_lora_folder(args.model, args.adapter, args.output, args.rank, output_options(args))
    return 0
