"""How far the model's predictions move when one layer alone is truncated: the measurements behind rank
allocation.

Each layer is decomposed once (with full-precision inputs) and truncated to a few probe ranks in turn; at
each, the KL divergence of the model's next-token distribution from the untouched model's is measured on a
few calibration windows (for models without a language-model head, the relative change of their output).
The cost is modelled as proportional to the squared singular values the truncation drops (for whitening,
exactly the layer's squared output error on the calibration tokens), the factor fitted by least squares to
the probes: one SVD and a handful of forward passes per layer give a prediction for every rank. Early blocks are not recomputed when probing
later ones: their recorded outputs are replayed.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..core.calibration import collect_hessians
from ..core.capture import capture_block_inputs, forward_inputs, run_block
from ..core.distributed import first_windows, reduce_mean
from ..core.structure import linear_weight, set_linear_weight
from .allocation import ErrorCurve
from .config import LowRankConfig
from .svd import decompose, max_saving_rank, rank_for_ratio

__all__ = ["Reference", "load_or_measure_sensitivity", "measure_sensitivity", "model_loss", "reference_outputs"]

logger = logging.getLogger(__name__)


@dataclass
class Reference:
    """The untouched model's outputs on the probe batches: next-token log-probabilities (`kl`) for a model
    with an output embedding (a language model), its first output otherwise."""

    outputs: list[torch.Tensor]
    kl: bool


@torch.no_grad()
def reference_outputs(model: nn.Module, batches: list[torch.Tensor]) -> Reference:
    device = next(model.parameters()).device
    language_model = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
    outputs = []
    for batch in batches:
        output = _first_output(model(**forward_inputs(model, batch.to(device)))).float()
        outputs.append(torch.log_softmax(output, dim=-1) if language_model else output)
    return Reference(outputs, language_model)


@torch.no_grad()
def model_loss(model: nn.Module, batches: list[torch.Tensor], reference: Reference, on_batch=None) -> float:
    """How far the model's outputs on `batches` are from `reference`: for a language model the mean KL
    divergence per token from the reference next-token distribution, otherwise the squared change of its
    first output relative to the reference's mean square. `on_batch(index)` is called before each batch.

    KL is used rather than the change in next-token loss: it is never negative and does not depend on the
    labels, so a few windows measure small perturbations without the sign noise of a loss difference."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for index, batch in enumerate(batches):
        if on_batch is not None:
            on_batch(index)
        expected = reference.outputs[index]
        output = _first_output(model(**forward_inputs(model, batch.to(device)))).float()
        if reference.kl:
            log_probs = torch.log_softmax(output, dim=-1)
            total += float((expected.exp() * (expected - log_probs)).sum())
            count += expected[..., 0].numel()
        else:
            total += float((output - expected).square().sum() / expected.square().mean().clamp_min(1e-12))
            count += expected.numel()
    return total / count


class _SkipTo:
    """Makes the model start at block `start`: every block before it returns what block `start - 1` returned
    for the current batch in an untouched run, so probing a late layer does not recompute the early blocks."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, probes: list[torch.Tensor]):
        self.blocks = blocks
        self.outputs: list[list] = [[] for _ in blocks]
        self.index = 0
        handles = [b.register_forward_hook(self._recorder(i)) for i, b in enumerate(blocks)]
        try:
            for batch in probes:
                model(**forward_inputs(model, batch.to(next(model.parameters()).device)))
        finally:
            for handle in handles:
                handle.remove()

    def _recorder(self, i):
        def hook(module, args, output):
            self.outputs[i].append(output)

        return hook

    def set_batch(self, index: int) -> None:
        self.index = index

    def start_at(self, start: int) -> None:
        for block in self.blocks[:start]:
            block.forward = lambda *args, **kwargs: self.outputs[start - 1][self.index]

    def restore(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)


def _first_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else next(iter(output.values()))


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    blocks: nn.ModuleList,
    targets: dict[str, nn.Module],
    batches: list[torch.Tensor],
    config: LowRankConfig,
) -> dict[str, ErrorCurve]:
    """An `ErrorCurve` per target layer (inside `blocks`), fitted to measured loss increases."""
    # the first windows, whatever the number of processes (each takes its share, their losses are averaged)
    probes = [w for b in first_windows(batches, config.sensitivity_samples) for w in b.split(config.batch_size)]
    reference = reference_outputs(model, probes)
    skip = _SkipTo(model, blocks, probes)
    block_names = {id(module): name for name, module in model.named_modules()}
    inputs = capture_block_inputs(model, blocks[0], batches)
    curves: dict[str, ErrorCurve] = {}
    for index, block in enumerate(tqdm(blocks, desc="sensitivity")):
        prefix = block_names[id(block)]
        modules = {n[len(prefix) + 1 :]: m for n, m in targets.items() if n.startswith(prefix + ".")}
        if modules:
            grams = collect_hessians(
                block, prefix, inputs, list(modules), hessian_dtype=getattr(torch, config.hessian_dtype)
            )
            skip.start_at(index)
            try:

                def loss():  # across processes, the mean over every rank's probe windows
                    local = model_loss(model, probes, reference, skip.set_batch) if probes else 0.0
                    windows = sum(len(p) for p in probes)
                    return float(reduce_mean(torch.tensor([local], dtype=torch.float64), windows)[0][0])

                for name, module in modules.items():
                    curves[f"{prefix}.{name}"] = _probe(module, grams[name], loss, config)
            finally:
                skip.restore()
            del grams
        inputs = run_block(block, inputs)
    _floor_weights(curves)
    return curves


def _probe(module, gram, loss, config: LowRankConfig) -> ErrorCurve:
    W = linear_weight(module).detach().clone()
    out_features, in_features = W.shape
    decomposition = decompose(W, config.method, gram, config.alpha, config.damp_percent)
    curve = ErrorCurve.from_singular_values(decomposition.S, out_features, in_features)
    rises, tails = [], []
    try:
        for ratio in config.probe_ratios:
            rank = min(
                rank_for_ratio(out_features, in_features, ratio),
                max_saving_rank(out_features, in_features),
            )
            if rank < 1:
                continue
            up, down = decomposition.factors(rank)
            set_linear_weight(module, (up @ down).to(W.dtype))
            rises.append(loss())
            tails.append(float(curve.tail[rank]))
            curve.measured[rank] = rises[-1]
    finally:
        set_linear_weight(module, W)
    rises_t, tails_t = (
        torch.tensor(rises, dtype=torch.float64),
        torch.tensor(tails, dtype=torch.float64),
    )
    curve.min_rank = min(curve.measured, default=1)
    curve.weight = float((rises_t * tails_t).sum() / tails_t.square().sum().clamp_min(1e-300)) if rises else 0.0
    return curve


def _floor_weights(curves: dict[str, ErrorCurve]) -> None:
    """A layer whose truncation did not measurably raise the loss still costs something: without a floor the
    allocation would cut it to rank 1 on the strength of noise."""
    positive = sorted(c.weight for c in curves.values() if c.weight > 0)
    floor = positive[len(positive) // 2] * 1e-2 if positive else 1.0
    for name, curve in curves.items():
        if curve.weight < floor:
            logger.debug(
                "%s: measured sensitivity %.3g raised to the floor %.3g",
                name,
                curve.weight,
                floor,
            )
            curve.weight = floor


CACHE_VERSION = 1


def _cache_key(model: nn.Module, targets: dict, config: LowRankConfig) -> dict:
    return {
        "version": CACHE_VERSION,
        "measure": "kl",
        "model": getattr(model, "name_or_path", ""),
        "layers": sorted(targets),
        "method": config.method,
        "alpha": config.alpha,
        "probe_ratios": config.probe_ratios,
        "sensitivity_samples": config.sensitivity_samples,
        "seq_len": config.seq_len,
        "hessian_dtype": config.hessian_dtype,
    }


def load_or_measure_sensitivity(model, blocks, targets, batches, config: LowRankConfig) -> dict[str, ErrorCurve]:
    """`measure_sensitivity`, through `config.sensitivity_cache` when one is given."""
    path = config.sensitivity_cache
    key = _cache_key(model, targets, config)
    if path and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("key") == key:
            logger.info("sensitivity: read from %s", path)
            return {name: _curve_from_json(item) for name, item in cached["curves"].items()}
        logger.info("sensitivity: %s was measured for other settings; measuring again", path)
    curves = measure_sensitivity(model, blocks, targets, batches, config)
    if path:
        data = {"key": key, "curves": {name: _curve_to_json(c) for name, c in curves.items()}}
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    return curves


def _curve_to_json(curve: ErrorCurve) -> dict:
    return {
        "shape": [curve.out_features, curve.in_features],
        "tail": curve.tail.tolist(),
        "weight": curve.weight,
        "measured": {str(r): v for r, v in curve.measured.items()},
        "min_rank": curve.min_rank,
    }


def _curve_from_json(item: dict) -> ErrorCurve:
    curve = ErrorCurve(*item["shape"], torch.tensor(item["tail"], dtype=torch.float64), item["weight"])
    curve.measured = {int(r): v for r, v in item["measured"].items()}
    curve.min_rank = item["min_rank"]
    return curve
