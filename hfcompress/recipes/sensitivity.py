"""How much the model moves when one layer at a time takes a compressed weight (KL divergence of its
next-token distributions, or the calibration loss): measured, cached, printed as a table and drawn as a heat map."""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.logging import tqdm

from ..core.capture import capture_block_outputs
from ..core.structure import find_layer_stack, linear_weight, set_linear_weight

__all__ = [
    "calibration_loss",
    "fisher_scores",
    "layer_sensitivity",
    "monotone",
    "plot_sensitivity",
    "sensitivity_table",
]

logger = logging.getLogger(__name__)


def calibration_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of `model` on `windows` [n, seq_len]."""
    return _loss(model, list(windows.split(batch_size)))


class _Prefix:
    """Skips the blocks before block `k`: each returns block k-1's recorded output for the running batch, so a
    measurement runs blocks k.. only. `applies` is False when replaying does not reproduce the model's loss
    (a model that does work between blocks); then the full model runs."""

    def __init__(self, model, blocks, k: int, batches: list[torch.Tensor]):
        self.blocks, self.k, self.batch = blocks, k, 0
        self.outputs = capture_block_outputs(model, blocks[k - 1], batches) if k > 0 else []

    def __enter__(self):
        for block in list(self.blocks)[: self.k]:
            block.forward = self._replay
        return self

    def __exit__(self, *exc):
        for block in list(self.blocks)[: self.k]:
            del block.forward

    def _replay(self, *args, **kwargs):
        return self.outputs[self.batch]


@torch.no_grad()
def _loss(model, batches: list[torch.Tensor], prefix: _Prefix | None = None) -> float:
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for index, batch in enumerate(batches):
        if prefix is not None:
            prefix.batch = index
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        tokens += batch[:, 1:].numel()
    return total / tokens


@torch.no_grad()
def _log_probs(model, batches: list[torch.Tensor], prefix: _Prefix | None = None):
    device = next(model.parameters()).device
    for index, batch in enumerate(batches):
        if prefix is not None:
            prefix.batch = index
        yield F.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits.float(), dim=-1)


@torch.no_grad()
def _divergence(model, batches, reference: list[torch.Tensor], prefix: _Prefix | None = None) -> float:
    """Mean over tokens of KL(reference || model): how far the model's next-token distributions moved."""
    total, tokens = 0.0, 0
    for ref, logp in zip(reference, _log_probs(model, batches, prefix), strict=True):
        total += float((ref.exp() * (ref - logp)).sum())
        tokens += ref.shape[0] * ref.shape[1]
    return total / tokens


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    windows: torch.Tensor,
    variants: dict[str, dict[str, torch.Tensor]],
    done: dict | None = None,
    on_result=None,
    batch_size: int = 4,
    measure: str = "kl",
) -> dict[str, dict[str, float]]:
    """`{layer: {setting: sensitivity}}`: for each setting in `variants` (`{setting: {layer: [out, in] weight}}`)
    and each of its layers, how much the model changes with only that layer's weight replaced: with `measure`
    "kl" (default) the mean KL divergence of its next-token distributions from the model's own (never negative,
    and far less noisy than a difference of losses: a small change can lower the loss on a few windows by
    chance), with "loss" the calibration loss minus the model's. `done` holds results measured before
    (skipped); `on_result(layer, setting, value)` is called after each measurement (to cache it). "kl" keeps
    the model's log-probabilities for `windows` in memory (windows x seq_len x vocabulary floats).

    A layer inside the block stack changes nothing before its block, so the blocks before it are not run again:
    their output is recorded once per block and replayed (checked against the full model's loss first).
    """

    results: dict[str, dict[str, float]] = {k: dict(v) for k, v in (done or {}).items()}
    todo = [(s, n) for s, layers in variants.items() for n in layers if s not in results.get(n, {})]
    if not todo:
        return results
    try:
        stack_name, blocks = find_layer_stack(model)
    except ValueError:
        stack_name, blocks = None, []
    block_of = {}
    for setting, name in todo:
        index = None
        if stack_name is not None and name.startswith(stack_name + "."):
            index = int(name[len(stack_name) + 1 :].split(".")[0])
        block_of[(setting, name)] = index
    # by block, so each block's prefix is recorded once
    todo.sort(key=lambda item: -1 if block_of[item] is None else block_of[item])
    if measure not in ("kl", "loss"):
        raise ValueError(f"`measure` must be 'kl' or 'loss', got {measure!r}")
    batches = list(windows.split(batch_size))
    was_training = model.training
    model.eval()
    base = _loss(model, batches)
    reference = list(_log_probs(model, batches)) if measure == "kl" else None

    def measure_with(prefix=None) -> float:
        if reference is not None:
            return _divergence(model, batches, reference, prefix)
        return _loss(model, batches, prefix) - base

    progress = tqdm(total=len(todo), desc="sensitivity")
    for index in dict.fromkeys(block_of[item] for item in todo):
        prefix = None
        if index:  # replay blocks 0..index-1, if that reproduces the model
            prefix = _Prefix(model, blocks, index, batches)
            with prefix:
                replayed = _loss(model, batches, prefix)
            if abs(replayed - base) > 1e-4 * max(1.0, abs(base)):
                logger.info("replaying the blocks before block %d changes the loss; running the full model", index)
                prefix = None
        for setting, name in [item for item in todo if block_of[item] == index]:
            module = model.get_submodule(name)
            original = linear_weight(module).detach().clone()
            set_linear_weight(module, variants[setting][name].to(original))
            try:
                if prefix is not None:
                    with prefix:
                        value = measure_with(prefix)
                else:
                    value = measure_with()
            finally:
                set_linear_weight(module, original)
            results.setdefault(name, {})[setting] = value
            if on_result is not None:
                on_result(name, setting, value)
            progress.update(1)
    progress.close()
    model.train(was_training)
    return results


def fisher_scores(
    fisher: dict[str, torch.Tensor], errors: dict[str, dict[str, torch.Tensor]]
) -> dict[str, dict[str, float]]:
    """`{layer: {setting: score}}`, the second-order estimate of the mean KL divergence one layer's change costs,
    `½ Σ_r F_r e_r`: `fisher[layer]` the Fisher information of each output channel (`core.fisher.output_fisher`),
    `errors[setting][layer]` the mean squared error of each output channel under that setting. Layers without
    a Fisher vector or an error are left out."""
    scores: dict[str, dict[str, float]] = {}
    for setting, layers in errors.items():
        for name, error in layers.items():
            if name in fisher and error is not None:
                scores.setdefault(name, {})[setting] = 0.5 * float((fisher[name] * error.to(fisher[name])).sum())
    return scores


def monotone(results: dict[str, dict[str, float]], order: list[str]) -> dict[str, dict[str, float]]:
    """Sensitivities made non-negative and non-increasing along `order` (from the most to the least compressed
    setting, e.g. 2bit, 3bit, 4bit): fewer bits never cost less than more bits."""
    cleaned = {}
    for name, row in results.items():
        out, floor = {}, 0.0
        for setting in reversed([s for s in order if s in row]):
            floor = max(floor, row[setting])
            out[setting] = floor
        cleaned[name] = {s: out[s] for s in row if s in out}
    return cleaned


def sensitivity_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per layer, one column per setting, the sensitivity."""
    settings = sorted({s for row in results.values() for s in row}, key=_setting_order)
    lines = ["| layer | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[s]:+.4f}" if s in row else "-" for s in settings) + " |")
    return "\n".join(lines) + "\n"


def _setting_order(setting: str):
    digits = "".join(c for c in setting if c.isdigit() or c == ".")
    try:
        return (0, float(digits))
    except ValueError:
        return (1, setting)


def plot_sensitivity(results: dict[str, dict[str, float]], path: str | os.PathLike) -> str | None:
    """A heat map (layers x settings, log scale of the loss increase) as PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no sensitivity plot (pip install matplotlib)")
        return None
    names = list(results)
    settings = sorted({s for row in results.values() for s in row}, key=_setting_order)
    values = [[math.log10(max(results[n].get(s, float("nan")), 1e-6)) for s in settings] for n in names]
    fig, ax = plt.subplots(figsize=(2 + 0.9 * len(settings), 1 + 0.18 * len(names)))
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_title("sensitivity, one layer at a time (log10)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)
