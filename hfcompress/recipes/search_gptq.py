"""The GPTQ points of the search, for about the cost of one GPTQ run.

One walk over the blocks quantizes every layer at every bit width (`quantize_streams`: one calibration stream
per width, so the uniform points are exactly what `hfcompress quantize gptq --bits B` gives). Each layer's
sensitivity at each width is a second-order estimate of the KL divergence it costs: its mean squared output
error per channel from that walk, weighted by the Fisher information of the channel from one backward pass
(`core.fisher.output_fisher`), with no probe of any layer. A knapsack picks the widths per layer, and a second
walk runs GPTQ with those widths, as `layer_bits` would: a mixed model assembled from the uniform walk's layers
was 1.3% worse in perplexity on ../shared/refmodel (each layer was calibrated behind layers of its own width).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from pathlib import Path

from ..checkpoint import manifest_of
from ..core.config import CALIBRATION_FIELDS
from ..core.fisher import output_fisher
from ..core.structure import cast_unquantized
from ..data import calibration_data
from ..hub.record import Step
from ..quantization.config import GPTQConfig
from ..quantization.export import FUSED_SIBLINGS
from ..quantization.gptq_streams import assemble, quantize_streams
from ..quantization.plan import split_layer_bits
from ..quantization.save import write_quantized
from ..steps.loading import checkpoint_dtype
from ..steps.options import OutputOptions
from ..steps.recording import base_record, write_output
from .allocation import allocate, grid_bits_per_weight
from .budget import Baseline
from .candidates import Candidate, SearchCache
from .recipe import Recipe
from .search_config import SearchConfig
from .sensitivity import fisher_scores, monotone, plot_sensitivity, sensitivity_table

__all__ = ["allocate_bits", "cached_scores", "gptq_candidates", "gptq_step", "search_gptq_config", "write_scores"]

logger = logging.getLogger(__name__)


def gptq_step(config: SearchConfig, bits: int, layer_bits: dict[str, int] | None = None) -> dict:
    settings = {"method": "gptq", "bits": bits, "group_size": config.group_size, "num_samples": config.num_samples,
                "seq_len": config.seq_len, "hessian_dtype": config.hessian_dtype}  # fmt: skip
    if config.sym:
        settings["sym"] = True
    if layer_bits:
        settings["layer_bits"] = layer_bits
    return {"quantize": settings}


def search_gptq_config(config: SearchConfig, bits: int, layer_bits: dict[str, int] | None = None) -> GPTQConfig:
    """The GPTQ settings of the search's points: `bits` (and `layer_bits` overrides) with the search's grid and
    calibration."""
    return GPTQConfig(
        bits=bits, layer_bits=layer_bits, group_size=config.group_size, dataset=config.dataset,
        num_samples=config.num_samples, seq_len=config.seq_len, sym=config.sym, hessian_dtype=config.hessian_dtype,
    )  # fmt: skip


def cached_scores(cache: SearchCache, settings: list[str]) -> dict[str, dict[str, float]] | None:
    """The sensitivities measured before at every one of `settings`, or None."""
    scores = cache.data["scores"]
    if not scores or not all(set(settings) <= set(row) for row in scores.values()):
        return None
    return scores


def gptq_candidates(
    model_path: str, dense, tokenizer, base: Baseline, config: SearchConfig, calib, work: Path, cache: SearchCache
) -> list[Candidate]:
    """Uniform GPTQ at every width of `config.bits_options`, and mixed widths per layer at the budget (and
    `neighbour_bits` either side of it), each written to `work/candidates/<name>` (a complete checkpoint with
    record, card and recipe). Two walks over the blocks: every width, then the mixed allocations."""
    folders = work / "candidates"
    names = list(base.linear_shapes)
    uniform = [
        (Candidate(f"gptq-{b}bit", "gptq", [gptq_step(config, b)], "uniform", built=True), dict.fromkeys(names, b))
        for b in config.bits_options
    ]
    settings = [f"{b}bit" for b in config.bits_options]
    target = base.linear_bits_target(config.budget)
    gptq_config = search_gptq_config(config, max(config.bits_options))
    prepared = {}

    def walk(streams: dict[str, dict[str, int]]):
        if not prepared:  # the windows of `calib`, tokenized once: the same ones `quantize` takes from the text
            prepared["batches"] = calibration_data(dense, dataclasses.replace(gptq_config, dataset=calib), tokenizer)
            prepared["record"] = base_record(dense, model_path, OutputOptions(overwrite=True), tokenizer)
        return quantize_streams(dense, gptq_config, streams, batches=prepared["batches"])

    def build(pairs, phase: str):
        """GPTQ for the points of `pairs` not measured before, in one walk; their per-layer results (or None)."""
        todo = [(c, bits) for c, bits in pairs if cache.evaluated(c, folders / c.name) is None]
        if not todo:
            return None
        start = time.perf_counter()
        results = walk({c.name: bits for c, bits in todo})
        seconds = time.perf_counter() - start
        cache.add_seconds(phase, seconds)
        logger.info("%s: %d GPTQ runs in one walk over the blocks, %.1fs", phase, len(todo), seconds)
        start = time.perf_counter()
        for candidate, _ in todo:
            quantized = assemble(dense, gptq_config, results[candidate.name])
            folder = folders / candidate.name
            record = prepared["record"]
            _write_candidate(
                quantized, candidate, model_path, folder, tokenizer, record, config, seconds / len(todo), dense
            )
        cache.add_seconds("write_candidates", time.perf_counter() - start)
        cache.save()
        return results

    scores = cached_scores(cache, settings)  # layers outside the block stack have none (RTN, widest width)
    if scores is None:
        results = build(uniform, "gptq_every_width")
        if results is None:  # every uniform point was measured before, but not the scores: one more walk
            results = walk({c.name: bits for c, bits in uniform})
        errors = {
            setting: {n: r.row_error for n, r in results[c.name].items()}
            for setting, (c, _) in zip(settings, uniform, strict=True)
        }
        start = time.perf_counter()
        fisher = output_fisher(dense, calib[: config.sensitivity_samples], names)
        scores = fisher_scores(fisher, errors)
        cache.data["scores"] = scores
        cache.add_seconds("fisher_scores", time.perf_counter() - start)
        cache.save()
        write_scores(scores, config, work)
    else:
        build(uniform, "gptq_every_width")
    mixed = _mixed_candidates(monotone(scores, settings), base, config, target)
    build(mixed, "gptq_mixed")
    return [c for c, _ in [*uniform, *mixed]]


def _mixed_candidates(scores, base: Baseline, config: SearchConfig, target: float | None) -> list[tuple]:
    """Mixed widths from the knapsack at the target bits per weight and `neighbour_bits` either side of it
    (none for a parameter budget, which quantization cannot change)."""
    if target is None:
        return []
    mixed = []
    for bits in sorted({round(target + d, 3) for d in (-config.neighbour_bits, 0.0, config.neighbour_bits)}):
        layer_bits = allocate_bits(scores, base, config, bits)
        if layer_bits is None or len(set(layer_bits.values())) < 2:
            continue  # unreachable, or the same as a uniform point
        default, overrides = split_layer_bits(layer_bits)
        candidate = Candidate(
            f"gptq-mixed-{bits:.2f}", "gptq", [gptq_step(config, default, overrides)],
            f"knapsack at {bits:.2f} bits", built=True,
        )  # fmt: skip
        mixed.append((candidate, layer_bits))
    return mixed


def allocate_bits(scores, base: Baseline, config: SearchConfig, target_bits: float) -> dict[str, int] | None:
    """The width of every linear layer that minimizes the summed scores within `target_bits` per weight; a layer
    without scores (outside the block stack) keeps the widest. With `config.tie_siblings`, the linears a serving
    engine fuses (`FUSED_SIBLINGS`: q/k/v, gate/up) are one item of the knapsack and get one width."""
    options, choices = {}, {}
    for item, names in _items(base.linear_shapes, config.tie_siblings).items():
        rows = [scores.get(name, {}) for name in names]
        usable = [b for b in config.bits_options if all(f"{b}bit" in row for row in rows)] or [max(config.bits_options)]
        options[item] = [
            (
                sum(o * i * grid_bits_per_weight(b, config.group_size, i, sym=config.sym)
                    for o, i in (base.linear_shapes[n] for n in names)),
                sum(row.get(f"{b}bit", 0.0) for row in rows),
            )
            for b in usable
        ]  # fmt: skip
        choices[item] = (names, usable)
    picked = allocate(options, target_bits * base.linear_weights)
    if picked is None:
        return None
    return {name: choices[item][1][index] for item, index in picked.items() for name in choices[item][0]}


def _items(shapes: dict, tie: bool) -> dict[str, list[str]]:
    """The knapsack's items: each linear alone, or with `tie` the fused siblings of one module together."""
    items: dict[str, list[str]] = {}
    for name in shapes:
        parent, _, leaf = name.rpartition(".")
        family = next((f for f in FUSED_SIBLINGS if leaf in f), None) if tie else None
        key = f"{parent}.{'+'.join(family)}" if family else name
        items.setdefault(key, []).append(name)
    return items


def write_scores(scores, config: SearchConfig, work: Path) -> None:
    (work / "sensitivity.md").write_text(
        "Estimated mean KL divergence of the next-token distributions from the full-precision model's when one "
        "layer alone takes its GPTQ weight at each bit width: ½ Σ_r F_r e_r, with e_r the mean squared error of "
        f"output channel r over the GPTQ calibration ({config.num_samples} windows of {config.seq_len} tokens of "
        f"{config.dataset}) and F_r the Fisher information of that channel ({config.sensitivity_samples} windows, "
        "one backward pass):\n\n" + sensitivity_table(scores),
        encoding="utf-8",
    )
    plot_sensitivity(scores, work / "sensitivity.png")


def _write_candidate(quantized, candidate: Candidate, model_path, folder: Path, tokenizer, record, config,
                     seconds: float, dense) -> None:  # fmt: skip
    settings = dict(manifest_of(quantized).recipe)
    data = {k: settings.pop(k) for k in CALIBRATION_FIELDS if k in settings}
    data.update(getattr(dense, "hfcompress_calibration", None) or {})
    cast_unquantized(quantized, checkpoint_dtype(model_path))
    step = Step("quantization", "gptq", settings, data, seconds)
    options = OutputOptions(overwrite=True)
    write_output(
        quantized, model_path, folder, tokenizer, copy.deepcopy(record), step, options, {}, save=write_quantized
    )
    recipe = Recipe.from_dict({"steps": candidate.steps, "dataset": config.dataset})
    (folder / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
