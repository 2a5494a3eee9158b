"""Handler of `hfcompress evaluate`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

from ..core.streaming import streaming_obstacle
from ..evaluation import evaluate, evaluate_streamed
from ..evaluation.tasks import parse_tasks
from ..steps.loading import load_model, load_tokenizer
from ..steps.offload import memory_shortfall, parse_size

__all__ = ["run_evaluate"]

logger = logging.getLogger(__name__)


def run_evaluate(args: argparse.Namespace) -> int:
    if args.dataset is None and args.tasks is None:
        raise ValueError("nothing to evaluate: give --dataset (perplexity) and/or --tasks (lm-eval tasks)")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.tasks is not None:
        parse_tasks(args.tasks)  # a bad list fails before the model loads
    if _streams(args):
        result = evaluate_streamed(args.model, load_tokenizer(args.model), args.dataset, seq_len=args.seq_len,
                                   max_windows=args.max_windows, batch_size=args.batch_size)  # fmt: skip
        return _report(args, result)
    model = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.model)
    folder = args.model if os.path.isdir(args.model) else None
    result = evaluate(
        model,
        tokenizer,
        args.dataset,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        batch_size=args.batch_size,
        latency_runs=args.latency_runs,
        model_folder=folder,
        tasks=args.tasks,
        tasks_dir=args.tasks_dir,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        quiet=args.quiet,
    )
    return _report(args, result)


def _streams(args: argparse.Namespace) -> bool:
    """Whether the perplexity is measured streaming the model from disk (`--offload`): always with `disk` (what
    needs the model whole refused), never with `none`, with `auto` when the model at --dtype would not fit in
    --max-memory and nothing asked for needs it whole, saying so."""
    limit = parse_size(args.max_memory) if args.max_memory else None
    if args.offload == "none":
        return False
    if args.offload == "disk":
        if args.tasks is not None or args.dataset is None:
            raise ValueError("--offload disk measures perplexity alone (lm-eval tasks need the model whole): give "
                             "--dataset and drop --tasks, or use --offload none")  # fmt: skip
        obstacle = streaming_obstacle(args.model)
        if obstacle is not None:
            logger.warning("cannot stream the model from disk: %s; loading it whole instead", obstacle)
        return obstacle is None
    shortfall = memory_shortfall(args.model, args.dtype, limit)
    if shortfall is None:
        return False
    needed, limit, held = shortfall
    reason = streaming_obstacle(args.model) or ("lm-eval tasks need the model whole" if args.tasks else None)
    if reason:
        logger.warning("%s needs about %.1f GB in %s, more than the %.1f GB this run may use, but %s: loading it "
                       "whole", args.model, needed / 1e9, held, limit / 1e9, reason)  # fmt: skip
        return False
    logger.warning("%s needs about %.1f GB in %s, more than the %.1f GB this run may use: streaming it from disk one "
                   "block at a time (--offload disk; no latency)", args.model, needed / 1e9, held, limit / 1e9)  # fmt: skip
    return True


def _report(args: argparse.Namespace, result: dict) -> int:
    result["model"] = args.model
    if not math.isfinite(result.get("perplexity", 0.0)):  # a corrupt checkpoint must not pass for a result
        raise ValueError(f"{args.model}: perplexity is {result['perplexity']}; the model's outputs are not finite")
    if args.json:
        print(json.dumps(result))
    else:
        rows = {k: v for k, v in result.items() if k != "tasks"}
        for task, metrics in result.get("tasks", {}).items():
            rows.update({f"{task} {metric}": value for metric, value in metrics.items()})
        width = max(map(len, rows))
        for key, value in rows.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    return 0
