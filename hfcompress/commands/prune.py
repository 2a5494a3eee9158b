"""Handlers of `hfcompress prune oneshot` and `hfcompress prune structured`."""

from __future__ import annotations

import argparse
import logging
import time

from ..hub.record import Step
from ..io import check_output_dir
from .arguments import config_kwargs
from .loading import load_model, load_tokenizer
from .recording import base_record, save_model_output

__all__ = ["run_oneshot", "run_structured"]

logger = logging.getLogger(__name__)


def run_oneshot(args: argparse.Namespace) -> int:
    from ..pruning import OneShotPruningConfig, compress_sparse, prune_oneshot

    config = OneShotPruningConfig(**config_kwargs(args, OneShotPruningConfig))
    if config.method != "magnitude" and config.dataset is None:
        raise ValueError(f"--method {config.method} needs calibration data: pass --dataset")
    check_output_dir(args.output, args.overwrite)
    model = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.model)
    record = base_record(model, args.model, args, tokenizer)
    start = time.perf_counter()
    prune_oneshot(model, config, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    logger.info("pruned in %.1fs", seconds)
    settings = config.to_dict()
    data = {k: settings.pop(k) for k in ("dataset", "num_samples", "seq_len", "batch_size")}
    step = Step("pruning", config.method, settings, data if config.method != "magnitude" else None, seconds)
    before_save = (lambda m: compress_sparse(m)) if args.storage == "bitmask" else None
    save_model_output(model, args, tokenizer, record, step, before_save=before_save)
    return 0


def _importance_batches(args: argparse.Namespace, model, tokenizer):
    if args.dataset is None:
        return None
    if args.task != "causal-lm":
        raise ValueError(
            "--dataset gives Taylor importance from the language-modelling loss, so it needs --task causal-lm; "
            "for a classifier, call hfcompress.prune_structured(model, batches=...) with labelled batches"
        )
    from ..data import calibration_batches, calibration_windows

    windows = calibration_windows(model, args.dataset, args.seq_len, tokenizer)
    return calibration_batches(windows, args.num_samples, args.batch_size)


def run_structured(args: argparse.Namespace) -> int:
    from ..pruning import prune_structured

    for name in ("heads", "ffn"):
        value = getattr(args, name)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"--{name} must be a fraction in [0, 1), got {value}")
    if args.heads == 0 and args.ffn == 0:
        raise ValueError("nothing to prune: give --heads and/or --ffn")
    check_output_dir(args.output, args.overwrite)
    model = load_model(args.model, args.dtype, task=args.task)
    tokenizer = load_tokenizer(args.model)
    record = base_record(model, args.model, args, tokenizer)
    batches = _importance_batches(args, model, tokenizer)
    start = time.perf_counter()
    prune_structured(model, heads=args.heads, ffn=args.ffn, batches=batches)
    seconds = time.perf_counter() - start
    settings = {
        "heads": args.heads,
        "ffn": args.ffn,
        "importance": "taylor" if batches is not None else "magnitude",
        "num_attention_heads": getattr(model.config, "num_attention_heads", None),
        "intermediate_size": getattr(model.config, "intermediate_size", None),
    }
    data = None
    if batches is not None:
        data = {"dataset": args.dataset, "num_samples": args.num_samples, "seq_len": args.seq_len, "batch_size": args.batch_size}
    step = Step("structured-pruning", "taylor" if batches is not None else "magnitude", settings, data, seconds)
    save_model_output(model, args, tokenizer, record, step)
    return 0
