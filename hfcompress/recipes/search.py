"""The search for the best compression under a budget: measure each layer's sensitivity, allocate settings per
layer with a knapsack, then build and evaluate the candidates and keep the best one that meets the budget.

Budgets: `bits=B` (stored bits per weight of the compressed linear layers, from the checkpoint's size on disk),
`size=F` (fraction of the model's weight bytes on disk), `params=F` (fraction of its parameters, zeros of pruned
layers not counted). Techniques: `gptq` (uniform bits, and mixed bits per layer from Fisher-weighted GPTQ errors:
`search_gptq.py`),
`lowrank` (whitened SVD with ranks per layer from hfcompress's factorization sensitivity allocation), `prune`
(SparseGPT at a uniform sparsity, stored as bitmask).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from ..data import load_texts, looks_local, tokenize_windows
from ..evaluation import bits_per_weight, perplexity, weights_size_bytes
from ..evaluation.latency import forward_latency
from ..hub.record import Step
from ..io import claim_output
from ..quantization.export import check_compressed_tensors_compatible
from ..quantization.modules import dequantized_forward
from ..quantization.save import write_quantized
from ..steps.loading import checkpoint_task, load_model, load_tokenizer, require_causal_lm, resolve_model_path
from ..steps.recording import record_rewrite
from .budget import Baseline, Budget, check_reachable, measure_baseline, nonzero_parameters
from .candidates import CACHE_FILE, Candidate, SearchCache, steps_key
from .recipe import Recipe
from .runner import run_recipe
from .search_config import TECHNIQUES, SearchConfig
from .search_gptq import gptq_candidates
from .search_report import pareto_front, write_reports
from .search_streamed import search_streamed, should_stream_search, streamed_baseline

__all__ = ["TECHNIQUES", "Budget", "SearchConfig", "search"]

logger = logging.getLogger(__name__)

LATENCY_RUNS = 3  # of one evaluation window, after a warm-up; the median is reported


def search(
    model: str,
    output: str | os.PathLike,
    config: SearchConfig,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    offload: str = "auto",
    max_memory: str | None = None,
) -> dict[str, Any]:
    """Find the best compression of `model` within `config.budget`, write it to `output` with its recipe, and
    the Pareto table, plot and sensitivities under `output/search/`. Returns the results (also results.json).

    `offload` as for the other commands: `disk` streams the model from its safetensors shards one block at a
    time (`search_streamed.py`: GPTQ widths per layer from the streamed sensitivities, the written model's perplexity
    streamed too), `auto`
    does so when the model in float32 would not fit in `max_memory` (default: the memory available), `none`
    loads it whole."""

    resolve_model_path(model)
    streamed = should_stream_search(model, config, offload, max_memory)
    with claim_output(output, overwrite=True, inputs=[model, config.dataset, config.eval_dataset]):
        return _search(model, output, config, resume, overwrite, quiet, streamed)


def _search(
    model: str, output, config: SearchConfig, resume: bool, overwrite: bool, quiet: bool, streamed: bool
) -> dict[str, Any]:
    for name in ("dataset", "eval_dataset"):
        path = getattr(config, name)
        if looks_local(path) and not os.path.exists(path):
            raise FileNotFoundError(f"`{name}` {path!r} does not exist")
    require_causal_lm(model, checkpoint_task(model), "the search's perplexity and sensitivities")
    tokenizer = load_tokenizer(model)
    config.resolve_windows(AutoConfig.from_pretrained(resolve_model_path(model)))
    calib = tokenize_windows(tokenizer, load_texts(config.dataset), config.seq_len)
    if len(calib) < config.sensitivity_samples:
        raise ValueError(
            f"{config.dataset} gives {len(calib)} windows of {config.seq_len} tokens; the sensitivity pass needs "
            f"sensitivity_samples={config.sensitivity_samples}: give more text or lower --sensitivity-samples/--seq-len"
        )
    dense = None if streamed else load_model(model, "float32")
    base = streamed_baseline(model) if streamed else measure_baseline(dense, model)
    check_reachable(base, config)

    output = Path(output)
    resuming = resume and (output / "search").is_dir()
    if resume and not resuming and output.is_dir() and any(output.iterdir()):
        raise FileExistsError(f"{os.fspath(output)!r} is not empty and holds no search to resume")
    if not resuming:
        _prepare_output(output, False, overwrite)
    work = output / "search"
    (work / "candidates").mkdir(parents=True, exist_ok=True)
    cache = SearchCache(work / CACHE_FILE, config.fingerprint(model), resume)
    eval_windows = tokenize_windows(tokenizer, load_texts(config.eval_dataset), config.eval_seq_len)
    eval_windows = eval_windows[: config.eval_max_windows]
    if streamed:
        return search_streamed(model, output, config, base, calib, eval_windows, work, cache, resume)

    start = time.perf_counter()
    dense_metrics = cache.data.get("dense") or _evaluate(dense, model, eval_windows, base)
    cache.add_seconds("evaluate", time.perf_counter() - start)
    cache.data["dense"] = dense_metrics
    cache.save()

    candidates: list[Candidate] = []
    if "gptq" in config.techniques:
        candidates += gptq_candidates(model, dense, tokenizer, base, config, calib, work, cache)
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
    cache.save()
    results = write_reports(points, front, best, config, base, work, failed, cache.data["seconds"])
    if best.name != "dense":
        _publish_candidate(work / "candidates" / best.name, output, config.format)
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
    with dequantized_forward(model):  # the stored weights as dense matmuls: faster for whole windows on CPU
        ppl = perplexity(model, windows)
    return {
        "perplexity": ppl,
        "size_bytes": size,
        "effective_bits": base.effective_bits(model),
        "bits_per_weight": bits_per_weight(model),
        "parameters": nonzero_parameters(model),
        "latency_s": forward_latency(model, windows[:1], runs=LATENCY_RUNS),
    }


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
                    "seq_len": config.seq_len, "sensitivity_cache": os.fspath(work / "lowrank-sensitivity.json"),
                    "hessian_dtype": config.hessian_dtype}  # fmt: skip
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
        settings = {"method": "sparsegpt", "sparsity": s, "num_samples": config.num_samples, "seq_len": config.seq_len,
                    "hessian_dtype": config.hessian_dtype}  # fmt: skip
        candidates.append(Candidate(f"prune-{s:.3f}", "prune", [{"prune": settings}], "SparseGPT, bitmask storage"))
    return candidates


def _build_and_evaluate(
    candidate: Candidate, model_path, config, work: Path, cache: SearchCache, eval_windows, base, quiet
) -> None:
    folder = work / "candidates" / candidate.name
    cached = cache.evaluated(candidate, folder)
    if cached is not None:
        candidate.metrics = cached
        logger.info("%s: evaluated before, reusing", candidate.name)
        return
    if not candidate.built:
        logger.info("building %s", candidate.name)
        recipe = Recipe.from_dict({"steps": candidate.steps, "dataset": config.dataset})
        start = time.perf_counter()
        try:
            run_recipe(recipe, model_path, folder, overwrite=True, quiet=quiet)
        except ValueError as e:  # a point this model cannot reach (ranks below the minimum, ...): skip it
            logger.warning("skipping %s: %s", candidate.name, e)
            candidate.note = f"failed: {e}"
            shutil.rmtree(folder, ignore_errors=True)
            return
        finally:
            cache.add_seconds(f"build_{candidate.technique}", time.perf_counter() - start)
        shutil.rmtree(folder / "steps", ignore_errors=True)  # the same model as the folder itself
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # evaluated as the dense model is
    candidate.metrics = _evaluate(model, folder, eval_windows, base)
    cache.add_seconds("evaluate", time.perf_counter() - start)
    cache.data["candidates"][candidate.name] = {"steps": steps_key(candidate.steps), "metrics": candidate.metrics}
    cache.save()


def _publish_candidate(folder: Path, output: Path, format: str = "hfcompress") -> None:
    """Copy the chosen candidate into `output`; for format compressed-tensors, its weights and config are written
    again in that format (the candidates are kept in hfcompress's, which evaluation reads), and the record and
    card say it loads without hfcompress."""
    for item in folder.iterdir():
        if item.name == "steps":
            continue
        if item.is_dir():
            shutil.copytree(item, output / item.name, dirs_exist_ok=True)
        else:
            shutil.copy2(item, output / item.name)
    if format == "hfcompress":
        return
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder)
    check_compressed_tensors_compatible(model)
    with tempfile.TemporaryDirectory(dir=output) as staging:
        write_quantized(model, staging, format)
        for old in output.glob("*.safetensors*"):
            old.unlink()
        for item in Path(staging).iterdir():
            os.replace(item, output / item.name)
    record_rewrite(output, output, Step("export", format, {}, None, time.perf_counter() - start))


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
