"""Handler of every technique's command (`hfcompress quantize gptq`, `prune oneshot`, `factorize`, ...): the
parsed flags become the technique's config and the step's options, and `steps.compress_folder` does the rest."""

from __future__ import annotations

import argparse

from ..core.registry import techniques
from ..steps import OutputOptions, compress_folder
from .arguments import config_kwargs

__all__ = ["output_options", "run_compress"]


def output_options(args: argparse.Namespace) -> OutputOptions:
    return OutputOptions(**config_kwargs(args, OutputOptions))


def run_compress(args: argparse.Namespace) -> int:
    technique = next(t for t in techniques() if t.command == tuple(args._hfcompress_technique))
    config = technique.config_class(**config_kwargs(args, technique.config_class))
    step_options = {name: getattr(args, name) for name in technique.step_options}
    compress_folder(args.model, args.output, config, output_options(args), **step_options)
    return 0
