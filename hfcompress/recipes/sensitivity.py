"""How much the calibration loss moves when one layer at a time takes a compressed weight: measured, cached,
printed as a table and drawn as a heat map."""

from __future__ import annotations

import logging
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.logging import tqdm

from ..quantization.structure import linear_weight, set_linear_weight

__all__ = ["calibration_loss", "layer_sensitivity", "plot_sensitivity", "sensitivity_table"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def calibration_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of `model` on `windows` [n, seq_len]."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
        tokens += batch[:, 1:].numel()
    return total / tokens


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    windows: torch.Tensor,
    variants: dict[str, dict[str, torch.Tensor]],
    done: dict | None = None,
    on_result=None,
) -> dict[str, dict[str, float]]:
    """`{layer: {setting: loss increase}}`: for each setting in `variants` (`{setting: {layer: [out, in] weight}}`)
    and each of its layers, the calibration loss with only that layer's weight replaced, minus the loss of
    `model` as it is. `done` holds results measured before (skipped); `on_result(layer, setting, value)` is
    called after each measurement (to cache it)."""
    results: dict[str, dict[str, float]] = {k: dict(v) for k, v in (done or {}).items()}
    todo = [(s, n) for s, layers in variants.items() for n in layers if s not in results.get(n, {})]
    if not todo:
        return results
    was_training = model.training
    model.eval()
    base = calibration_loss(model, windows)
    for setting, name in tqdm(todo, desc="sensitivity"):
        module = model.get_submodule(name)
        original = linear_weight(module).detach().clone()
        set_linear_weight(module, variants[setting][name].to(original))
        try:
            value = calibration_loss(model, windows) - base
        finally:
            set_linear_weight(module, original)
        results.setdefault(name, {})[setting] = value
        if on_result is not None:
            on_result(name, setting, value)
    model.train(was_training)
    return results


def sensitivity_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per layer, one column per setting, the loss increase."""
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
    ax.set_title("calibration loss increase, one layer at a time (log10)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)
