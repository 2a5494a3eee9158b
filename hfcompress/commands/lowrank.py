"""Handlers of `hfcompress factorize` and `hfcompress merge-lora`."""

from __future__ import annotations

import argparse
import logging
import time

from ..io import atomic_output_dir, check_output_dir, copy_model_extras
from ..lowrank import LowRankConfig, factorize, merge_lora
from ..quantization.modules import cast_unquantized
from .arguments import config_kwargs
from .loading import checkpoint_dtype, load_model, load_tokenizer

__all__ = ["run_factorize", "run_merge_lora"]

logger = logging.getLogger(__name__)


def _save(model, args: argparse.Namespace, tokenizer) -> None:
    import os

    # what stayed dense, and the factors, go back to the checkpoint's own dtype (often float16)
    cast_unquantized(model, checkpoint_dtype(args.model))
    with atomic_output_dir(args.output, args.overwrite) as staging:
        model.save_pretrained(staging)
        if os.path.isdir(args.model):
            copy_model_extras(args.model, staging)
        else:
            tokenizer.save_pretrained(staging)
    logger.info("wrote %s", args.output)


def run_factorize(args: argparse.Namespace) -> int:
    config = LowRankConfig(**config_kwargs(args, LowRankConfig))
    check_output_dir(args.output, args.overwrite)
    model = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.model)
    start = time.perf_counter()
    factorize(model, config, tokenizer=tokenizer)
    logger.info("factorized in %.1fs", time.perf_counter() - start)
    _save(model, args, tokenizer)
    return 0


def run_merge_lora(args: argparse.Namespace) -> int:
    import hfcompress  # noqa: F401  (registers the loader of factorized checkpoints)

    rank = args.rank
    if rank not in ("original", "exact"):
        try:
            rank = int(rank)
        except ValueError:
            raise ValueError(f"--rank must be 'original', 'exact' or a positive integer, got {args.rank!r}") from None
    check_output_dir(args.output, args.overwrite)
    model = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.model)
    merge_lora(model, args.adapter, rank=rank)
    _save(model, args, tokenizer)
    return 0
