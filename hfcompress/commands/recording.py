"""What every command that writes a model records: the base model, the step, metrics before and after, and the
card; and the `--push-to-hub`, `--eval-dataset` options they share."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from ..hub.record import CompressionRecord, Step, command_line, hardware_description

__all__ = [
    "add_record_options",
    "base_record",
    "finish_output",
    "model_metrics",
    "push_if_asked",
    "quality_metrics",
    "save_model_output",
]

logger = logging.getLogger(__name__)


def add_record_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--eval-dataset",
        default=None,
        help="Text to measure perplexity and latency on, before and after, for the compression record and card "
        "(default: only size, parameters and bits per weight are recorded).",
    )
    parser.add_argument("--eval-seq-len", type=int, default=512, help="Tokens per evaluation window (default: 512).")
    parser.add_argument("--eval-max-windows", type=int, default=50, help="Evaluation windows scored (default: 50).")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="Push OUTPUT to this Hub repo when done.")
    parser.add_argument("--private", action="store_true", help="With --push-to-hub: create the repo private.")


def stored_parameters(model: torch.nn.Module) -> int:
    """Weights the model represents: its parameters, plus every packed weight of a quantized or sparse layer
    (zeros included)."""
    from ..core.registry import compressed_layer_types
    from ..evaluation.footprint import is_bitsandbytes_linear

    total, seen = 0, set()
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]  # tied weights count once
        seen.update(id(p) for p in params)
        own = sum(p.numel() for p in params)
        if is_bitsandbytes_linear(module):  # a packed 4-bit weight holds two weights per element
            own = module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
        elif isinstance(module, compressed_layer_types()):
            own += module.in_features * module.out_features
        total += own
    return total


def model_metrics(model, args: argparse.Namespace, tokenizer, folder=None, stored_bits: float | None = None) -> dict:
    """Size of the weight files in `folder`, parameters, bits per weight, and with --eval-dataset perplexity and
    latency of one window."""
    from ..evaluation import bits_per_weight, perplexity, weights_size_bytes
    from ..evaluation.latency import forward_latency

    metrics = {
        "size_bytes": weights_size_bytes(folder) if folder is not None and os.path.isdir(folder) else None,
        "parameters": stored_parameters(model),
        "bits_per_weight": stored_bits if stored_bits is not None else bits_per_weight(model),
    }
    if args.eval_dataset:
        windows = _eval_windows(args, tokenizer)
        model.eval()
        metrics["perplexity"] = perplexity(model, windows)
        metrics["latency_s"] = forward_latency(model, windows[:1], runs=5)
    return metrics


def _eval_windows(args, tokenizer):
    from ..data import load_texts, tokenize_windows

    cached = getattr(args, "_eval_windows", None)
    if cached is None:
        cached = tokenize_windows(tokenizer, load_texts(args.eval_dataset), args.eval_seq_len)[: args.eval_max_windows]
        args._eval_windows = cached
    return cached


def _base_card_data(model_path: str) -> dict:
    readme = Path(model_path) / "README.md"
    if readme.is_file():
        from huggingface_hub import ModelCard

        try:
            return ModelCard.load(readme).data.to_dict()
        except Exception as e:  # a malformed base card must not stop the compression
            logger.warning("could not read the base model card %s: %s", readme, e)
    return {}


def base_record(model, model_path: str, args: argparse.Namespace, tokenizer) -> CompressionRecord:
    """The record of the base model with its metrics, measured before anything changes. A model hfcompress
    wrote continues its own record: the new step joins the chain and "before" stays the original model's."""
    from ..hub.record import RECORD_FILE
    from .loading import checkpoint_dtype

    if os.path.isfile(os.path.join(model_path, RECORD_FILE)):
        record = CompressionRecord.load(model_path)
        record.command = f"{record.command} && {command_line()}" if record.command else command_line()
        if args.eval_dataset and "perplexity" not in record.metrics.get("before", {}):
            logger.info("%s was compressed before: its record keeps the original model's metrics as 'before'", model_path)
        return record

    base = _base_card_data(model_path) if os.path.isdir(model_path) else {}
    stored_bits = torch.finfo(checkpoint_dtype(model_path)).bits
    record = CompressionRecord(
        base_model=model_path,
        base_revision=getattr(model.config, "_commit_hash", None),
        license=base.get("license"),
        pipeline_tag="text-generation" if hasattr(model, "generate") and model.can_generate() else None,
        command=command_line(),
    )
    folder = model_path if os.path.isdir(model_path) else None
    record.metrics["before"] = model_metrics(model, args, tokenizer, folder, stored_bits=stored_bits)
    if args.eval_dataset:
        record.hardware = hardware_description()
    return record


def quality_metrics(model, args: argparse.Namespace, tokenizer) -> dict:
    """Perplexity and latency of the compressed model in memory (with --eval-dataset), measured before its
    full-precision parts are cast back to the checkpoint dtype for saving."""
    return {k: v for k, v in model_metrics(model, args, tokenizer).items() if k in ("perplexity", "latency_s")}


def finish_output(
    record: CompressionRecord, step: Step, model, args, staging: Path, quality: dict, requires_hfcompress: bool
) -> None:
    """Add the step and the after-metrics to `record`, write it and the card into `staging` (the output folder
    being written)."""
    from ..evaluation import bits_per_weight, weights_size_bytes
    from ..hub.card import generate_card

    record.steps.append(step)
    record.loading = {"requires_hfcompress": requires_hfcompress}
    record.metrics["after"] = {
        "size_bytes": weights_size_bytes(staging),
        "parameters": stored_parameters(model),
        "bits_per_weight": bits_per_weight(model),
        **quality,
    }
    if args.eval_dataset:
        record.evaluation = {
            "dataset": args.eval_dataset,
            "seq_len": args.eval_seq_len,
            "num_windows": len(args._eval_windows),
            "protocol": "perplexity over non-overlapping windows, each scored on its own; latency: median forward "
            "time of one window, 5 runs after one warm-up; the model evaluated in memory before saving",
        }
    record.save(staging)
    generate_card(staging, repo_id=args.push_to_hub)


def push_if_asked(args: argparse.Namespace) -> None:
    if args.push_to_hub:
        from ..hub.push import push_to_hub

        url = push_to_hub(args.output, args.push_to_hub, private=args.private or None)
        logger.info("pushed to %s", url)


def save_model_output(model, args: argparse.Namespace, tokenizer, record, step, before_save=None, cast=True) -> None:
    """Measure the result, then write it to args.output as a complete folder (tokenizer, record, card) that
    replaces nothing until it is complete; push it when asked. `before_save(model)` runs after the quality
    measurement (to switch to a storage form such as bitmask-sparse layers). `cast=False` keeps the dtypes as
    they are (a bitsandbytes model manages its own)."""
    from ..io import atomic_output_dir, copy_model_extras
    from ..quantization.modules import cast_unquantized
    from .loading import checkpoint_dtype

    quality = quality_metrics(model, args, tokenizer)
    if before_save is not None:
        before_save(model)
    if cast:  # what stayed dense goes back to the checkpoint's own dtype (often float16)
        cast_unquantized(model, checkpoint_dtype(args.model))
    with atomic_output_dir(args.output, args.overwrite) as staging:
        model.save_pretrained(staging)
        if os.path.isdir(args.model):
            copy_model_extras(args.model, staging)
        else:
            tokenizer.save_pretrained(staging)
        requires = getattr(model.config, "quantization_config", None) is not None
        finish_output(record, step, model, args, staging, quality, requires_hfcompress=requires)
    logger.info("wrote %s", args.output)
    push_if_asked(args)
