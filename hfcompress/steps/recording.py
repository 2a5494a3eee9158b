"""What every step that writes a model records: the base model, the step, metrics before and after, and the
card; and the push to the Hub when asked."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import ModelCard

from ..checkpoint import QUANT_METHOD
from ..core.registry import compressed_layer_types
from ..core.tasks import task_of
from ..data import load_texts, resolve_seq_len, tokenize_windows
from ..evaluation import bits_per_weight, perplexity, weights_size_bytes
from ..evaluation.footprint import file_digest, is_bitsandbytes_linear, model_bits_per_parameter, weight_files
from ..evaluation.latency import forward_latency
from ..evaluation.streamed import streamed_perplexity
from ..evaluation.tasks import evaluate_tasks
from ..hub.card import generate_card
from ..hub.push import push_to_hub
from ..hub.record import (
    PIPELINE_TAGS,
    RANK_PEAKS,
    RECORD_FILE,
    CompressionRecord,
    Step,
    command_line,
    hardware_description,
    peak_memory,
)
from ..io import atomic_output_dir, copy_model_extras
from ..quantization.ct_readers import experts_transformers_cannot_load, has_packed_zero_points, stored_expert_tensors
from .loading import checkpoint_dtype
from .options import OutputOptions

__all__ = [
    "base_record",
    "finish_output",
    "loading_needs",
    "model_metrics",
    "push_output",
    "quality_metrics",
    "record_rewrite",
    "stored_parameters",
    "write_output",
]

logger = logging.getLogger(__name__)


def stored_parameters(model: torch.nn.Module) -> int:
    """Weights the model represents: its parameters, plus every packed weight of a quantized or sparse layer
    (zeros included)."""

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


def model_metrics(
    model, options: OutputOptions, tokenizer, folder=None, dtype_bits: int | None = None, streamed: bool = False
) -> dict:
    """Size of the weight files in `folder`, parameters, bits per weight (of the compressed layers, and of the
    whole model; floating tensors counted at `dtype_bits`, the checkpoint's dtype), and with --eval-dataset
    perplexity and latency of one window. With `streamed`, `model` is the skeleton of the model in `folder` (its
    weights on the meta device): the perplexity is streamed from `folder` one block at a time, and there is no
    latency."""

    metrics = {
        "size_bytes": weights_size_bytes(folder) if folder is not None and os.path.isdir(folder) else None,
        "parameters": stored_parameters(model),
        "bits_per_weight": bits_per_weight(model, dtype_bits),
        "model_bits_per_parameter": model_bits_per_parameter(model, dtype_bits),
    }
    if options.eval_dataset and streamed:
        metrics["perplexity"] = streamed_perplexity(folder, _eval_windows(options, tokenizer, model))
    elif options.eval_dataset:
        windows = _eval_windows(options, tokenizer, model)
        model.eval()
        metrics["perplexity"] = perplexity(model, windows)
        metrics["latency_s"] = forward_latency(model, windows[:1], runs=5)
    if options.eval_tasks:
        metrics["tasks"] = evaluate_tasks(
            model, tokenizer, options.eval_tasks, tasks_dir=options.eval_tasks_dir, limit=options.eval_limit,
            quiet=options.quiet,
        )  # fmt: skip
    return metrics


def _eval_windows(options: OutputOptions, tokenizer, model):
    if options.eval_windows is None:
        options.eval_seq_len = resolve_seq_len(model, options.eval_seq_len)
        windows = tokenize_windows(tokenizer, load_texts(options.eval_dataset), options.eval_seq_len)
        options.eval_windows = windows[: options.eval_max_windows]
    return options.eval_windows


def _base_card_data(model_path: str) -> dict:
    readme = Path(model_path) / "README.md"
    if readme.is_file():
        try:
            return ModelCard.load(readme).data.to_dict()
        except Exception as e:  # a malformed base card must not stop the compression
            logger.warning("could not read the base model card %s: %s", readme, e)
    return {}


def _pipeline_tag(model) -> str | None:
    """The Hub's pipeline tag of the task `model` was loaded for (a causal LM's only if it generates)."""
    try:
        task = task_of(model.config.model_type, [type(model).__name__])
    except ValueError:
        return None
    if task == "causal-lm" and not (hasattr(model, "generate") and model.can_generate()):
        return None  # a class transformers does not know, taken for a causal LM
    return PIPELINE_TAGS.get(task)


def base_record(model, model_path: str, options: OutputOptions, tokenizer, streamed: bool = False) -> CompressionRecord:
    """The record of the base model with its metrics, measured before anything changes. A model hfcompress
    wrote continues its own record: the new step joins the chain and "before" stays the original model's.
    `streamed`: `model` is the skeleton of the model at `model_path` (see `model_metrics`)."""

    if os.path.isfile(os.path.join(model_path, RECORD_FILE)):
        record = CompressionRecord.load(model_path)
        record.command = f"{record.command} && {command_line()}" if record.command else command_line()
        if options.eval_dataset and "perplexity" not in record.metrics.get("before", {}):
            logger.info(
                "%s was compressed before: its record keeps the original model's metrics as 'before'", model_path
            )
        return record

    base = _base_card_data(model_path) if os.path.isdir(model_path) else {}
    dtype_bits = torch.finfo(checkpoint_dtype(model_path)).bits
    record = CompressionRecord(
        base_model=model_path,
        base_is_local=os.path.isdir(model_path),
        base_revision=getattr(model.config, "_commit_hash", None),
        license=base.get("license"),
        pipeline_tag=_pipeline_tag(model),
        command=command_line(),
    )
    folder = model_path if os.path.isdir(model_path) else None
    record.metrics["before"] = model_metrics(
        model, options, tokenizer, folder, dtype_bits=dtype_bits, streamed=streamed
    )
    if options.eval_dataset:
        record.hardware = hardware_description()
    return record


def quality_metrics(model, options: OutputOptions, tokenizer, folder=None, streamed: bool = False) -> dict:
    """Perplexity and latency (with --eval-dataset) and lm-eval task scores (with --eval-tasks) of the compressed
    model in memory, measured before its full-precision parts are cast back to the checkpoint dtype for saving;
    with `streamed`, the perplexity of the model written in `folder`, streamed from it (`model`: its skeleton)."""
    metrics = model_metrics(model, options, tokenizer, folder, streamed=streamed)
    return {k: v for k, v in metrics.items() if k in ("perplexity", "latency_s", "tasks")}


def finish_output(
    record: CompressionRecord, step: Step, model, options, staging: Path, quality: dict, streamed: bool = False,
) -> None:  # fmt: skip
    """Add the step and the after-metrics to `record`, write it and the card into `staging` (the output folder
    being written). `streamed`: the quality was measured streaming the written model from disk."""

    if step.memory is None or set(step.memory) == {RANK_PEAKS}:  # measured now: loading and evaluating counted
        ranks = (step.memory or {}).get(RANK_PEAKS)
        step.memory = peak_memory()
        if ranks and "peak_rss_bytes" in step.memory:  # rank 0's own as it is now, the others' as they finished
            step.memory[RANK_PEAKS] = [step.memory["peak_rss_bytes"], *ranks[1:]]
    record.steps.append(step)
    record.loading = loading_needs(staging)
    record.metrics["after"] = {
        "size_bytes": weights_size_bytes(staging),
        "parameters": stored_parameters(model),
        "bits_per_weight": bits_per_weight(model),
        "model_bits_per_parameter": model_bits_per_parameter(model),
        **quality,
    }
    if options.eval_dataset:
        record.evaluation = {
            "dataset": options.eval_dataset,
            "seq_len": options.eval_seq_len,
            "num_windows": len(options.eval_windows),
            "protocol": "perplexity over non-overlapping windows, each scored on its own; "
            + (
                "both models streamed from their checkpoints one block at a time (--offload disk), the compressed "
                "one after saving; no latency"
                if streamed
                else "latency: median forward time of one window, 5 runs after one warm-up; the model evaluated in "
                "memory before saving"
            ),
        }
    if options.eval_tasks:
        record.evaluation = {
            **(record.evaluation or {}),
            "tasks": options.eval_tasks,
            "tasks_protocol": "lm-evaluation-harness on the model in memory before saving"
            + (f", the first {options.eval_limit} documents of each task" if options.eval_limit else ""),
        }
    # what `hfcompress verify` checks the files against later
    record.files = {f.name: file_digest(f) for f in weight_files(staging)}
    record.save(staging)
    generate_card(staging, repo_id=options.push_to_hub)


def record_rewrite(source: str | os.PathLike, staging: Path, step: Step, repo_id: str | None = None) -> None:
    """Carry the compression record and card of the model folder `source` into `staging` (or update them in
    place where both are one folder), where `step` (an export) rewrote its weights in another format: the step
    joins the chain, and the size of the weights, what loading them needs and the files `hfcompress verify`
    checks are the new ones; the card's loading code names `repo_id` when given. Nothing where `source` has no
    record (a checkpoint saved from Python)."""
    if not (Path(source) / RECORD_FILE).is_file():
        return
    record = CompressionRecord.load(source)
    command = command_line()
    if not (record.command or "").endswith(command):  # unless the command that wrote `source` rewrites it too
        record.command = f"{record.command} && {command}" if record.command else command
    record.steps.append(step)
    record.loading = loading_needs(staging)
    record.metrics.setdefault("after", {})["size_bytes"] = weights_size_bytes(staging)
    record.files = {f.name: file_digest(f) for f in weight_files(staging)}
    record.save(staging)
    readme = Path(source) / "README.md"
    if readme.is_file() and readme.resolve() != (Path(staging) / "README.md").resolve():  # the user's text is kept
        shutil.copyfile(readme, Path(staging) / "README.md")
    generate_card(staging, repo_id=repo_id)


def write_output(
    model,
    source: str,
    output: str | os.PathLike,
    tokenizer,
    record: CompressionRecord,
    step: Step,
    options: OutputOptions,
    quality: dict,
    save=None,
) -> Path:
    """Write `model` to `output` as a complete folder (weights, config, tokenizer or the files beside the source
    model, record, card) that replaces nothing until it is complete, then push it when asked.

    `save(model, folder)` writes the weights (default: `save_pretrained`). The record says the folder needs
    hfcompress to load when its config names the hfcompress quantization method."""
    with atomic_output_dir(output, options.overwrite) as staging:
        (save or _save_pretrained)(model, staging)
        if os.path.isdir(source):
            copy_model_extras(source, staging)
        elif tokenizer is not None:
            tokenizer.save_pretrained(staging)
        finish_output(record, step, model, options, staging, quality)
    logger.info("wrote %s", output)
    push_output(output, options)
    return Path(output)


def push_output(output, options: OutputOptions) -> None:
    """Push the written folder `output` to the Hub when `options.push_to_hub` names a repo."""
    if options.push_to_hub:
        url = push_to_hub(output, options.push_to_hub, private=options.private or None)
        logger.info("pushed to %s", url)


def _save_pretrained(model, folder) -> None:
    model.save_pretrained(folder)


def loading_needs(folder: Path) -> dict:
    """What loading the model written in `folder` needs (the record's `loading`): hfcompress, for its own format;
    for an asymmetric compressed-tensors checkpoint, a compressed-tensors that reads packed zero points; for one
    whose experts transformers does not load, hfcompress's reader (why, under "not_in_transformers")."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    quantization = config.get("quantization_config") or {}
    needs = {"requires_hfcompress": quantization.get("quant_method") == QUANT_METHOD}
    if has_packed_zero_points(quantization):
        needs["packed_zero_points"] = True
    unloadable = experts_transformers_cannot_load(stored_expert_tensors(folder), quantization)
    if unloadable:
        needs["not_in_transformers"] = unloadable
    return needs
