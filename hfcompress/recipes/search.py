"""The search for the best compression under a budget: measure each layer's sensitivity, allocate settings per
layer with a knapsack, then build and evaluate the candidates and keep the best one that meets the budget.

Budgets: `bits=B` (stored bits per weight of the compressed linear layers, from the checkpoint's size on disk),
`size=F` (fraction of the model's weight bytes on disk), `params=F` (fraction of its parameters, zeros of pruned
layers not counted). Techniques: `gptq` (mixed bits per layer from measured sensitivities, and uniform bits),
`lowrank` (whitened SVD with ranks per layer from hfcompress's factorization sensitivity allocation), `prune`
(SparseGPT at a uniform sparsity, stored as bitmask).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..core.structure import candidate_linears
from ..data import load_texts, looks_local, tokenize_windows
from ..evaluation import bits_per_weight, perplexity, weights_size_bytes
from ..evaluation.latency import forward_latency
from ..io import claim_output
from ..quantization.modules import QuantLinear
from ..steps.loading import load_model, load_tokenizer, resolve_model_path
from .allocation import allocate, grid_bits_per_weight
from .budget import Baseline, Budget, check_reachable, measure_baseline, nonzero_parameters
from .recipe import Recipe
from .runner import run_recipe
from .search_config import TECHNIQUES, SearchConfig
from .search_report import pareto_front, write_reports
from .sensitivity import layer_sensitivity, monotone, plot_sensitivity, sensitivity_table

__all__ = ["TECHNIQUES", "Budget", "SearchConfig", "search"]

logger = logging.getLogger(__name__)

CACHE_FILE = "cache.json"


@dataclass
class Candidate:
    name: str
    technique: str
    steps: list[dict[str, Any]]
    note: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


class _Cache:
    def __init__(self, path: Path, fingerprint: str, resume: bool):
        self.path = path
        data = json.loads(path.read_text(encoding="utf-8")) if resume and path.is_file() else {}
        if data and data.get("fingerprint") != fingerprint:
            logger.warning("%s was measured with other data or settings; measuring again", path)
            data = {}
        self.data = {"fingerprint": fingerprint, "sensitivity": {}, "candidates": {}, **data}
        if self.data.get("sensitivity_measure") != "kl":  # caches from before the KL measure
            self.data["sensitivity"], self.data["sensitivity_measure"] = {}, "kl"

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def _steps_key(steps) -> str:
    return json.dumps(steps, sort_keys=True)


def search(
    model: str,
    output: str | os.PathLike,
    config: SearchConfig,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Find the best compression of `model` within `config.budget`, write it to `output` with its recipe, and
    the Pareto table, plot and sensitivities under `output/search/`. Returns the results (also results.json)."""

    with claim_output(output, overwrite=True, inputs=[model, config.dataset, config.eval_dataset]):
        return _search(model, output, config, resume, overwrite, quiet)


def _search(model: str, output, config: SearchConfig, resume: bool, overwrite: bool, quiet: bool) -> dict[str, Any]:
    resolve_model_path(model)
    for name in ("dataset", "eval_dataset"):
        path = getattr(config, name)
        if looks_local(path) and not os.path.exists(path):
            raise FileNotFoundError(f"`{name}` {path!r} does not exist")
    tokenizer = load_tokenizer(model)
    config.resolve_windows(AutoConfig.from_pretrained(resolve_model_path(model)))
    calib = tokenize_windows(tokenizer, load_texts(config.dataset), config.seq_len)
    if len(calib) < config.sensitivity_samples:
        raise ValueError(
            f"{config.dataset} gives {len(calib)} windows of {config.seq_len} tokens; the sensitivity pass needs "
            f"sensitivity_samples={config.sensitivity_samples}: give more text or lower --sensitivity-samples/--seq-len"
        )
    dense = load_model(model, "float32")
    base = measure_baseline(dense, model)
    check_reachable(base, config)

    output = Path(output)
    resuming = resume and (output / "search").is_dir()
    if resume and not resuming and output.is_dir() and any(output.iterdir()):
        raise FileExistsError(f"{os.fspath(output)!r} is not empty and holds no search to resume")
    if not resuming:
        _prepare_output(output, False, overwrite)
    work = output / "search"
    (work / "candidates").mkdir(parents=True, exist_ok=True)
    cache = _Cache(work / CACHE_FILE, config.fingerprint(model), resume)
    eval_windows = tokenize_windows(tokenizer, load_texts(config.eval_dataset), config.eval_seq_len)
    eval_windows = eval_windows[: config.eval_max_windows]

    dense_metrics = cache.data.get("dense") or _evaluate(dense, model, eval_windows, base)
    cache.data["dense"] = dense_metrics
    cache.save()

    candidates: list[Candidate] = []
    if "gptq" in config.techniques:
        candidates += _gptq_candidates(model, dense, base, config, calib, work, cache, eval_windows, quiet)
    if "lowrank" in config.techniques:
        candidates += _lowrank_candidates(base, config, work)
    if "prune" in config.techniques:
        candidates += _prune_candidates(base, config)
    for candidate in candidates:
        _build_and_evaluate(candidate, model, config, work, cache, eval_windows, base, quiet)
    failed = [c for c in candidates if not c.metrics]
    candidates = [c for c in candidates if c.metrics]

    points = [Candidate("dense", "none", [], "the original model", dense_metrics), *candidates]
    for point in points:
        point.metrics["meets_budget"] = base.meets(config.budget, point.metrics)
    front = pareto_front(points, config.metric)
    eligible = [p for p in points if p.metrics["meets_budget"]]
    if not eligible:
        smallest = min(points, key=lambda p: p.metrics["size_bytes"])
        raise ValueError(
            f"no evaluated candidate meets budget {config.budget}; the smallest is {smallest.name} "
            f"({smallest.metrics['effective_bits']:.3f} bits per weight, {smallest.metrics['size_bytes'] / 1e6:.2f} MB, "
            f"{smallest.metrics['parameters']} parameters)"
        )
    best = min(eligible, key=lambda p: p.metrics[config.metric])
    results = write_reports(points, front, best, config, base, work, failed)
    if best.name != "dense":
        _publish_candidate(work / "candidates" / best.name, output)
    else:
        logger.warning(
            "the original model already meets budget %s and is the best point; OUTPUT holds no model", config.budget
        )
    logger.info("best within %s: %s (%s %.4g)", config.budget, best.name, config.metric, best.metrics[config.metric])
    return results


@torch.no_grad()
def _evaluate(model, folder: str | os.PathLike, windows, base: Baseline) -> dict[str, Any]:
    model.eval()
    size = weights_size_bytes(folder)
    return {
        "perplexity": perplexity(model, windows),
        "size_bytes": size,
        "effective_bits": base.effective_bits(model),
        "bits_per_weight": bits_per_weight(model),
        "parameters": nonzero_parameters(model),
        "latency_s": forward_latency(model, windows[:1], runs=5),
    }


def _gptq_step(config: SearchConfig, bits: int, layer_bits: dict[str, int] | None = None) -> dict:
    settings = {"method": "gptq", "bits": bits, "group_size": config.group_size, "num_samples": config.num_samples,
                "seq_len": config.seq_len}  # fmt: skip
    if layer_bits:
        settings["layer_bits"] = layer_bits
    return {"quantize": settings}


def _gptq_candidates(model_path, dense, base, config, calib, work, cache, eval_windows, quiet) -> list[Candidate]:
    """Uniform GPTQ at every bit width (also the source of the sensitivities), then mixed allocations at the
    budget and either side of it."""
    uniform = [Candidate(f"gptq-{b}bit", "gptq", [_gptq_step(config, b)], "uniform") for b in config.bits_options]
    for candidate in uniform:
        _build_and_evaluate(candidate, model_path, config, work, cache, eval_windows, base, quiet)
    target = base.linear_bits_target(config.budget)
    if target is None:  # quantization keeps the parameter count: uniform points for the table only
        return uniform
    sensitivity = _gptq_sensitivity(dense, uniform, config, calib, work, cache)
    mixed = []
    for bits in sorted({round(target + d, 3) for d in (-config.neighbour_bits, 0.0, config.neighbour_bits)}):
        layer_bits = _allocate_bits(sensitivity, base, config, bits)
        if layer_bits is None or len(set(layer_bits.values())) < 2:
            continue  # unreachable, or the same as a uniform point
        default = max(set(layer_bits.values()), key=list(layer_bits.values()).count)
        overrides = {n: b for n, b in layer_bits.items() if b != default}
        name = f"gptq-mixed-{bits:.2f}"
        mixed.append(Candidate(name, "gptq", [_gptq_step(config, default, overrides)], f"knapsack at {bits:.2f} bits"))
    return uniform + mixed


def _allocate_bits(sensitivity, base: Baseline, config: SearchConfig, target_bits: float) -> dict[str, int] | None:
    options, choices = {}, {}
    for name, (out_features, in_features) in base.linear_shapes.items():
        row = sensitivity.get(name, {})
        usable = [b for b in config.bits_options if f"{b}bit" in row]
        if not usable:
            continue
        weights = out_features * in_features
        options[name] = [
            (weights * grid_bits_per_weight(b, config.group_size, in_features), row[f"{b}bit"]) for b in usable
        ]
        choices[name] = usable
    picked = allocate(options, target_bits * base.linear_weights)
    if picked is None:
        return None
    return {name: choices[name][index] for name, index in picked.items()}


def _gptq_sensitivity(dense, uniform: list[Candidate], config, calib, work: Path, cache: _Cache) -> dict:
    done = cache.data["sensitivity"]  # mean KL divergence per layer and bit width
    variants = {}
    for candidate in uniform:
        setting = candidate.name.split("-")[1]  # "4bit"
        if all(setting in done.get(n, {}) for n in _linear_names(dense)):
            continue
        quantized = AutoModelForCausalLM.from_pretrained(work / "candidates" / candidate.name, dtype=torch.float32)
        variants[setting] = {
            n: m.dequantize_weight(torch.float32) for n, m in quantized.named_modules() if isinstance(m, QuantLinear)
        }
        del quantized

    def remember(name, setting, value):
        cache.data["sensitivity"].setdefault(name, {})[setting] = value
        cache.save()

    results = layer_sensitivity(dense, calib[: config.sensitivity_samples], variants, done=done, on_result=remember)
    (work / "sensitivity.md").write_text(
        "Mean KL divergence of the next-token distributions from the full-precision model's when one layer alone "
        f"takes its GPTQ weight at each bit width ({config.sensitivity_samples} windows of {config.seq_len} tokens "
        f"of {config.dataset}):\n\n" + sensitivity_table(results),
        encoding="utf-8",
    )
    plot_sensitivity(results, work / "sensitivity.png")
    return monotone(results, [f"{b}bit" for b in config.bits_options])


def _linear_names(model) -> list[str]:
    return list(candidate_linears(model, None))


def _lowrank_candidates(base: Baseline, config: SearchConfig, work: Path) -> list[Candidate]:
    ratio = base.kept_fraction_target(config.budget)
    ratios = {r for r in config.lowrank_ratios if 0.1 <= r < 1}
    if 0.1 <= ratio < 1:
        ratios.add(round(ratio, 3))
    elif ratio < 0.1:
        logger.info("lowrank cannot meet %s (it would keep %.3f of the parameters)", config.budget, ratio)
    candidates = []
    for r in sorted(ratios):
        settings = {"method": "whiten", "param_ratio": r, "allocation": "sensitivity", "num_samples": config.num_samples,
                    "seq_len": config.seq_len, "sensitivity_cache": os.fspath(work / "lowrank-sensitivity.json")}  # fmt: skip
        candidates.append(
            Candidate(f"lowrank-{r:.3f}", "lowrank", [{"factorize": settings}], "whitened SVD, ranks by sensitivity")
        )
    return candidates


def _prune_candidates(base: Baseline, config: SearchConfig) -> list[Candidate]:
    kept = base.kept_fraction_target(config.budget)
    if config.budget.kind != "params":  # a bitmask costs one bit per weight
        kept = (base.linear_bits_target(config.budget) - 1) / base.dtype_bits
    sparsities = {s for s in config.prune_sparsities if 0 < s <= 0.9}
    if 0 < 1 - kept <= 0.9:
        sparsities.add(round(1 - kept, 3))
    elif 1 - kept > 0.9:
        logger.info("pruning cannot meet %s (it would need %.0f%% sparsity)", config.budget, 100 * (1 - kept))
    candidates = []
    for s in sorted(sparsities):
        settings = {"method": "sparsegpt", "sparsity": s, "num_samples": config.num_samples, "seq_len": config.seq_len}
        candidates.append(Candidate(f"prune-{s:.3f}", "prune", [{"prune": settings}], "SparseGPT, bitmask storage"))
    return candidates


def _build_and_evaluate(
    candidate: Candidate, model_path, config, work: Path, cache: _Cache, eval_windows, base, quiet
) -> None:

    folder = work / "candidates" / candidate.name
    cached = cache.data["candidates"].get(candidate.name)
    if cached and cached.get("steps") == _steps_key(candidate.steps) and folder.is_dir():
        candidate.metrics = cached["metrics"]
        logger.info("%s: evaluated before, reusing", candidate.name)
        return
    logger.info("building %s", candidate.name)
    recipe = Recipe.from_dict({"steps": candidate.steps, "dataset": config.dataset})
    try:
        run_recipe(recipe, model_path, folder, overwrite=True, quiet=quiet)
    except ValueError as e:  # a point this model cannot reach (ranks below the minimum, ...): skip it
        logger.warning("skipping %s: %s", candidate.name, e)
        candidate.note = f"failed: {e}"
        shutil.rmtree(folder, ignore_errors=True)
        return
    shutil.rmtree(folder / "steps", ignore_errors=True)  # the same model as the folder itself
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # evaluated as the dense model is
    candidate.metrics = _evaluate(model, folder, eval_windows, base)
    cache.data["candidates"][candidate.name] = {"steps": _steps_key(candidate.steps), "metrics": candidate.metrics}
    cache.save()


def _publish_candidate(folder: Path, output: Path) -> None:
    for item in folder.iterdir():
        if item.name == "steps":
            continue
        if item.is_dir():
            shutil.copytree(item, output / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, output / item.name)


def _prepare_output(output: Path, resume: bool, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {os.fspath(output)!r} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if resume:
            if not (output / "steps").is_dir():
                raise FileExistsError(f"{os.fspath(output)!r} is not empty and holds no recipe steps to resume")
            return
        if not overwrite:
            raise FileExistsError(
                f"output folder {os.fspath(output)!r} exists and is not empty: pass --resume to continue its recipe, "
                "or --overwrite to start over"
            )
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
