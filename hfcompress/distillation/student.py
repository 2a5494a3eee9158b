"""`make_student`: a smaller model of the teacher's architecture, built from the teacher's own blocks."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Literal

from torch import nn

from ..checkpoint import update_manifest
from ..core.structure import find_layer_stack
from ..pruning.importance import prune_structured

__all__ = ["choose_layers", "make_student"]

logger = logging.getLogger(__name__)


def choose_layers(num_teacher_layers: int, num_layers: int, strategy: str = "alternate") -> list[int]:
    """Which teacher blocks a `num_layers`-block student copies: `alternate` spreads them evenly from the first
    to the last block (DistilBERT takes one in two), `first` takes the first ones."""
    if not isinstance(num_layers, int) or not 0 < num_layers <= num_teacher_layers:
        raise ValueError(
            f"`num_layers` must be between 1 and the teacher's {num_teacher_layers} layers, got {num_layers!r}"
        )
    if strategy == "first":
        return list(range(num_layers))
    if strategy == "alternate":
        if num_layers == 1:
            return [0]
        step = (num_teacher_layers - 1) / (num_layers - 1)
        return sorted({round(i * step) for i in range(num_layers)})
    raise ValueError(f"`strategy` must be 'alternate' or 'first', got {strategy!r}")


def _renumber(block: nn.Module, index: int) -> None:
    # attention modules keep their block index for the KV cache
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def make_student(
    teacher: nn.Module,
    num_layers: int | None = None,
    layers: Iterable[int] | None = None,
    strategy: Literal["alternate", "first"] = "alternate",
    heads: float = 0.0,
    ffn: float = 0.0,
    importance_batches: Iterable | None = None,
) -> nn.Module:
    """A copy of `teacher` with only some of its transformer blocks (`num_layers` chosen by `strategy`, or the
    explicit `layers`), every weight copied: embeddings, the chosen blocks, final norm and heads. With `heads`
    / `ffn`, that fraction of attention heads / FFN neurons is then removed from every block by importance
    (`prune_structured`, Taylor on `importance_batches` or weight norms). The result is a plain transformers
    model of the same class (config updated) that saves and loads with `from_pretrained`."""
    prefix, stack = find_layer_stack(teacher)
    total = len(stack)
    if (num_layers is None) == (layers is None):
        raise ValueError("give exactly one of `num_layers` or `layers`")
    if layers is None:
        chosen = choose_layers(total, num_layers, strategy)
    else:
        chosen = list(layers)
        bad = [i for i in chosen if not isinstance(i, int) or not 0 <= i < total]
        if bad or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"`layers` must be distinct block indices in [0, {total}), got {chosen}")
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)  # a teacher frozen by an earlier distillation still gives a trainable student
    _, student_stack = find_layer_stack(student)
    blocks = [student_stack[i] for i in chosen]
    for new_index, block in enumerate(blocks):
        _renumber(block, new_index)
    parent_name, _, attr = prefix.rpartition(".")
    parent = student.get_submodule(parent_name) if parent_name else student
    setattr(parent, attr, nn.ModuleList(blocks))
    config = student.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, name, None) == total:
            setattr(config, name, len(chosen))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        config.layer_types = [layer_types[i] for i in chosen]
    update_manifest(student, "distillation", student_layers=chosen)
    logger.info("student keeps teacher blocks %s of %d", chosen, total)
    if heads or ffn:
        prune_structured(student, heads=heads, ffn=ffn, batches=importance_batches)
    return student
