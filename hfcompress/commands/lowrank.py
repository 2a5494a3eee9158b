"""Handlers of `hfcompress factorize` and `hfcompress merge-lora`."""

from __future__ import annotations

import argparse
import logging
import time

from ..hub.record import Step
from ..io import check_output_dir
from ..lowrank import LowRankConfig, factorize, merge_lora
from .arguments import config_kwargs
from .loading import load_model, load_tokenizer
from .recording import base_record, save_model_output

__all__ = ["run_factorize", "run_merge_lora"]

logger = logging.getLogger(__name__)


def run_factorize(args: argparse.Namespace) -> int:
    config = LowRankConfig(**config_kwargs(args, LowRankConfig))
    check_output_dir(args.output, args.overwrite)
    model = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.model)
    record = base_record(model, args.model, args, tokenizer)
    start = time.perf_counter()
    factorize(model, config, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    logger.info("factorized in %.1fs", seconds)
    settings = config.to_dict()
    data = {k: settings.pop(k) for k in ("dataset", "num_samples", "seq_len", "batch_size")}
    settings["ranks"] = dict(model.config.quantization_config.lowrank)
    step = Step("factorization", config.method, settings, data if config.needs_data else None, seconds)
    save_model_output(model, args, tokenizer, record, step)
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
    record = base_record(model, args.model, args, tokenizer)  # continues the record of a compressed model
    start = time.perf_counter()
    merge_lora(model, args.adapter, rank=rank)
    step = Step("lora-merge", "lowrank-update", {"adapter": args.adapter, "rank": rank}, None, time.perf_counter() - start)
    save_model_output(model, args, tokenizer, record, step)
    return 0
