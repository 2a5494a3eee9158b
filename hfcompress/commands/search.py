"""Handler of `hfcompress search`."""

from __future__ import annotations

import argparse
import logging

from ..recipes.search import SearchConfig, search

__all__ = ["run_search"]

logger = logging.getLogger(__name__)


def _numbers(text: str, cast, flag: str) -> list:
    try:
        return [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def run_search(args: argparse.Namespace) -> int:
    config = SearchConfig(
        budget=args.budget, dataset=args.dataset, eval_dataset=args.eval_dataset, metric=args.metric,
        techniques=args.techniques, bits_options=_numbers(args.bits_options, int, "--bits-options"),
        group_size=args.group_size, num_samples=args.num_samples, seq_len=args.seq_len,
        sensitivity_samples=args.sensitivity_samples, eval_seq_len=args.eval_seq_len,
        eval_max_windows=args.eval_max_windows, neighbour_bits=args.neighbour_bits,
        lowrank_ratios=_numbers(args.lowrank_ratios, float, "--lowrank-ratios"),
        prune_sparsities=_numbers(args.prune_sparsities, float, "--prune-sparsities"), format=args.format,
        hessian_dtype=args.hessian_dtype,
    )  # fmt: skip
    results = search(
        args.model, args.output, config, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
        offload=args.offload, max_memory=args.max_memory,
    )  # fmt: skip
    chosen = next(p for p in results["points"] if p["name"] == results["chosen"])
    if results.get("offload") == "disk":
        original = results["points"][0]
        logger.info(
            "chosen: %s, %.3f bits per weight, perplexity %.4g (the original model %.4g), streamed from disk; widths: "
            "%s/search/allocation.md", chosen["name"], chosen["effective_bits"], chosen["perplexity"],
            original["perplexity"], args.output,
        )  # fmt: skip
        return 0
    logger.info(
        "chosen: %s, %s %.4g, %.3f bits per weight; table: %s/search/pareto.md",
        chosen["name"], results["metric"], chosen[results["metric"]], chosen["effective_bits"], args.output,
    )  # fmt: skip
    return 0
