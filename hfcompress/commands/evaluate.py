"""Handler of `hfcompress evaluate`."""

from __future__ import annotations

import argparse
import json
import math
import os

from ..evaluation import evaluate
from ..steps.loading import load_model, load_tokenizer

__all__ = ["run_evaluate"]


def run_evaluate(args: argparse.Namespace) -> int:
    if args.seq_len is not None and args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2, got {args.seq_len}")
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
    )
    result["model"] = args.model
    if not math.isfinite(result["perplexity"]):  # a corrupt checkpoint must not pass for a result
        raise ValueError(f"{args.model}: perplexity is {result['perplexity']}; the model's outputs are not finite")
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        for key, value in result.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{key:<{width}}  {shown}")
    return 0
