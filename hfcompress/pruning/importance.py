"""Importance of attention heads and FFN neurons, `prune_structured`, which removes the least important, and the
structured-pruning technique's step (`apply_structured_pruning`, `structured_record`)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig
from transformers.utils.logging import tqdm

from ..core.distributed import reduce_sum
from ..core.tasks import task_of
from ..data import calibration_data
from .structured import (
    Attention,
    FeedForward,
    _blocks,
    apply_uniform_removal,
    attention_of,
    feed_forward_of,
    keep_top_units,
    unit_norms,
)
from .structured_config import StructuredPruningConfig, importance_of

__all__ = ["apply_structured_pruning", "check_task", "prune_structured", "structured_record", "taylor_importance"]

logger = logging.getLogger(__name__)


def _unit_products(part: FeedForward | Attention) -> torch.Tensor:
    """Per unit, sum of weight * gradient over its parameters: the first-order change of the loss if the
    unit were removed (with the sign flipped)."""
    total = torch.zeros(part.size)
    for layer, width in part.unit_rows():
        wg = (layer.weight.detach() * layer.weight.grad).float().reshape(part.size, width, -1).sum(dim=(1, 2))
        if layer.bias is not None:
            wg = wg + (layer.bias.detach() * layer.bias.grad).float().reshape(part.size, width).sum(dim=1)
        total += wg.cpu()
    for layer, width in part.unit_columns():
        wg = (layer.weight.detach() * layer.weight.grad).float()
        total += wg.reshape(layer.out_features, part.size, width).sum(dim=(0, 2)).cpu()
    return total


def _loss(model: nn.Module, batch) -> torch.Tensor:
    device = next(model.parameters()).device
    if isinstance(batch, torch.Tensor):  # token ids of a causal LM
        batch = {"input_ids": batch, "labels": batch}
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(batch).items()}
    if "labels" not in batch:
        raise ValueError("importance batches need `labels` (or are token-id tensors of a causal LM)")
    return model(**batch).loss


def taylor_importance(model: nn.Module, batches: Iterable, parts: list[FeedForward | Attention]) -> list[torch.Tensor]:
    """First-order Taylor importance (Molchanov et al. 2019) of every unit of `parts`: per batch, the absolute
    sum over the unit's parameters of weight * gradient of the loss, summed over batches (in float64, so the
    sum does not depend on their order) and, across processes, over every rank's batches."""
    importance = [torch.zeros(p.size, dtype=torch.float64) for p in parts]
    was_training = model.training
    model.eval()  # no dropout: the gradient of the model that will be pruned
    requires = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        for batch in tqdm(list(batches), desc="importance"):
            model.zero_grad(set_to_none=False)
            _loss(model, batch).backward()
            for total, part in zip(importance, parts, strict=True):
                total += _unit_products(part).abs()
    finally:
        model.zero_grad(set_to_none=True)
        for p, r in requires.items():
            p.requires_grad_(r)
        model.train(was_training)
    return [reduce_sum(total, 0)[0] for total in importance]


def prune_structured(
    model: nn.Module,
    heads: float = 0.0,
    ffn: float = 0.0,
    batches: Iterable | None = None,
    importance: Literal["taylor", "magnitude"] | None = None,
) -> nn.Module:
    """Remove the fraction `heads` of attention heads (key/value groups under grouped-query attention) and
    `ffn` of FFN neurons from every block, the least important first, and update the config. Importance is
    first-order Taylor on `batches` (dicts with `labels`, or token-id tensors for a causal LM), or the weight
    norm without data. Returns the model, changed in place."""
    for name, value in (("heads", heads), ("ffn", ffn)):
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"`{name}` must be a fraction in [0, 1), got {value!r}")
    importance = importance or ("taylor" if batches is not None else "magnitude")
    if importance not in ("taylor", "magnitude"):
        raise ValueError(f"`importance` must be 'taylor' or 'magnitude', got {importance!r}")
    if importance == "taylor" and batches is None:
        raise ValueError("Taylor importance needs `batches` of training data")
    blocks = _blocks(model)
    plan = {}
    for kind, fraction, finder in (
        ("ffn", ffn, feed_forward_of),
        ("heads", heads, lambda b: attention_of(b, model.config)),
    ):
        if fraction == 0:
            continue
        parts = [finder(block) for block in blocks]
        if any(p is None for p in parts):
            raise ValueError(f"{type(model).__name__}: hfcompress finds no {kind} to prune in its blocks")
        plan[kind] = parts
    if not plan:
        return model
    parts = [p for kind in plan for p in plan[kind]]
    scores = taylor_importance(model, batches, parts) if importance == "taylor" else [unit_norms(p) for p in parts]
    offset = 0
    keep = {}
    for kind, kind_parts in plan.items():
        fraction = ffn if kind == "ffn" else heads
        size = kind_parts[0].size
        count = max(1, round(size * (1 - fraction)))
        keep[kind] = [keep_top_units(s, count) for s in scores[offset : offset + len(kind_parts)]]
        offset += len(kind_parts)
        logger.info("%s: keeping %d of %d per block (%s importance)", kind, count, size, importance)
    apply_uniform_removal(model, keep.get("ffn"), keep.get("heads"))
    return model


def apply_structured_pruning(model: nn.Module, config: StructuredPruningConfig, tokenizer=None) -> nn.Module:
    batches = None
    if config.dataset is not None:
        batches = calibration_data(model, config, tokenizer)
    return prune_structured(model, heads=config.heads, ffn=config.ffn, batches=batches)


def structured_record(model: nn.Module, config: StructuredPruningConfig) -> dict[str, Any]:
    return {
        "importance": importance_of(config),
        "num_attention_heads": getattr(model.config, "num_attention_heads", None),
        "intermediate_size": getattr(model.config, "intermediate_size", None),
    }


def check_task(model_path, config: StructuredPruningConfig) -> None:
    """Refuse Taylor importance (`dataset`: the language-modelling loss) for a checkpoint saved with another head
    than a causal LM's, before it loads (`task` given: the config refused it already)."""
    if config.dataset is None or config.task is not None:
        return
    try:
        saved = AutoConfig.from_pretrained(model_path)
        task = task_of(saved.model_type, getattr(saved, "architectures", None))
    except (OSError, ValueError):
        return  # loading says what is wrong with it
    if task != "causal-lm":
        raise ValueError(
            f"`dataset` gives Taylor importance from the language-modelling loss, and {model_path!r} is a {task} "
            "model; prune it by weight norms (no dataset), or call hfcompress.prune_structured(model, batches=...) "
            "with labelled batches"
        )
