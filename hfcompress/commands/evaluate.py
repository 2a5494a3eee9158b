"""Handler of `hfcompress evaluate`."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

from ..evaluation import evaluate, evaluate_streamed
from ..evaluation.tasks import parse_tasks
from ..steps.loading import checkpoint_task, load_model, load_tokenizer, require_causal_lm
from ..steps.offload import decide_streaming

__all__ = ["run_evaluate"]

logger = logging.getLogger(__name__)


def run_evaluate(args: argparse.Namespace) -> int:
    if args.dataset is None and args.tasks is None:
        raise ValueError("nothing to evaluate: give --dataset (perplexity) and/or --tasks (lm-eval tasks)")
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
    if args.tasks is not None:
        parse_tasks(args.tasks)  # a bad list fails before the model loads
    require_causal_lm(args.model, checkpoint_task(args.model), "perplexity and lm-eval tasks")
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
    refused = None
    if args.tasks is not None or args.dataset is None:
        refused = (
            "--offload disk measures perplexity alone (lm-eval tasks need the model whole): give --dataset and drop "
            "--tasks, or use --offload none"
        )
    return decide_streaming(args.model, args.offload, args.dtype, args.max_memory, refused, compressed=True)


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
