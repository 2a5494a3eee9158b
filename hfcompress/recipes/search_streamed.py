"""The GPTQ search on a model streamed from its checkpoint (`hfcompress search --offload disk`), for models that
memory would not hold. The sensitivities are those the search measures on the model loaded whole
(`streamed_sensitivity.streamed_gptq_scores`: one walk over the blocks read from disk at every width, and a
backward pass streamed the same way); the knapsack picks the widths per layer at the budget
(`search_gptq.allocate_bits`), and one streamed GPTQ run (`hfcompress quantize gptq --offload disk` with those
`layer_bits`) writes the chosen model. The choice rests on the estimated KL divergence alone (no candidates are
built to compare); the original model and the written one are then evaluated streamed from disk as well
(`evaluation.streamed_perplexity`: the perplexity on the evaluation windows, one block in memory at a time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..core.streaming import ShardedCheckpoint
from ..evaluation import bits_per_weight, weights_size_bytes
from ..evaluation.streamed import streamed_perplexity
from ..hub.record import Step, peak_memory
from ..quantization.ct_export import rewrite_streamed
from ..quantization.plan import split_layer_bits
from ..steps.compress import compress_folder
from ..steps.offload import decide_streaming
from ..steps.options import OutputOptions
from ..steps.recording import record_rewrite
from .allocation import grid_bits_per_weight
from .budget import Baseline, measure_baseline, nonzero_parameters
from .candidates import SearchCache
from .recipe import Recipe
from .search_config import SearchConfig
from .search_gptq import allocate_bits, cached_scores, gptq_step, search_gptq_config, write_scores
from .sensitivity import monotone
from .streamed_sensitivity import streamed_gptq_scores

__all__ = ["OFFLOADS", "search_streamed", "should_stream_search", "streamed_baseline"]

logger = logging.getLogger(__name__)

OFFLOADS = ("auto", "none", "disk")


def should_stream_search(model: str, config: SearchConfig, offload: str, max_memory: str | None) -> bool:
    """Whether the search streams `model` from disk: always with `disk` (refusing what a streamed search cannot
    do; a model that cannot stream loads whole, saying why), never with `none`, and with `auto` when the model in
    float32 (what the search holds it in) would not fit in `max_memory`, or the memory available."""
    if offload not in OFFLOADS:
        raise ValueError(f"--offload must be one of {', '.join(OFFLOADS)}, got {offload!r}")
    return decide_streaming(model, offload, "float32", max_memory, _search_obstacle(config), "this search")


def _search_obstacle(config: SearchConfig) -> str | None:
    if config.techniques != ["gptq"]:
        return (
            f"--offload disk searches GPTQ widths per layer only, got --techniques {','.join(config.techniques)}: "
            "add --techniques gptq"
        )
    return None


def streamed_baseline(model: str) -> Baseline:
    """The budget's baseline from the checkpoint's skeleton on the meta device: no weight is read."""
    checkpoint = ShardedCheckpoint(model)
    return measure_baseline(checkpoint.skeleton("causal-lm", checkpoint.stored_dtype()), model)


def search_streamed(
    model: str, output: Path, config: SearchConfig, base: Baseline, calib: torch.Tensor, eval_windows: torch.Tensor,
    work: Path, cache: SearchCache, resume: bool,
) -> dict[str, Any]:  # fmt: skip
    """Sensitivities (reused from `cache` when measured before), widths per layer at the budget, the streamed
    GPTQ run that writes them to `output`, and the perplexity on `eval_windows` of the original model (reused
    from `cache` too) and of `output`, both streamed; `work` (output/search) gets sensitivity.md/.png,
    allocation.md and results.json. With `resume`, a GPTQ run killed before its end continues from its last
    finished block."""
    settings = [f"{b}bit" for b in config.bits_options]
    scores = cached_scores(cache, settings)
    if scores is None:
        start = time.perf_counter()
        gptq = dataclasses.replace(search_gptq_config(config, max(config.bits_options)), dataset=calib)
        scores = streamed_gptq_scores(
            model, gptq, config.bits_options, calib[: config.sensitivity_samples], folder=work
        )  # fmt: skip
        cache.data["scores"] = scores
        cache.add_seconds("streamed_scores", time.perf_counter() - start)
        cache.save()
        write_scores(scores, config, work)
    else:
        logger.info("sensitivities measured before: reusing them")

    target = base.linear_bits_target(config.budget)
    layer_bits = allocate_bits(monotone(scores, settings), base, config, target)
    if layer_bits is None:
        raise ValueError(f"no allocation of {config.bits_options} bits meets budget {config.budget}")
    default, overrides = split_layer_bits(layer_bits)
    name = f"gptq-mixed-{target:.2f}" if overrides else f"gptq-{default}bit"
    steps = [gptq_step(config, default, overrides)]

    folder = work / "candidates" / name
    start = time.perf_counter()
    compress_folder(
        model, folder, search_gptq_config(config, default, overrides or None),
        OutputOptions(overwrite=True, offload="disk", resume=resume),
    )  # fmt: skip
    cache.add_seconds("gptq_streamed", time.perf_counter() - start)
    cache.save()
    recipe = Recipe.from_dict({"steps": steps, "dataset": config.dataset})
    (folder / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    for item in output.iterdir():  # a model an earlier search (--resume with another budget) published
        if item.name != "search":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    _move_into(folder, output)  # moved, not copied: the checkpoint may be as large as the disk allows once

    start = time.perf_counter()
    dense = cache.data.get("dense") or _streamed_metrics(model, eval_windows, base, work)
    cache.data["dense"] = dense
    metrics = _streamed_metrics(output, eval_windows, base, work)
    cache.add_seconds("evaluate_streamed", time.perf_counter() - start)
    cache.save()
    if config.format != "hfcompress":  # evaluated in hfcompress's format above: streaming reads that one
        _rewrite(output, work / "candidates" / f"{name}-{config.format}", config.format)
        metrics["size_bytes"] = weights_size_bytes(output)
    point = {
        "name": name, "technique": "gptq", "steps": steps, "description": f"knapsack at {target:.2f} bits",
        **metrics, "planned_bits": _planned_bits(layer_bits, base, config),
        "estimated_kl": sum(scores[n][f"{b}bit"] for n, b in layer_bits.items() if n in scores),
        "meets_budget": base.meets(config.budget, metrics),
    }  # fmt: skip
    original = {"name": "dense", "technique": "none", "steps": [], "description": "the original model", **dense,
                "meets_budget": base.meets(config.budget, dense)}  # fmt: skip
    results = {
        "budget": str(config.budget), "metric": "perplexity", "offload": "disk", "evaluated": True,
        "chosen": name, "points": [original, point], "layer_bits": layer_bits, "seconds": cache.data["seconds"],
        "peak_memory": peak_memory(),  # of the whole search: sensitivities, the GPTQ run, the evaluations
    }  # fmt: skip
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    _write_allocation(layer_bits, point, original, config, work)
    return results


def _rewrite(output: Path, folder: Path, format: str) -> None:
    """The model in `output` rewritten in `format` shard by shard through `folder`, with its record and card
    (`hfcompress export compressed-tensors`); its files replace those of the same names in `output` (the shards
    keep their names), the rest (recipe.yaml, `search/`) stays."""
    start = time.perf_counter()
    folder.mkdir(parents=True)
    rewrite_streamed(output, folder, "causal-lm", format)
    record_rewrite(output, folder, Step("export", format, {}, None, time.perf_counter() - start))
    _move_into(folder, output)


def _move_into(folder: Path, output: Path) -> None:
    """Move everything in `folder` into `output`, replacing what has the same name, and remove `folder`."""
    for item in folder.iterdir():
        os.replace(item, output / item.name)
    shutil.rmtree(folder)


def _streamed_metrics(folder, windows: torch.Tensor, base: Baseline, work: Path) -> dict[str, Any]:
    """What the in-memory search measures of a point, without holding its model whole: the perplexity streamed
    from its shards (block inputs in `work`), its size on disk, and the bits and parameters counted on its
    skeleton. No latency."""
    checkpoint = ShardedCheckpoint(folder)
    skeleton = checkpoint.skeleton("causal-lm", checkpoint.stored_dtype(), compressed=True)
    return {
        "perplexity": streamed_perplexity(folder, windows, folder=work),
        "size_bytes": weights_size_bytes(folder),
        "effective_bits": base.effective_bits(skeleton),
        "bits_per_weight": bits_per_weight(skeleton),
        "parameters": nonzero_parameters(skeleton),
    }


def _planned_bits(layer_bits: dict[str, int], base: Baseline, config: SearchConfig) -> float:
    """Stored bits per weight of the allocation (`grid_bits_per_weight`: what each `QuantLinear` holds)."""
    total = sum(
        o * i * grid_bits_per_weight(layer_bits[n], config.group_size, i, sym=config.sym)
        for n, (o, i) in base.linear_shapes.items()
    )
    return total / base.linear_weights


def _write_allocation(layer_bits: dict[str, int], point: dict, original: dict, config: SearchConfig,
                      work: Path) -> None:  # fmt: skip
    rows = "\n".join(f"| {n} | {b} |" for n, b in layer_bits.items())
    (work / "allocation.md").write_text(
        f"Widths per layer at budget {config.budget}, chosen by a knapsack over the estimated KL divergence of each "
        f"layer at each width (sensitivity.md): {point['effective_bits']:.3f} bits per weight, "
        f"{point['size_bytes'] / 1e6:.2f} MB of weights, estimated KL {point['estimated_kl']:.4g}.\n\n"
        f"Perplexity on the evaluation text, streamed from disk (--offload disk): {point['perplexity']:.4f}, the "
        f"original model {original['perplexity']:.4f} ({original['size_bytes'] / 1e6:.2f} MB). Only this point "
        "was built: the streamed search compares no candidates.\n\n"
        f"| layer | bits |\n|---|---|\n{rows}\n",
        encoding="utf-8",
    )
