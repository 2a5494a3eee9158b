"""Handler of `hfcompress recipe`."""

from __future__ import annotations

import argparse

from ..recipes import run_recipe

__all__ = ["run_recipe_command"]


def run_recipe_command(args: argparse.Namespace) -> int:
    run_recipe(
        args.recipe,
        args.model,
        args.output,
        resume=args.resume,
        overwrite=args.overwrite,
        quiet=args.quiet,
        dtype=args.dtype,
        offload=args.offload,
        max_memory=args.max_memory,
    )
    return 0
